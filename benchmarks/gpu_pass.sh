#!/usr/bin/env bash
# One pass on a CUDA machine: GPU tests, kernel and model benchmarks; logs and JSON under $OUT.
# Usage: OUT=/some/dir bash benchmarks/gpu_pass.sh [steps...]
#   (steps: tests kernels sweep model store runtime demo; ktests: the kernel GPU tests only, in parallel
#    processes when pytest-xdist is there; kernels5: bench_kernels.py on its five main cases; ksweep: the
#    kernel config sweep + host cost; khost: the host cost only; modelfast: bench_model.py without --peft;
#    loadhost: an adapter load's host cost by stage and its interference with a forward's host work;
#    storegpu / rtgpu: the store's / the runtime's GPU tests only; tasks: classification heads, GPT-2 Conv1D
#    and task-shaped inputs on the GPU; gen / generate / genrate: the generation GPU test / decode-step benchmark / throughput benchmark;
#    schedcmp / modelcmp: the scheduler / model benchmarks of the tree in before/ and of this one)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
[ -e polylora_async/kernels ] || ln -s ../kernels polylora_async/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
steps=${*:-tests kernels model}
{ date -u; git rev-parse --short HEAD 2>/dev/null; nvidia-smi --query-gpu=name,driver_version,memory.used,clocks.sm --format=csv;
  python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"; } | tee "$OUT/env.txt"
for step in $steps; do
    echo "=== $step"
    case $step in
        tests)   timeout 300 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -x 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
        kernels) timeout 240 python3 benchmarks/bench_kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" | tail -30 ;;
        sweep)   timeout 300 python3 benchmarks/sweep_kernels.py --case prefill --case decode --json "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log" | tail -60 ;;
        ktests)  # pytest-xdist (on the GPU image) compiles in parallel; pytest-benchmark must be off with it
                 # (its "disabled under xdist" warning is an error under -W error).
                 xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12 -p no:benchmark")
                 timeout 150 python3 -m pytest -m gpu tests/gpu/test_kernels_gpu.py -q -p no:cacheprovider $xdist > "$OUT/gpu_tests.log" 2>&1
                 rc=$?; if [ -n "$xdist" ] && [ $rc -ge 3 ] && [ $rc -le 4 ]; then
                     timeout 110 python3 -m pytest -m gpu tests/gpu/test_kernels_gpu.py -q -p no:cacheprovider -x -p no:benchmark >> "$OUT/gpu_tests.log" 2>&1; fi
                 tail -25 "$OUT/gpu_tests.log" ;;
        kernels5) timeout 90 python3 benchmarks/bench_kernels.py --case decode --case prefill --case encoder-768x768-a16 --case encoder-768x3072-a16 --case encoder-3072x768-a16 --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" | tail -30 ;;
        ksweep)  timeout 185 python3 benchmarks/sweep_kernels.py --case decode --case prefill --case encoder-768x3072-a16 --case encoder-3072x768-a16 --host --json "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log" | tail -80 ;;
        khost)   timeout 40 python3 benchmarks/sweep_kernels.py --host-only --json "$OUT/host.json" 2>&1 | tee "$OUT/host.log" | tail -20 ;;
        modelfast) timeout 120 python3 benchmarks/bench_model.py --json "$OUT/model.json" 2>&1 | tee "$OUT/model.log" | tail -8 ;;
        model)   timeout 300 python3 benchmarks/bench_model.py --peft --json "$OUT/model.json" 2>&1 | tee "$OUT/model.log" | tail -8 ;;
        loadhost) timeout 120 python3 benchmarks/bench_load_host.py --json "$OUT/load_host.json" 2>&1 | tee "$OUT/load_host.log" | tail -8 ;;
        store)   timeout 150 python3 benchmarks/bench_cold_load.py --json "$OUT/cold_load.json" 2>&1 | tee "$OUT/cold_load.log" | tail -20 ;;
        runtime) timeout 300 python3 benchmarks/bench_runtime.py --json "$OUT/runtime.json" 2>&1 | tee "$OUT/runtime.log" | tail -25 ;;
        profile) timeout 200 python3 benchmarks/profile_model.py 2>&1 | tee "$OUT/profile.log" | head -60 ;;
        storegpu) timeout 200 python3 -m pytest -m gpu tests/gpu/test_store_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/store_gpu.log" | tail -15 ;;
        tasks)   timeout 200 python3 -m pytest -m gpu $(ls tests/gpu/test_heads_gpu.py tests/gpu/test_conv1d_gpu.py tests/gpu/test_runtime_io_gpu.py 2>/dev/null) -q -p no:cacheprovider -rA 2>&1 | tee "$OUT/tasks_gpu.log" | tail -25 ;;
        rtgpu)   timeout 120 python3 -m pytest -m gpu tests/gpu/test_runtime_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/runtime_gpu.log" | tail -15 ;;
        demo)    timeout 200 python3 -m polylora_async demo 2>&1 | tee "$OUT/demo.log" | tail -12 ;;
        gen)     timeout 200 python3 -m pytest -m gpu tests/gpu/test_generation_gpu.py -q -s -p no:cacheprovider 2>&1 | tee "$OUT/generation_gpu.log" | tail -12 ;;
        generate) timeout 200 python3 benchmarks/bench_generate.py --json "$OUT/generate.json" 2>&1 | tee "$OUT/generate.log" | tail -8 ;;
        genrate) timeout 400 python3 benchmarks/bench_generate_throughput.py --json "$OUT/generate_throughput.json" 2>&1 | grep -v Warning | tee "$OUT/generate_throughput.log" | tail -8 ;;
        # Before/after on this machine, alternating: the tree to compare with is unpacked in before/
        # (e.g. `git archive <commit> | tar -x -C before`, carried to the device).
        schedcmp) for tree in before . before .; do
                     [ -d "$tree" ] || continue
                     [ -e "$tree/polylora_async/kernels" ] || ln -s ../kernels "$tree/polylora_async/kernels"
                     (cd "$tree" && PYTHONPATH=$PWD:/tmp/site timeout 120 python3 -c "import asyncio, json; from benchmarks.bench_runtime import scheduler_overhead as s; r = asyncio.run(s(False)); print('$tree', json.dumps({k: r[k] for k in ('overhead_us_per_request', 'overhead_us_per_request_all_runs', 'asyncio_floor_us_per_request', 'closed_loop_256_overhead_us_per_request')}))")
                 done 2>&1 | grep -v Warning | tee "$OUT/schedcmp.log" | tail -8 ;;
        modelcmp) for tree in before .; do
                     [ -d "$tree" ] || continue
                     [ -e "$tree/polylora_async/kernels" ] || ln -s ../kernels "$tree/polylora_async/kernels"
                     (cd "$tree" && PYTHONPATH=$PWD:/tmp/site timeout 150 python3 benchmarks/bench_model.py --json "$OUT/model_$( [ "$tree" = . ] && echo after || echo before ).json" 2>&1 | tail -6)
                 done 2>&1 | tee "$OUT/modelcmp.log" ;;
    esac
done
