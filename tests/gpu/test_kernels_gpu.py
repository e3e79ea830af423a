"""The Triton SGMV kernels on CUDA: the correctness grid, serving-sized batches, CUDA-graph replay.

Run on the GPU machine: ``pytest -m gpu tests/gpu``. Every test is marked ``gpu``; without CUDA the
module skips. Self-contained on purpose: importing tests/test_kernels.py would set TRITON_INTERPRET on a
CPU machine, and the interpreter must never run these.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from polylora_async.kernels import (
    SgmvConfig,
    build_batch_meta,
    lora_apply_,
    lora_apply_reference_,
    lora_apply_triton_,
    lora_apply_trusted_,
    lora_expand_,
    lora_shrink,
)
from polylora_async.kernels import sgmv as sgmv_module

pytestmark = pytest.mark.gpu
DEVICE = torch.device("cuda")

# ONE tolerance table: ||delta_out - delta_ref|| / ||delta_ref|| over the LoRA update of the active
# rows, the reference in fp64 on the same quantised inputs; |delta| ~ |y| ~ 1 by construction.
TOLERANCES: dict[torch.dtype, float] = {
    # tl.dot on fp32 operands runs in tf32 (10-bit mantissa: 2^-11 relative per operand) in both
    # kernels: ~5e-4 expected over K up to 4096; 5e-3 allowed.
    torch.float32: 5e-3,
    # round-to-nearest into fp16 (2^-11, x1.4 for |y + delta| vs |delta|) + tf32 in the expand.
    torch.float16: 3e-3,
    # round-to-nearest into bf16 (2^-9 rms relative, x1.4): ~3e-3 expected; 1.5e-2 allowed.
    torch.bfloat16: 1.5e-2,
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _compiled_kernels() -> None:
    module = sgmv_module._require_kernels()
    if module.INTERPRETING:
        flag = os.environ.get("TRITON_INTERPRET")
        pytest.fail(f"the kernels were decorated in interpreter mode (TRITON_INTERPRET={flag})")


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """Fresh random inputs per test, reproducible from the test's id (generated on the GPU)."""
    return torch.Generator(device=DEVICE).manual_seed(zlib.crc32(request.node.nodeid.encode()))


@dataclass(frozen=True)
class Case:
    rows: tuple[int, ...]  # slot of each row
    ranks: tuple[int, ...]  # rank of each slot in this layer; slot 0 = base
    tokens: int
    in_features: int
    out_features: int
    max_rank: int


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, device=DEVICE)


def _strided(full: torch.Tensor, layout: str, g: torch.Generator) -> torch.Tensor:
    b, t, h = full.shape
    if layout == "contiguous":
        return full.clone()
    if layout == "strided":
        view = _randn(g, b, 2 * t, h + 3).to(full.dtype)[:, ::2, :h]
    elif layout == "transposed":
        view = _randn(g, t, b, h).to(full.dtype).transpose(0, 1)
    else:
        raise AssertionError(layout)
    view.copy_(full)
    return view


@dataclass
class Inputs:
    y: torch.Tensor  # [B, T, out]
    x: torch.Tensor  # [B, T, in]
    a_kernel: torch.Tensor  # [slots, max_rank, in], NaN past each slot's rank (never read)
    b_kernel: torch.Tensor  # [slots, max_rank, out], NaN past each slot's rank
    a_ref: torch.Tensor  # zeros past the rank
    b_ref: torch.Tensor
    ranks: torch.Tensor  # [slots] int32
    scales: torch.Tensor  # [slots] float32


def make_inputs(case: Case, dtype: torch.dtype, g: torch.Generator, layout: str = "contiguous") -> Inputs:
    num_rows, num_slots = len(case.rows), len(case.ranks)
    t, k, n, r = case.tokens, case.in_features, case.out_features, case.max_rank
    a = _randn(g, num_slots, r, k) / k**0.5
    b = _randn(g, num_slots, r, n)
    stored = [min(max(rank, 0), r) for rank in case.ranks]  # rows holding weights per slot
    for slot, rank in enumerate(stored):
        b[slot] /= max(rank, 1) ** 0.5
    a_kernel, b_kernel = a.clone(), b.clone()
    for slot, rank in enumerate(stored):
        a[slot, rank:] = 0.0
        b[slot, rank:] = 0.0
        a_kernel[slot, rank:] = float("nan")
        b_kernel[slot, rank:] = float("nan")
    inp = Inputs(
        y=torch.empty(0),
        x=_strided(_randn(g, num_rows, t, k).to(dtype), layout, g),
        a_kernel=a_kernel.to(dtype),
        b_kernel=b_kernel.to(dtype),
        a_ref=a.to(dtype),
        b_ref=b.to(dtype),
        ranks=torch.tensor(case.ranks, dtype=torch.int32, device=DEVICE),
        scales=torch.rand(num_slots, generator=g, device=DEVICE) + 0.5,
    )
    # y as large as each row's update (|delta| ~ |y|: what the tolerance table assumes).
    delta = reference_y(inp, torch.zeros(num_rows, t, n, device=DEVICE), case.rows)
    rms = delta.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    rms = torch.where(rms > 0, rms, torch.ones_like(rms)).float()
    inp.y = _strided((_randn(g, num_rows, t, n) * rms).to(dtype), layout, g)
    return inp


def reference_y(inp: Inputs, y_in: torch.Tensor, rows: tuple[int, ...]) -> torch.Tensor:
    """y after the update in fp64 (on the GPU: fp64 bmm is fast enough for these sizes)."""
    y = y_in.double().contiguous()
    lora_apply_reference_(
        y, inp.x.double(), inp.a_ref.double(), inp.b_ref.double(), inp.ranks, inp.scales,
        build_batch_meta(rows, DEVICE),
    )  # fmt: skip
    return y


def assert_matches_reference(
    y_out: torch.Tensor,
    y_in: torch.Tensor,
    y_ref: torch.Tensor,
    rows: tuple[int, ...],
    ranks: tuple[int, ...],
    dtype: torch.dtype,
) -> None:
    active = torch.tensor([ranks[s] > 0 for s in rows], dtype=torch.bool, device=y_out.device)
    inactive = (~active).nonzero().flatten().tolist()
    for row in inactive:
        assert torch.equal(y_out[row], y_in[row]), f"row {row} has rank 0 and must be bit-identical"
    if len(inactive) == len(rows):
        return
    delta = (y_out.double() - y_in.double())[active]
    delta_ref = (y_ref - y_in.double())[active]
    assert torch.isfinite(delta).all()
    error = float((delta - delta_ref).norm() / delta_ref.norm())
    assert error <= TOLERANCES[dtype], f"relative error {error:.3g} > {TOLERANCES[dtype]:.3g} for {dtype}"


def split_configs(case: Case, dtype: torch.dtype) -> dict[str, SgmvConfig]:
    """The table's shrink + expand entries: forces the two-kernel path for a case."""
    decode = case.tokens <= sgmv_module.DECODE_MAX_TOKENS_PER_ROW
    return {
        "shrink_config": sgmv_module.launch_config("shrink", decode, dtype, case.in_features, case.max_rank),
        "expand_config": sgmv_module.launch_config("expand", decode, dtype, case.out_features, case.max_rank),
    }


def fused_config(case: Case, dtype: torch.dtype) -> dict[str, SgmvConfig]:
    """The table's fused entry (also at decode, where it is not the default)."""
    decode = case.tokens <= sgmv_module.DECODE_MAX_TOKENS_PER_ROW
    return {"fused_config": sgmv_module.launch_config("fused", decode, dtype, case.out_features, case.max_rank)}


def run_and_check(
    case: Case, dtype: torch.dtype, g: torch.Generator, layout: str = "contiguous", path: str = "default", **configs
):
    """``path``: "default" (checked entry, the table's plan), "split" (the halves), "fused" (the fused
    kernel), "trusted" (lora_apply_trusted_, twice: the second call takes the cached launch)."""
    inp = make_inputs(case, dtype, g, layout)
    y_in = inp.y.clone()
    y_ref = reference_y(inp, y_in, case.rows)
    meta = build_batch_meta(case.rows, DEVICE)
    if path == "trusted":
        y_first = inp.y.clone()
        lora_apply_trusted_(y_first, inp.x, inp.a_kernel, inp.b_kernel, inp.ranks, inp.scales, meta)
        lora_apply_trusted_(inp.y, inp.x, inp.a_kernel, inp.b_kernel, inp.ranks, inp.scales, meta)
        torch.cuda.synchronize()
        assert torch.equal(y_first, inp.y), "the cached launch must compute the same bits"
    else:
        if path == "split":
            configs = {**split_configs(case, dtype), **configs}
        elif path == "fused" and case.max_rank <= sgmv_module.FUSED_MAX_RANK and dtype != torch.float32:
            configs = {**fused_config(case, dtype), **configs}
        lora_apply_triton_(inp.y, inp.x, inp.a_kernel, inp.b_kernel, inp.ranks, inp.scales, meta, **configs)
    torch.cuda.synchronize()
    assert_matches_reference(inp.y, y_in, y_ref, case.rows, case.ranks, dtype)


# The CPU grid (same names), plus sizes the interpreter cannot afford.
CASES = {
    "decode-1row": Case((1,), (0, 8), 1, 16, 16, 8),
    "decode-3rows-distinct": Case((1, 2, 3), (0, 1, 8, 16), 1, 72, 100, 16),
    "decode-7rows-mixed-ranks-and-base": Case((4, 0, 1, 4, 2, 0, 3), (0, 1, 8, 16, 64), 1, 100, 72, 64),
    "decode-7rows-one-adapter": Case((1,) * 7, (0, 16), 1, 256, 72, 16),
    "odd-tokens-one-adapter": Case((1, 1, 1), (0, 16), 5, 72, 256, 16),
    "odd-tokens-rank0-slot": Case((1, 2, 3, 2, 1, 0, 3), (0, 8, 0, 4), 5, 256, 16, 8),
    "rank1-stack": Case((1, 0, 1), (0, 1), 5, 16, 16, 1),
    "prefill-37-several": Case((2, 1, 2), (0, 64, 8), 37, 100, 100, 64),
    "prefill-37-all-distinct": Case((1, 2, 3, 4, 5, 6, 7), (0, 16, 16, 8, 1, 16, 16, 16), 37, 72, 72, 16),
    "prefill-70-one-row": Case((1,), (0, 16), 70, 256, 256, 16),
    "decode-split-k": Case((1, 2, 0, 1, 3), (0, 16, 4, 64), 1, 1100, 72, 64),
    "prefill-split-k": Case((1, 2), (0, 8, 16), 20, 2100, 100, 16),
    "all-base-rows": Case((0, 0, 0), (0, 8), 5, 16, 16, 8),
    "all-rank0-slots": Case((1, 2, 1), (0, 0, 0), 37, 16, 72, 8),
    # GPU-only sizes
    "decode-64rows-4096": Case(tuple(1 + i % 16 for i in range(64)), (0, *[16] * 16), 1, 4096, 4096, 16),
    "prefill-5rows-300-odd": Case((3, 1, 0, 2, 3), (0, 8, 64, 16), 300, 1000, 1030, 64),
    "encoder-64x128-768x3072": Case(tuple(1 + i % 16 for i in range(64)), (0, *[8] * 16), 128, 768, 3072, 8),
    "encoder-64x128-3072x768": Case(tuple(1 + i % 16 for i in range(64)), (0, *[8] * 16), 128, 3072, 768, 8),
    # Wider than one rank tile: the default plan is shrink + expand with the expand's rank loop.
    "wide-stack-r130": Case((1, 2, 0, 1), (0, 130, 7), 37, 300, 260, 130),
}


@pytest.mark.parametrize("path", ["default", "split", "fused", "trusted"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name: str, dtype: torch.dtype, path: str, gen: torch.Generator) -> None:
    run_and_check(CASES[name], dtype, gen, path=path)


@pytest.mark.parametrize("path", ["default", "split", "trusted"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("name", ["decode-7rows-mixed-ranks-and-base", "prefill-37-several", "prefill-5rows-300-odd"])
def test_strided_activations(name: str, layout: str, dtype: torch.dtype, path: str, gen: torch.Generator) -> None:
    run_and_check(CASES[name], dtype, gen, layout, path=path)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_tiles_exercise_every_loop(dtype: torch.dtype, gen: torch.Generator) -> None:
    shrink = SgmvConfig(block_m=16, block_k=16, block_n=0, block_r=16, split_k=3, num_warps=4, num_stages=2)
    expand = SgmvConfig(block_m=16, block_k=0, block_n=32, block_r=16, split_k=1, num_warps=4, num_stages=2, n_tiles=2)
    fused = SgmvConfig(block_m=16, block_k=16, block_n=16, block_r=64, split_k=1, num_warps=4, num_stages=2, n_tiles=2)
    case = Case((2, 1, 0), (0, 64, 9), 37, 100, 72, 64)
    run_and_check(case, dtype, gen, shrink_config=shrink, expand_config=expand)
    run_and_check(case, dtype, gen, fused_config=fused)


@pytest.mark.parametrize("name", ["decode-7rows-mixed-ranks-and-base", "prefill-5rows-300-odd"])
def test_unaligned_activations_take_triton_specialisation(name: str, gen: torch.Generator) -> None:
    """x and y views 2 bytes into their buffers (not 16-byte aligned): the cached launch must not
    reuse the aligned specialisation."""
    case, dtype = CASES[name], torch.bfloat16
    inp = make_inputs(case, dtype, gen)
    b, t, k = inp.x.shape
    n = inp.y.shape[2]
    x_big = torch.empty(b * t * k + 1, dtype=dtype, device=DEVICE)
    y_big = torch.empty(b * t * n + 1, dtype=dtype, device=DEVICE)
    x = x_big[1:].view(b, t, k)
    y = y_big[1:].view(b, t, n)
    assert x.data_ptr() % 16 and y.data_ptr() % 16
    x.copy_(inp.x)
    meta = build_batch_meta(case.rows, DEVICE)
    for _ in range(2):  # aligned first (compiles + caches), then unaligned, twice
        y_al = inp.y.clone()
        lora_apply_trusted_(y_al, inp.x, inp.a_kernel, inp.b_kernel, inp.ranks, inp.scales, meta)
        y.copy_(inp.y)
        lora_apply_trusted_(y, x, inp.a_kernel, inp.b_kernel, inp.ranks, inp.scales, meta)
        torch.cuda.synchronize()
        assert torch.equal(y, y_al)
    assert_matches_reference(y, inp.y, reference_y(inp, inp.y, case.rows), case.rows, case.ranks, dtype)


@pytest.mark.parametrize("name", ["decode-3rows-distinct", "prefill-37-several"])
def test_cached_launches_of_one_shape_in_every_dtype(name: str, gen: torch.Generator) -> None:
    """The same shapes in fp16, then bf16, then fp32, in one process: each dtype its own compiled
    kernel (H200 run of 2026-11-28: the cache key lacked the dtype and bf16 ran the fp16 code)."""
    case = CASES[name]
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.bfloat16):
        run_and_check(case, dtype, gen, path="trusted")


@pytest.mark.parametrize("name", ["prefill-5rows-300-odd", "decode-64rows-4096"])
def test_trusted_entry_runs_on_the_current_stream(name: str, gen: torch.Generator) -> None:
    """The cached launches (at decode: the shrink and the expand) are queued on the caller's current
    stream, after that stream's work."""
    case, dtype = CASES[name], torch.bfloat16
    inp = make_inputs(case, dtype, gen)
    meta = build_batch_meta(case.rows, DEVICE)
    y_ref = reference_y(inp, inp.y, case.rows)
    lora_apply_trusted_(inp.y.clone(), inp.x, inp.a_kernel, inp.b_kernel, inp.ranks, inp.scales, meta)  # compile
    side = torch.cuda.Stream()
    y = torch.empty_like(inp.y)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000)  # ~1 ms: a launch on the wrong stream would read y first
        y.copy_(inp.y)
        lora_apply_trusted_(y, inp.x, inp.a_kernel, inp.b_kernel, inp.ranks, inp.scales, meta)
    side.synchronize()
    assert_matches_reference(y, inp.y, y_ref, case.rows, case.ranks, dtype)


@pytest.mark.parametrize("x_dims", [3, 2])
def test_multi_lora_linear_forward(x_dims: int, gen: torch.Generator) -> None:
    """The layer's per-row fast path (lora_apply_trusted_, x passed as it is) against the reference."""
    from polylora_async._batch import BatchContext, BatchState
    from polylora_async._layer import MultiLoraLinear
    from polylora_async.adapters import LayerLora

    dtype, rows, tokens, hidden, out_f, max_rank = torch.bfloat16, 6, 5 if x_dims == 3 else 1, 96, 80, 16
    ranks_host = (0, 16, 8, 4)
    linear = torch.nn.Linear(hidden, out_f, bias=True, device=DEVICE, dtype=dtype)
    state = BatchState()
    layer = MultiLoraLinear(linear, "test", len(ranks_host), max_rank, state)
    for slot, r in enumerate(ranks_host[1:], start=1):
        a = (_randn(gen, r, hidden) / hidden**0.5).to(dtype)
        b = (_randn(gen, out_f, r) / r**0.5).to(dtype)
        layer.write_slot(slot, LayerLora(a=a, b=b, scale=0.5 * slot))
    row_slots = (1, 0, 2, 3, 1, 2)
    state.current = BatchContext(build_batch_meta(row_slots, DEVICE))
    x = _randn(gen, rows, tokens, hidden).to(dtype)
    if x_dims == 2:
        x = x[:, 0]
    with torch.inference_mode():
        for _ in range(2):  # the second call takes the cached launch
            y = layer(x)
        y_base = linear(x)
    torch.cuda.synchronize()
    y3, y_base3 = y.view(rows, tokens, out_f), y_base.view(rows, tokens, out_f)
    ref = y_base3.double()
    lora_apply_reference_(
        ref, x.reshape(rows, tokens, hidden).double(), layer.lora_a.double(), layer.lora_b.double(),
        layer._ranks_dev, layer._scales_dev, build_batch_meta(row_slots, DEVICE),
    )  # fmt: skip
    assert_matches_reference(y3, y_base3, ref, row_slots, ranks_host, dtype)


def test_shrink_then_expand(gen: torch.Generator) -> None:
    case, dtype = CASES["prefill-5rows-300-odd"], torch.bfloat16
    inp = make_inputs(case, dtype, gen)
    meta = build_batch_meta(case.rows, DEVICE)
    y_in = inp.y.clone()
    y_ref = reference_y(inp, y_in, case.rows)
    t = lora_shrink(inp.x, inp.a_kernel, inp.ranks, meta)
    lora_expand_(inp.y, t, inp.b_kernel, inp.ranks, inp.scales, meta)
    torch.cuda.synchronize()
    assert_matches_reference(inp.y, y_in, y_ref, case.rows, case.ranks, dtype)


# ---------------------------------------------------------------------------------------------------
# Serving-sized batches (the benchmark's shapes)
# ---------------------------------------------------------------------------------------------------


def test_long_decode_batch_64_distinct_adapters(gen: torch.Generator) -> None:
    """64 rows x 1 token, 4096 x 4096, 64 distinct adapters of mixed ranks, a few base rows."""
    ranks = (0, *[(1, 8, 16, 64)[s % 4] for s in range(64)])
    rows = tuple(0 if i % 13 == 5 else 1 + (i * 37) % 64 for i in range(64))
    run_and_check(Case(rows, ranks, 1, 4096, 4096, 64), torch.bfloat16, gen)


def test_prefill_batch(gen: torch.Generator) -> None:
    """16 rows x 512 tokens, 4096 x 4096, rank 16, 16 adapters (two rows share one, one base row)."""
    rows = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 1, 0)
    run_and_check(Case(rows, (0, *[16] * 16), 512, 4096, 4096, 16), torch.bfloat16, gen)


def test_mixed_batch_rows_equal_their_solo_runs(gen: torch.Generator) -> None:
    dtype = torch.bfloat16
    case = Case((2, 0, 1, 3, 1, 2), (0, 8, 16, 4), 5, 72, 100, 16)
    inp = make_inputs(case, dtype, gen)
    x = inp.x[:1].expand(len(case.rows), -1, -1).contiguous()
    y0 = inp.y[:1].expand(len(case.rows), -1, -1).contiguous()

    def run(rows: tuple[int, ...]) -> torch.Tensor:
        y = y0[: len(rows)].clone()
        # Through the public dispatcher (CUDA -> Triton), with zero-padded stacks as it promises.
        lora_apply_(
            y,
            x[: len(rows)],
            inp.a_ref,
            inp.b_ref,
            inp.ranks,
            inp.scales,
            build_batch_meta(rows, DEVICE),
        )
        return y

    solo = {slot: run((slot,))[0] for slot in range(len(case.ranks))}
    assert torch.equal(solo[0], y0[0])
    for s in range(1, 4):
        assert not torch.equal(solo[s], y0[0])
        for other in range(s + 1, 4):
            assert not torch.equal(solo[s], solo[other])
    mixed = run(case.rows)
    for row, slot in enumerate(case.rows):
        # Same tile shapes and the same reduction order per token: identical bits are expected, but
        # tf32/MMA tiling may legitimately differ with the tile's other rows; allow one bf16 ulp.
        assert torch.allclose(mixed[row].float(), solo[slot].float(), rtol=1e-2, atol=1e-2), f"row {row}"


# ---------------------------------------------------------------------------------------------------
# CUDA graphs: capture once for a batch shape, refill inputs and metadata in place, replay
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "entry", "max_rank"),
    [(1, "checked", 16), (37, "checked", 16), (1, "trusted", 16), (37, "trusted", 16), (5, "trusted", 130)],
    ids=["decode-checked", "prefill-checked", "decode-trusted", "prefill-trusted", "split-r130-trusted"],
)
def test_cuda_graph_replay_with_refilled_metadata(tokens: int, entry: str, max_rank: int, gen: torch.Generator) -> None:
    dtype, num_rows, in_f, out_f = torch.bfloat16, 8, 256, 200
    apply = lora_apply_ if entry == "checked" else lora_apply_trusted_
    wide = min(max_rank, 130)  # slot 1's rank: past one rank tile for the r130 stack
    ranks_host = (0, wide, 8, 1, 16, 0, 4, 16, 12)
    base_case = Case((1,) * num_rows, ranks_host, tokens, in_f, out_f, max_rank)
    inp = make_inputs(base_case, dtype, gen)
    y_base = inp.y.clone()  # static: the "base layer output" the graph starts from
    x = inp.x  # static input
    y = torch.empty_like(y_base)  # static output
    # Captured with ONE segment; replays below use up to 8: the grid must not depend on the slots.
    meta = build_batch_meta(base_case.rows, DEVICE)

    def step() -> None:
        y.copy_(y_base)
        apply(y, x, inp.a_kernel, inp.b_kernel, inp.ranks, inp.scales, meta)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and warm up outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    new_rows = [
        (1, 2, 3, 4, 6, 7, 8, 1),  # 7 segments, mixed ranks
        (0, 5, 2, 0, 5, 2, 8, 3),  # base rows and a rank-0 slot
        (0,) * num_rows,  # all base: nothing may change
        tuple(range(1, 9)),  # all distinct
    ]
    for rows in new_rows:
        x.copy_(_randn(gen, num_rows, tokens, in_f).to(dtype))
        y_base.copy_(_randn(gen, num_rows, tokens, out_f).to(dtype))
        new_meta = build_batch_meta(rows, DEVICE, out=meta)
        assert new_meta.device_buffer is meta.device_buffer
        graph.replay()
        torch.cuda.synchronize()
        y_ref = reference_y(inp, y_base, rows)
        assert_matches_reference(y, y_base, y_ref, rows, ranks_host, dtype)

    # A per-layer rank table refilled in place (an adapter loaded into slot 5) is seen too.
    ranks_host2 = (0, wide, 8, 1, 16, 16, 4, 16, 12)
    inp.ranks.copy_(torch.tensor(ranks_host2, dtype=torch.int32))
    inp.a_ref[5, :16] = _randn(gen, 16, in_f).to(dtype) / in_f**0.5
    inp.b_ref[5, :16] = (_randn(gen, 16, out_f) / 4).to(dtype)
    inp.a_kernel[5].copy_(inp.a_ref[5])
    inp.b_kernel[5].copy_(inp.b_ref[5])
    rows = (5, 5, 0, 1, 5, 2, 3, 4)
    build_batch_meta(rows, DEVICE, out=meta)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(y, y_base, reference_y(inp, y_base, rows), rows, ranks_host2, dtype)
