"""The Triton SGMV kernels against the fp64 torch reference, in triton's interpreter (CPU CI).

The interpreter runs each program of a grid in Python (~1-2 ms per loop step), so the shapes are
small and the grid of cases is a chosen list, not a cartesian product: every axis of the test plan
(rows, tokens per row, odd hidden sizes, ranks, adapters per batch, rank-0 rows, dtypes, strided
activations, split-K and rank loops) is covered by some case.

On a machine with CUDA this file runs the same checks on the GPU instead of the interpreter: setting
TRITON_INTERPRET there would turn every kernel of the pytest process (the gpu-marked suite is
collected in the same process) into an interpreted one.
"""

from __future__ import annotations

import os

# torch does not import triton, and @triton.jit reads TRITON_INTERPRET when it decorates, which
# happens when polylora_async.kernels._sgmv_triton is first imported (lazily, on first launch) --
# after this line even if another test file imported torch or polylora_async first.
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import polylora_async.kernels as kernels  # noqa: E402
import pytest  # noqa: E402
from polylora_async.kernels import (  # noqa: E402
    LoraBatchMeta,
    SgmvConfig,
    build_batch_meta,
    lora_apply_,
    lora_apply_reference_,
    lora_apply_triton_,
    lora_apply_triton_unchecked_,
    lora_apply_trusted_,
    lora_expand_,
    lora_shrink,
)
from polylora_async.kernels import sgmv as sgmv_module  # noqa: E402
from polylora_async.kernels._launch import FastLauncher  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# Should another module have imported the kernel module before the variable was set (it is
# imported lazily, so only a direct import could), re-decorate the kernels as interpreted ones.
if not ON_GPU and "polylora_async.kernels._sgmv_triton" in sys.modules:
    _mod = sys.modules["polylora_async.kernels._sgmv_triton"]
    if not _mod.INTERPRETING:
        importlib.reload(_mod)

# ONE tolerance table: ||delta_out - delta_ref|| / ||delta_ref|| over the LoRA update of the active
# rows (delta = y_after - y_before, both in fp64; the reference runs in fp64 on the same quantised
# inputs, so only the kernel's own rounding counts). The inputs are scaled so |delta| ~ |y| ~ 1, hence
# the final rounding of y + delta costs ~1.4x one output ulp relative to |delta|.
TOLERANCES: dict[torch.dtype, float] = {
    # Interpreter: fp32 dots of <= 256 terms + one fp32 rounding: measured ~1e-7; 1e-5 leaves 100x.
    # GPU: tl.dot on fp32 runs in tf32 (operands rounded to 2^-11): ~5e-4 expected, 5e-3 allowed.
    torch.float32: 5e-3 if ON_GPU else 1e-5,
    # One round-to-nearest into fp16 (2^-11 relative, rms ~2^-11/sqrt(3) x 1.4 ~ 4e-4), plus tf32
    # for t @ B on the GPU (~4e-4): 3e-3 is ~4x the expected worst.
    torch.float16: 3e-3,
    # bf16 keeps 8 significant bits: RNE costs ~2^-9 rms relative, but the interpreter TRUNCATES
    # fp32 -> bf16 (up to 2^-8 relative, biased): measured 4e-3..1e-2 at |delta| ~ |y|; 2.5e-2.
    torch.bfloat16: 2.5e-2,
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------------------------
# Inputs and the oracle
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    rows: tuple[int, ...]  # slot of each row
    ranks: tuple[int, ...]  # rank of each slot in this layer; slot 0 = base (rank 0)
    tokens: int
    in_features: int
    out_features: int
    max_rank: int


@dataclass
class Inputs:
    y: torch.Tensor  # [B, T, out], the tensor the kernels update (maybe strided)
    x: torch.Tensor  # [B, T, in] (maybe strided)
    a_kernel: torch.Tensor  # [slots, max_rank, in], NaN past each slot's rank: must never be read
    b_kernel: torch.Tensor  # [slots, max_rank, out], NaN past each slot's rank
    a_ref: torch.Tensor  # the same with zeros past the rank (the reference's contract)
    b_ref: torch.Tensor
    ranks: torch.Tensor  # [slots] int32
    scales: torch.Tensor  # [slots] float32
    meta: LoraBatchMeta

    def reference_y(self) -> torch.Tensor:
        """y after the update, in fp64, from the torch reference on fp64 copies of the inputs."""
        y = self.y.double().contiguous()
        meta64 = build_batch_meta(self.meta.row_slots_host, "cpu")
        lora_apply_reference_(
            y, self.x.double().cpu(), self.a_ref.double().cpu(), self.b_ref.double().cpu(),
            self.ranks.cpu(), self.scales.cpu(), meta64,
        )  # fmt: skip
        return y


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """Fresh random inputs per test, reproducible from the test's id."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _strided(full: torch.Tensor, layout: str, g: torch.Generator) -> torch.Tensor:
    """The same values as ``full`` [B, T, H] in a layout that is not contiguous in B and T."""
    b, t, h = full.shape
    if layout == "contiguous":
        return full.clone()
    if layout == "strided":  # every other token of a wider buffer, padded hidden dim
        big = torch.randn(b, 2 * t, h + 3, generator=g).to(full.dtype)
        view = big[:, ::2, :h]
    elif layout == "transposed":  # stored [T, B, H]
        view = torch.randn(t, b, h, generator=g).to(full.dtype).transpose(0, 1)
    else:
        raise AssertionError(layout)
    view.copy_(full)
    return view


def _update_rms(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, case: Case) -> torch.Tensor:
    """Per-row RMS of the exact update (1 where a row gets none): [B, 1, 1]."""
    delta = torch.zeros(len(case.rows), case.tokens, case.out_features, dtype=torch.float64)
    ranks = torch.tensor(case.ranks, dtype=torch.int32)
    lora_apply_reference_(delta, x.double(), a.double(), b.double(), ranks, scales, build_batch_meta(case.rows, "cpu"))
    rms = delta.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    return torch.where(rms > 0, rms, torch.ones_like(rms)).float()


def make_inputs(case: Case, dtype: torch.dtype, g: torch.Generator, layout: str = "contiguous") -> Inputs:
    num_rows, num_slots = len(case.rows), len(case.ranks)
    t, k, n, r = case.tokens, case.in_features, case.out_features, case.max_rank
    x = torch.randn(num_rows, t, k, generator=g).to(dtype)
    if layout == "shared-x":  # one input row shared by every row (stride 0 in B), as in _layer.py
        x = x[:1].expand(num_rows, t, k)
    a = torch.randn(num_slots, r, k, generator=g) / k**0.5
    b = torch.randn(num_slots, r, n, generator=g)
    stored = [min(max(rank, 0), r) for rank in case.ranks]  # rows holding weights per slot
    for slot, rank in enumerate(stored):
        b[slot] /= max(rank, 1) ** 0.5
    scales = torch.rand(num_slots, generator=g) + 0.5
    a_kernel, b_kernel = a.clone(), b.clone()
    for slot, rank in enumerate(stored):
        a[slot, rank:] = 0.0
        b[slot, rank:] = 0.0
        a_kernel[slot, rank:] = float("nan")
        b_kernel[slot, rank:] = float("nan")
    a, b, a_kernel, b_kernel = (v.to(dtype) for v in (a, b, a_kernel, b_kernel))
    # y as large as each row's update, so the final rounding (relative to |y + delta|) costs the same
    # share of |delta| in every case; the tolerance table relies on |delta| ~ |y|.
    y = torch.randn(num_rows, t, n, generator=g) * _update_rms(x, a, b, scales, case)
    x_kernel = x.to(DEVICE) if layout == "shared-x" else _strided(x, layout, g).to(DEVICE)
    return Inputs(
        y=_strided(y.to(dtype), "contiguous" if layout == "shared-x" else layout, g).to(DEVICE),
        x=x_kernel,
        a_kernel=a_kernel.to(DEVICE),
        b_kernel=b_kernel.to(DEVICE),
        a_ref=a.to(DEVICE),
        b_ref=b.to(DEVICE),
        ranks=torch.tensor(case.ranks, dtype=torch.int32, device=DEVICE),
        scales=scales.to(DEVICE),
        meta=build_batch_meta(case.rows, DEVICE),
    )


def active_rows(case: Case) -> torch.Tensor:
    return torch.tensor([case.ranks[s] > 0 for s in case.rows], dtype=torch.bool)


def assert_matches_reference(
    y_out: torch.Tensor, y_in: torch.Tensor, y_ref: torch.Tensor, active: torch.Tensor, dtype: torch.dtype
) -> None:
    """Inactive rows bit-identical; the active rows' update within TOLERANCES[dtype]."""
    y_out, y_in = y_out.cpu(), y_in.cpu()
    for row in torch.nonzero(~active).flatten().tolist():
        assert torch.equal(y_out[row], y_in[row]), f"row {row} has rank 0 and must be bit-identical"
    if not bool(active.any()):
        return
    delta = (y_out.double() - y_in.double())[active]
    delta_ref = (y_ref - y_in.double())[active]
    assert torch.isfinite(delta).all()
    assert delta_ref.norm() > 0
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
    """``path``: "default" (the table's plan), "split" (the two halves), "fused" (the fused kernel)."""
    inp = make_inputs(case, dtype, g, layout)
    y_in = inp.y.clone()
    y_ref = inp.reference_y()
    if path == "split":
        configs = {**split_configs(case, dtype), **configs}
    elif path == "fused":
        configs = {**fused_config(case, dtype), **configs}
    lora_apply_triton_(inp.y, inp.x, inp.a_kernel, inp.b_kernel, inp.ranks, inp.scales, inp.meta, **configs)
    assert_matches_reference(inp.y, y_in, y_ref, active_rows(case), dtype)


# ---------------------------------------------------------------------------------------------------
# The grid of shapes
# ---------------------------------------------------------------------------------------------------

CASES = {
    # decode-like (T < 16): BLOCK_M=16 tiles gather rows of one adapter
    "decode-1row": Case(rows=(1,), ranks=(0, 8), tokens=1, in_features=16, out_features=16, max_rank=8),
    "decode-3rows-distinct": Case(
        rows=(1, 2, 3), ranks=(0, 1, 8, 16), tokens=1, in_features=72, out_features=100, max_rank=16
    ),
    "decode-7rows-mixed-ranks-and-base": Case(
        rows=(4, 0, 1, 4, 2, 0, 3),
        ranks=(0, 1, 8, 16, 64),
        tokens=1,
        in_features=100,
        out_features=72,
        max_rank=64,
    ),
    "decode-7rows-one-adapter": Case(
        rows=(1,) * 7, ranks=(0, 16), tokens=1, in_features=256, out_features=72, max_rank=16
    ),
    "odd-tokens-one-adapter": Case(
        rows=(1, 1, 1), ranks=(0, 16), tokens=5, in_features=72, out_features=256, max_rank=16
    ),
    "odd-tokens-rank0-slot": Case(
        rows=(1, 2, 3, 2, 1, 0, 3),
        ranks=(0, 8, 0, 4),
        tokens=5,
        in_features=256,
        out_features=16,
        max_rank=8,
    ),
    "rank1-stack": Case(rows=(1, 0, 1), ranks=(0, 1), tokens=5, in_features=16, out_features=16, max_rank=1),
    # prefill-like (T >= 16): BLOCK_M=64 tiles span row boundaries inside a segment
    "prefill-37-several": Case(
        rows=(2, 1, 2), ranks=(0, 64, 8), tokens=37, in_features=100, out_features=100, max_rank=64
    ),
    "prefill-37-all-distinct": Case(
        rows=(1, 2, 3, 4, 5, 6, 7),
        ranks=(0, 16, 16, 8, 1, 16, 16, 16),
        tokens=37,
        in_features=72,
        out_features=72,
        max_rank=16,
    ),
    "prefill-70-one-row": Case(rows=(1,), ranks=(0, 16), tokens=70, in_features=256, out_features=256, max_rank=16),
    # the default configs' split-K (decode: in >= 1024; prefill: in >= 2048), with an odd tail
    "decode-split-k": Case(
        rows=(1, 2, 0, 1, 3), ranks=(0, 16, 4, 64), tokens=1, in_features=1100, out_features=72, max_rank=64
    ),
    "prefill-split-k": Case(rows=(1, 2), ranks=(0, 8, 16), tokens=20, in_features=2100, out_features=100, max_rank=16),
    # a negative rank acts as 0; a rank above the stack's capacity as the whole stack (as in the
    # reference, which reads every row and relies on zeros past the rank)
    "negative-and-oversized-ranks": Case(
        rows=(1, 2, 0, 2, 1), ranks=(0, -1, 99), tokens=5, in_features=72, out_features=16, max_rank=8
    ),
    # nothing to do: y must stay bit-identical
    "all-base-rows": Case(rows=(0, 0, 0), ranks=(0, 8), tokens=5, in_features=16, out_features=16, max_rank=8),
    "all-rank0-slots": Case(rows=(1, 2, 1), ranks=(0, 0, 0), tokens=37, in_features=16, out_features=72, max_rank=8),
}


@pytest.mark.parametrize("path", ["default", "split", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name: str, dtype: torch.dtype, path: str, gen: torch.Generator) -> None:
    run_and_check(CASES[name], dtype, gen, path=path)


@pytest.mark.parametrize("path", ["split", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["strided", "transposed", "shared-x"])
@pytest.mark.parametrize("name", ["decode-7rows-mixed-ranks-and-base", "prefill-37-several"])
def test_strided_activations(name: str, layout: str, dtype: torch.dtype, path: str, gen: torch.Generator) -> None:
    """x and y strided in B and T (and x shared by all rows with stride 0) give the same result."""
    run_and_check(CASES[name], dtype, gen, layout, path=path)


def _random_case(seed: int) -> tuple[Case, torch.dtype, str]:
    """A random point of the grid: any rows/tokens/sizes/ranks/adapters/dtype/layout combination."""
    g = torch.Generator().manual_seed(seed)

    def pick(options: list) -> object:  # type: ignore[type-arg]
        return options[int(torch.randint(len(options), (1,), generator=g))]

    num_rows = int(pick([1, 2, 3, 5, 7]))
    num_slots = int(pick([2, 3, 5, 9]))
    max_rank = int(pick([1, 4, 8, 16, 33, 64]))
    ranks = (0, *[int(pick([0, 1, max_rank, max(1, max_rank // 2)])) for _ in range(num_slots - 1)])
    rows = tuple(int(torch.randint(num_slots, (1,), generator=g)) for _ in range(num_rows))
    case = Case(
        rows=rows,
        ranks=ranks,
        tokens=int(pick([1, 2, 5, 16, 37])),
        in_features=int(pick([16, 72, 100, 256])),
        out_features=int(pick([16, 72, 100, 256])),
        max_rank=max_rank,
    )
    return case, pick(DTYPES), str(pick(["contiguous", "strided", "transposed", "shared-x"]))  # type: ignore[return-value]


@pytest.mark.parametrize("seed", range(24))
def test_random_sweep(seed: int, gen: torch.Generator) -> None:
    case, dtype, layout = _random_case(seed)
    run_and_check(case, dtype, gen, layout, path=("default", "split", "fused")[seed % 3])


# Small tiles force every loop of every kernel to iterate: 3-way split-K with a masked tail
# (in=100 -> splits of 48, 48, 4), 4 rank chunks at rank 64 (the expand's wide-stack path),
# 16-token tiles crossing rows (T=37), output tiles of 32 in groups of 2 with a masked tail
# (out=72 -> groups of 64 and 8 columns).
SMALL_SHRINK = SgmvConfig(block_m=16, block_k=16, block_n=0, block_r=16, split_k=3, num_warps=4, num_stages=1)
SMALL_EXPAND = SgmvConfig(
    block_m=16, block_k=0, block_n=32, block_r=16, split_k=1, num_warps=4, num_stages=1, n_tiles=2
)
# The fused kernel: 7 K tiles with a masked tail (in=100), column groups of 2 x 16 (out=72 -> 3
# groups, the last one a single masked tile), rank tile 64 covering the stack.
SMALL_FUSED = SgmvConfig(
    block_m=16, block_k=16, block_n=16, block_r=64, split_k=1, num_warps=4, num_stages=1, n_tiles=2
)


@pytest.mark.parametrize("path", ["split", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_tiles_exercise_every_loop(dtype: torch.dtype, path: str, gen: torch.Generator) -> None:
    case = Case(rows=(2, 1, 0), ranks=(0, 64, 9), tokens=37, in_features=100, out_features=72, max_rank=64)
    if path == "split":
        run_and_check(case, dtype, gen, shrink_config=SMALL_SHRINK, expand_config=SMALL_EXPAND)
    else:
        run_and_check(case, dtype, gen, fused_config=SMALL_FUSED)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stack_wider_than_one_rank_tile_uses_the_halves(dtype: torch.dtype, gen: torch.Generator) -> None:
    """max_rank 130 > 128: the default plan is shrink + expand, with the expand's rank loop."""
    case = Case(rows=(1, 2, 0, 1), ranks=(0, 130, 7), tokens=3, in_features=40, out_features=40, max_rank=130)
    plan = sgmv_module._apply_plan(dtype, 4, 3, 40, 40, 3, 130, None, None, None)
    assert plan is not None and plan.fused is None and plan.expand is not None
    assert plan.expand.constexprs["ONE_RANK_TILE"] is False
    run_and_check(case, dtype, gen)


def test_plan_choice_and_config_errors() -> None:
    fused = sgmv_module._apply_plan(torch.bfloat16, 16, 512, 4096, 4096, 17, 16, None, None, None)
    assert fused is not None and fused.fused is not None and fused.shrink is None
    # Decode shapes take the two halves (the fused kernel's per-program reduction over all of `in`
    # is slower there), and so does a stack wider than one rank tile.
    split = sgmv_module._apply_plan(torch.bfloat16, 64, 1, 4096, 4096, 65, 16, None, None, None)
    assert split is not None and split.fused is None and split.shrink is not None and split.expand is not None
    wide = sgmv_module._apply_plan(torch.bfloat16, 16, 512, 4096, 4096, 17, 256, None, None, None)
    assert wide is not None and wide.fused is None
    assert sgmv_module._apply_plan(torch.bfloat16, 4, 1, 0, 16, 3, 8, None, None, None) is None
    with pytest.raises(ValueError, match="either `fused_config` or"):
        sgmv_module._apply_plan(torch.float32, 4, 1, 16, 16, 3, 8, SMALL_FUSED, SMALL_SHRINK, None)
    narrow = SgmvConfig(block_m=16, block_k=16, block_n=16, block_r=16, split_k=1, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="needs `block_r` >= max_rank 64"):
        sgmv_module._apply_plan(torch.float32, 4, 1, 16, 16, 3, 64, narrow, None, None)
    no_n = SgmvConfig(block_m=16, block_k=16, block_n=0, block_r=16, split_k=1, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="a fused config needs `block_n` > 0"):
        sgmv_module._apply_plan(torch.float32, 4, 1, 16, 16, 3, 8, no_n, None, None)


def test_more_rows_than_one_scan_block(gen: torch.Generator) -> None:
    """40 rows (segment-table scan of 64 entries), 20 adapters, decode."""
    rows = tuple((i * 7) % 21 for i in range(40))
    case = Case(rows=rows, ranks=(0, *[(s % 4 + 1) * 4 for s in range(1, 21)]), tokens=1, in_features=16,
                out_features=16, max_rank=16)  # fmt: skip
    run_and_check(case, torch.float32, gen)


# ---------------------------------------------------------------------------------------------------
# The two halves on their own
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shrink_writes_exactly_the_active_entries(dtype: torch.dtype, gen: torch.Generator) -> None:
    case = CASES["odd-tokens-rank0-slot"]
    inp = make_inputs(case, dtype, gen)
    meta = inp.meta
    config = sgmv_module.launch_config("shrink", True, dtype, case.in_features, case.max_rank)
    num_tokens = len(case.rows) * case.tokens
    poisoned = torch.full((config.split_k, num_tokens, case.max_rank), float("nan"), device=DEVICE)
    t = lora_shrink(inp.x, inp.a_kernel, inp.ranks, meta, out=poisoned)
    assert t is poisoned
    total = t.sum(0).cpu().double()
    sorted_rows = meta.sorted_rows.cpu().tolist()  # type: ignore[union-attr]
    written = torch.zeros(num_tokens, case.max_rank, dtype=torch.bool)
    for seg, (slot, count) in enumerate(zip(meta.distinct_slots, meta.segment_counts_host, strict=True)):
        start = int(meta.segment_starts[seg])  # type: ignore[index]
        rank = case.ranks[slot]
        for j, row in enumerate(sorted_rows[start : start + count]):
            p = (start + j) * case.tokens
            want = inp.x[row].double().cpu() @ inp.a_ref[slot, :rank].double().cpu().T
            got = total[p : p + case.tokens, :rank]
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
            written[p : p + case.tokens, :rank] = True
    assert torch.isfinite(total[written]).all()
    assert torch.isnan(total[~written]).all(), "shrink wrote entries of base rows, rank-0 slots or past rank"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_expand_adds_scaled_projection(dtype: torch.dtype, gen: torch.Generator) -> None:
    case = CASES["prefill-37-several"]
    inp = make_inputs(case, dtype, gen)
    y_in, y_ref = inp.y.clone(), inp.reference_y()
    # Entries the shrink does not write stay NaN: the expand must not read them.
    poisoned = torch.full((1, len(case.rows) * case.tokens, case.max_rank), float("nan"), device=DEVICE)
    t = lora_shrink(inp.x, inp.a_kernel, inp.ranks, inp.meta, out=poisoned)
    assert torch.isnan(t).any()
    lora_expand_(inp.y, t, inp.b_kernel, inp.ranks, inp.scales, inp.meta)
    assert_matches_reference(inp.y, y_in, y_ref, active_rows(case), dtype)


# ---------------------------------------------------------------------------------------------------
# Mixed batch vs each adapter alone (the PEFT-style oracle)
# ---------------------------------------------------------------------------------------------------


def test_mixed_batch_rows_equal_their_solo_runs(gen: torch.Generator) -> None:
    dtype = torch.float32
    case = Case(rows=(2, 0, 1, 3, 1, 2), ranks=(0, 8, 16, 4), tokens=5, in_features=72, out_features=100,
                max_rank=16)  # fmt: skip
    inp = make_inputs(case, dtype, gen)
    # One shared input row: every row of the batch sees it, so solo runs are comparable.
    x = inp.x[:1].expand(len(case.rows), -1, -1).contiguous()
    y0 = inp.y[:1].expand(len(case.rows), -1, -1).contiguous()

    def run(rows: tuple[int, ...]) -> torch.Tensor:
        y = y0[: len(rows)].clone()
        meta = build_batch_meta(rows, DEVICE)
        lora_apply_triton_(y, x[: len(rows)], inp.a_kernel, inp.b_kernel, inp.ranks, inp.scales, meta)
        return y

    solo = {slot: run((slot,))[0] for slot in range(len(case.ranks))}
    assert torch.equal(solo[0], y0[0])
    for s in range(1, 4):
        assert not torch.allclose(solo[s], y0[0]), f"adapter {s} changed nothing"
        for other in range(s + 1, 4):
            assert not torch.allclose(solo[s], solo[other]), f"adapters {s} and {other} agree"
    mixed = run(case.rows)
    for row, slot in enumerate(case.rows):
        assert torch.allclose(mixed[row], solo[slot], rtol=1e-5, atol=1e-5), f"row {row} (slot {slot})"


# ---------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------


def test_metadata_segments() -> None:
    meta = build_batch_meta([2, 0, 1, 2, 0, 3], "cpu")
    assert meta.distinct_slots == (2, 1, 3)
    assert meta.num_segments == 3 and meta.segment_counts_host == (2, 1, 1)
    assert meta.max_slot == 3 and meta.any_lora
    assert meta.row_slots.tolist() == [2, 0, 1, 2, 0, 3]
    assert meta.sorted_rows.tolist() == [0, 3, 2, 5, 1, 4]  # type: ignore[union-attr]
    assert meta.segment_slots.tolist() == [2, 1, 3, 0, 0, 0]  # type: ignore[union-attr]
    assert meta.segment_starts.tolist() == [0, 2, 3, 0, 0, 0]  # type: ignore[union-attr]
    assert meta.segment_counts.tolist() == [2, 1, 1, 0, 0, 0]  # type: ignore[union-attr]
    for t in (meta.row_slots, meta.sorted_rows, meta.segment_slots):
        assert t is not None and t.dtype == torch.int32 and t.shape == (6,)
    base = build_batch_meta((0, 0), "cpu")
    assert not base.any_lora and base.num_segments == 0 and base.segment_counts.tolist() == [0, 0]  # type: ignore[union-attr]


def test_metadata_accepts_cpu_tensor() -> None:
    meta = build_batch_meta(torch.tensor([1, 0, 1]), "cpu")
    assert meta.row_slots_host == (1, 0, 1) and meta.distinct_slots == (1,)


@pytest.mark.parametrize(
    ("row_slots", "match"),
    [
        ([], "at least one row"),
        ([1, -1], "must be >= 0, got -1"),
        ([1, 2.0], r"row_slots\[1\].*integer"),
        ([True], r"row_slots\[0\].*integer"),
        (["1"], r"row_slots\[0\].*integer"),
        (torch.tensor([1.0]), "integers"),
        (torch.tensor([[1]]), "1-D"),
    ],
    ids=["empty", "negative", "float", "bool", "str", "float-tensor", "2d-tensor"],
)
def test_metadata_rejects_bad_rows(row_slots: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_batch_meta(row_slots, "cpu")  # type: ignore[arg-type]


def test_metadata_refill_in_place() -> None:
    meta = build_batch_meta([1, 2, 0], "cpu")
    buffer = meta.device_buffer
    assert buffer is not None
    pointer = buffer.data_ptr()
    new = build_batch_meta([3, 3, 1], "cpu", out=meta)
    assert new.device_buffer is buffer and buffer.data_ptr() == pointer
    assert meta.row_slots.tolist() == [3, 3, 1]  # the old object's tensors are the refilled ones
    assert new.row_slots_host == (3, 3, 1) and new.distinct_slots == (3, 1)
    assert new.sorted_rows.tolist() == [0, 1, 2]  # type: ignore[union-attr]
    assert new.segment_counts.tolist() == [2, 1, 0]  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="holds metadata for 3 rows, got 2 rows"):
        build_batch_meta([1, 1], "cpu", out=meta)
    hand_built = LoraBatchMeta(3, meta.row_slots, (3, 3, 1), True, (3, 1))
    with pytest.raises(ValueError, match="no device buffer"):
        build_batch_meta([1, 1, 1], "cpu", out=hand_built)


# ---------------------------------------------------------------------------------------------------
# Host functions: argument checks, no device reads, graph-safe grid, dispatch
# ---------------------------------------------------------------------------------------------------


def _valid_args(gen: torch.Generator) -> dict[str, object]:
    inp = make_inputs(CASES["odd-tokens-rank0-slot"], torch.float32, gen)
    return {"y": inp.y, "x": inp.x, "a_stack": inp.a_ref, "b_stack": inp.b_ref, "ranks": inp.ranks,
            "scales": inp.scales, "meta": inp.meta}  # fmt: skip


@pytest.mark.parametrize(
    ("arg", "bad", "match"),
    [
        ("x", lambda a: a["x"][0], "`x` must be 3-D"),
        ("x", lambda a: a["x"].double(), "`x` must be float16, bfloat16 or float32"),
        ("y", lambda a: a["y"].half(), "`y` must have `x`'s dtype torch.float32, got torch.float16"),
        ("y", lambda a: a["y"][:, :2], r"`y` must be \[B, T, out\] with `x`'s \[B, T\]"),
        ("a_stack", lambda a: a["a_stack"][..., :8], "`a_stack` has in=8"),
        ("b_stack", lambda a: a["b_stack"][:2], r"`ranks` must have shape \(2,\)"),
        ("ranks", lambda a: a["ranks"].long(), "`ranks` must be torch.int32"),
        ("scales", lambda a: a["scales"].double(), "`scales` must be torch.float32"),
        ("scales", lambda a: a["scales"][:2], r"`scales` must have shape \(4,\)"),
        ("meta", lambda a: build_batch_meta([1, 1], DEVICE), "describes 2 rows, but the batch has 7"),
        ("meta", lambda a: build_batch_meta([5] * 7, DEVICE), "uses slot 5, but the stacks hold only 4"),
        ("meta", lambda a: LoraBatchMeta(7, a["meta"].row_slots, (1,) * 7, True, (1,)), "no segment tables"),
        ("y", lambda a: a["y"][:1].expand(7, -1, -1), "must not overlap itself"),
    ],
    ids=[
        "x-2d",
        "x-float64",
        "y-dtype",
        "y-tokens",
        "a-in",
        "b-slots",
        "ranks-int64",
        "scales-float64",
        "scales-slots",
        "meta-rows",
        "meta-slot-range",
        "meta-hand-built",
        "y-overlaps",
    ],
)
def test_host_checks_name_the_argument(arg: str, bad, match: str, gen: torch.Generator) -> None:  # type: ignore[no-untyped-def]
    args = _valid_args(gen)
    args[arg] = bad(args)
    with pytest.raises(ValueError, match=match):
        lora_apply_triton_(**args)  # type: ignore[arg-type]


def test_expand_checks_t(gen: torch.Generator) -> None:
    a = _valid_args(gen)
    with pytest.raises(ValueError, match="`t` must have shape"):
        t = torch.zeros(1, 3, 8, device=DEVICE)
        lora_expand_(a["y"], t, a["b_stack"], a["ranks"], a["scales"], a["meta"])  # type: ignore[arg-type]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="`n_tiles` must be >= 0, got -1"):
        SgmvConfig(block_m=16, block_k=16, block_n=16, block_r=16, split_k=1, num_warps=4, num_stages=1, n_tiles=-1)
    with pytest.raises(ValueError, match="`block_m` must be 0 \\(unused\\) or a power of two >= 16, got 8"):
        SgmvConfig(block_m=8, block_k=16, block_n=0, block_r=16, split_k=1, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="`split_k` must be >= 1, got 0"):
        SgmvConfig(block_m=16, block_k=16, block_n=0, block_r=16, split_k=0, num_warps=4, num_stages=1)


class _RecordingKernel:
    """Stands in for a @triton.jit kernel: records the grid and the scalar arguments."""

    def __init__(self) -> None:
        self.grids: list[tuple[object, ...]] = []

    def __getitem__(self, grid: tuple[object, ...]):  # type: ignore[no-untyped-def]
        self.grids.append(grid)
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("path", ["default", "split"])
def test_launch_reads_no_device_values_and_grid_ignores_slots(
    monkeypatch: pytest.MonkeyPatch, gen: torch.Generator, path: str
) -> None:
    """The host path never reads a device value, and its grid depends on the batch shape only."""
    module = sgmv_module._require_kernels()
    recorders = {name: _RecordingKernel() for name in ("fused", "shrink", "expand")}
    for name, recorder in recorders.items():
        monkeypatch.setattr(module, f"_sgmv_{name}_kernel", recorder)
    case = CASES["prefill-37-all-distinct"]
    inp = make_inputs(case, torch.bfloat16, gen)
    metas = [inp.meta, build_batch_meta([1] * 7, DEVICE), build_batch_meta([3, 0, 3, 2, 0, 0, 7], DEVICE)]
    configs = split_configs(case, torch.bfloat16) if path == "split" else {}

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the host path read a device value (device -> host sync)")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
            patch.setattr(torch.Tensor, name, forbidden)
        for meta in metas:
            lora_apply_triton_(inp.y, inp.x, inp.a_kernel, inp.b_kernel, inp.ranks, inp.scales, meta, **configs)
            lora_apply_triton_unchecked_(inp.y, inp.x, inp.a_kernel, inp.b_kernel, inp.ranks, inp.scales, meta)
    launched = ["shrink", "expand"] if path == "split" else ["fused"]
    for name, recorder in recorders.items():
        # The unchecked entry always takes the default (fused) plan: 3 launches of it either way.
        expected = 3 * (name in launched) + 3 * (name == "fused")
        assert len(recorder.grids) == expected, name
        grids = recorder.grids
        assert all(isinstance(v, int) for grid in grids for v in grid)
        assert len(set(grids)) <= 1, "the grid must not depend on which slot each row uses"


def test_grid_bound_covers_every_tile() -> None:
    """The host's tile bound is >= the real tile count for every way to split B rows into segments."""
    for num_rows in (1, 3, 7, 16):
        for tokens in (1, 5, 16, 37, 64, 70):
            for block_m in (16, 64):
                for counts in ([num_rows], [1] * num_rows, [num_rows - num_rows // 2, num_rows // 2]):
                    real = sum(-(-c * tokens // block_m) for c in counts if c)
                    assert sgmv_module._num_m_tiles(num_rows, tokens, block_m, num_rows + 1) >= real


def test_launch_config_is_keyed_on_shape_class() -> None:
    decode = sgmv_module.launch_config("shrink", True, torch.bfloat16, 4096, 16)
    prefill = sgmv_module.launch_config("shrink", False, torch.bfloat16, 4096, 16)
    assert decode.split_k > 1 and decode.block_m == 16 and prefill.block_m == 64
    assert sgmv_module.launch_config("expand", True, torch.bfloat16, 4096, 64).block_r == 64
    assert sgmv_module.launch_config("expand", True, torch.bfloat16, 4096, 1).block_r == 16
    assert sgmv_module.launch_config("shrink", True, torch.bfloat16, 4096, 16) is decode  # cached
    for decode_like in (True, False):
        fused = sgmv_module.launch_config("fused", decode_like, torch.bfloat16, 4096, 64)
        assert fused.block_k > 0 and fused.block_n > 0 and fused.block_r == 64 and fused.split_k == 1
    with pytest.raises(ValueError, match="`op` must be"):
        sgmv_module.launch_config("gather", True, torch.bfloat16, 4096, 16)  # type: ignore[arg-type]


def test_dispatch(monkeypatch: pytest.MonkeyPatch, gen: torch.Generator) -> None:
    calls: list[str] = []
    monkeypatch.setattr(kernels, "lora_apply_triton_", lambda *a: calls.append("triton"))
    monkeypatch.setattr(kernels, "lora_apply_reference_", lambda *a: calls.append("reference"))
    inp = make_inputs(CASES["decode-1row"], torch.float32, gen)
    args = (inp.y.cpu(), inp.x.cpu(), inp.a_ref.cpu(), inp.b_ref.cpu(), inp.ranks.cpu(), inp.scales.cpu(),
            build_batch_meta((1,), "cpu"))  # fmt: skip
    monkeypatch.delenv("POLYLORA_KERNELS", raising=False)
    lora_apply_(*args)
    monkeypatch.setenv("POLYLORA_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    lora_apply_(*args)
    lora_apply_(args[0].double(), args[1].double(), args[2].double(), args[3].double(), *args[4:])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    lora_apply_(*args)
    assert calls == ["reference", "triton", "reference", "reference"]


def test_dispatch_runs_the_interpreted_kernels(monkeypatch: pytest.MonkeyPatch, gen: torch.Generator) -> None:
    """Through the public entry point, on CPU tensors, with both variables set."""
    if ON_GPU:
        monkeypatch.setattr(kernels, "_cpu_uses_triton", lambda: True)
    monkeypatch.setenv("POLYLORA_KERNELS", "triton")
    case = CASES["decode-3rows-distinct"]
    inp = make_inputs(case, torch.float16, gen)
    y_in, y_ref = inp.y.clone(), inp.reference_y()
    lora_apply_(inp.y, inp.x, inp.a_kernel, inp.b_kernel, inp.ranks, inp.scales, inp.meta)
    assert_matches_reference(inp.y, y_in, y_ref, active_rows(case), torch.float16)


def test_import_without_triton_falls_back_to_reference() -> None:
    code = (
        "import os, sys\n"
        "sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "os.environ['TRITON_INTERPRET'] = '1'; os.environ['POLYLORA_KERNELS'] = 'triton'\n"
        "import torch\n"
        "import polylora_async.kernels as k\n"
        "assert not k.triton_available()\n"
        "y = torch.zeros(1, 2, 4); x = torch.ones(1, 2, 3)\n"
        "a = torch.ones(2, 1, 3); b = torch.ones(2, 1, 4)\n"
        "k.lora_apply_(y, x, a, b, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0.0, 0.5]),\n"
        "              k.build_batch_meta([1], 'cpu'))\n"
        "assert torch.equal(y, torch.full((1, 2, 4), 1.5)), y\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------
# The trusted entry points (what MultiLoraLinear calls)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["decode-7rows-mixed-ranks-and-base", "prefill-37-several", "all-base-rows"])
def test_unchecked_entry_matches_the_checked_one(name: str, gen: torch.Generator) -> None:
    """Same kernels, same plan: bit-identical results."""
    inp = make_inputs(CASES[name], torch.float16, gen)
    y_checked = inp.y.clone()
    lora_apply_triton_(y_checked, inp.x, inp.a_kernel, inp.b_kernel, inp.ranks, inp.scales, inp.meta)
    lora_apply_triton_unchecked_(inp.y, inp.x, inp.a_kernel, inp.b_kernel, inp.ranks, inp.scales, inp.meta)
    assert torch.equal(inp.y, y_checked)


def test_trusted_dispatch_falls_back_to_the_checked_entry(
    monkeypatch: pytest.MonkeyPatch, gen: torch.Generator
) -> None:
    """Off CUDA (and on dtype mismatches) lora_apply_trusted_ is lora_apply_, checks included."""
    calls: list[str] = []
    monkeypatch.setattr(kernels, "lora_apply_triton_unchecked_", lambda *a: calls.append("unchecked"))
    inp = make_inputs(CASES["decode-3rows-distinct"], torch.float32, gen)
    args = (inp.y.cpu(), inp.x.cpu(), inp.a_ref.cpu(), inp.b_ref.cpu(), inp.ranks.cpu(), inp.scales.cpu(),
            build_batch_meta((1, 2, 3), "cpu"))  # fmt: skip
    monkeypatch.delenv("POLYLORA_KERNELS", raising=False)
    y_ref = args[0].clone()
    lora_apply_(y_ref, *args[1:])
    lora_apply_trusted_(*args)
    assert torch.equal(args[0], y_ref) and calls == []
    with pytest.raises(ValueError, match="`y` must have `x`'s dtype"):
        monkeypatch.setenv("POLYLORA_KERNELS", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        lora_apply_trusted_(args[0].half(), *args[1:])


# ---------------------------------------------------------------------------------------------------
# FastLauncher: the cached launch path, with stand-ins for tensors and triton's objects
# ---------------------------------------------------------------------------------------------------


BF16 = torch.bfloat16


class _FakeTensor:
    is_cuda = True

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def data_ptr(self) -> int:
        return self.ptr


class _FakeCompiled:
    function = "cu-function"
    packed_metadata = ("packed",)

    def __init__(self) -> None:
        self.runs: list[tuple[object, ...]] = []

    def run(self, *args: object) -> None:
        self.runs.append(args)


class _FakeJit:
    """A @triton.jit stand-in: two pointers, two ints, two constexprs; counts the slow launches."""

    arg_names = ("p0", "p1", "n0", "n1", "BLOCK", "FLAG")

    def __init__(self) -> None:
        self.slow: list[tuple[object, ...]] = []
        self.compiled: list[_FakeCompiled] = []

    def __getitem__(self, grid: tuple[int, ...]):  # type: ignore[no-untyped-def]
        def run(*args: object, **kwargs: object) -> _FakeCompiled:
            self.slow.append((grid, args, kwargs))
            self.compiled.append(_FakeCompiled())
            return self.compiled[-1]

        return run


class _HookChain:
    """triton's HookChain: never None, a list of calls (empty unless a profiler added one)."""

    def __init__(self) -> None:
        self.calls: list[object] = []


class _Knobs:
    def __init__(self) -> None:
        self.launch_enter_hook = _HookChain()
        self.launch_exit_hook = _HookChain()


def _launcher(kernel: _FakeJit, enabled: bool = True) -> FastLauncher:
    launcher = FastLauncher(lambda: kernel, enabled=enabled)
    launcher._stream_of = lambda device: 1000 + device
    launcher._device_getter = lambda: 3
    return launcher


def test_fast_launcher_caches_a_specialisation_and_launches_it_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = _FakeJit()
    launcher = _launcher(kernel)
    monkeypatch.setattr("polylora_async.kernels._launch._runtime_knobs", lambda: _Knobs())
    tensors = (_FakeTensor(4096), _FakeTensor(8192))
    constexprs = {"BLOCK": 16, "FLAG": False}
    launcher.launch(7, tensors, (5, 64), constexprs, (4, 2), BF16)  # type: ignore[arg-type]
    assert len(kernel.slow) == 1
    grid, args, kwargs = kernel.slow[0]
    assert grid == (7,) and args == (*tensors, 5, 64)
    assert kwargs == {"BLOCK": 16, "FLAG": False, "num_warps": 4, "num_stages": 2}
    launcher.launch(9, (_FakeTensor(16), _FakeTensor(32)), (5, 64), constexprs, (4, 2), BF16)  # type: ignore[arg-type]
    assert len(kernel.slow) == 1, "the second call must not go through kernel[grid]"
    (run,) = kernel.compiled[0].runs
    # grid, stream of the current device, function, packed metadata, no launch metadata or hooks,
    # then the pointers as integers, the ints, the constexprs in signature order.
    assert run == (9, 1, 1, 1003, "cu-function", ("packed",), None, None, None, 16, 32, 5, 64, 16, False)
    # Another integer value (another specialisation) or other options compile again.
    launcher.launch(9, tensors, (6, 64), constexprs, (4, 2), BF16)  # type: ignore[arg-type]
    launcher.launch(9, tensors, (5, 64), constexprs, (8, 2), BF16)  # type: ignore[arg-type]
    launcher.launch(9, tensors, (5, 64), {"BLOCK": 32, "FLAG": False}, (4, 2), BF16)  # type: ignore[arg-type]
    assert len(kernel.slow) == 4
    # Another dtype of the same shapes is another specialisation (an H200 run found a bf16 call
    # served by the fp16 compilation when the key lacked it).
    launcher.launch(9, tensors, (5, 64), constexprs, (4, 2), torch.float16)  # type: ignore[arg-type]
    assert len(kernel.slow) == 5
    launcher.launch(9, tensors, (5, 64), constexprs, (4, 2), torch.float16)  # type: ignore[arg-type]
    assert len(kernel.slow) == 5 and len(kernel.compiled[-1].runs) == 1


def test_fast_launcher_leaves_unusual_calls_to_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    knobs = _Knobs()
    monkeypatch.setattr("polylora_async.kernels._launch._runtime_knobs", lambda: knobs)
    constexprs = {"BLOCK": 16, "FLAG": False}
    aligned = (_FakeTensor(4096), _FakeTensor(8192))
    # A pointer that is not 16-byte aligned: triton must specialise it itself, every time.
    kernel = _FakeJit()
    launcher = _launcher(kernel)
    for _ in range(2):
        launcher.launch(1, (_FakeTensor(4096), _FakeTensor(8194)), (5, 64), constexprs, (4, 2), BF16)  # type: ignore[arg-type]
    assert len(kernel.slow) == 2
    # Disabled (POLYLORA_FAST_LAUNCH=0).
    kernel = _FakeJit()
    launcher = _launcher(kernel, enabled=False)
    for _ in range(2):
        launcher.launch(1, aligned, (5, 64), constexprs, (4, 2), BF16)  # type: ignore[arg-type]
    assert len(kernel.slow) == 2
    # A launch hook (a profiler's, in the chain or set directly) must see every launch.
    for hook in ("chain", "plain"):
        kernel = _FakeJit()
        launcher = _launcher(kernel)
        if hook == "chain":
            knobs.launch_exit_hook.calls.append(print)
        else:
            knobs.launch_enter_hook = print  # type: ignore[assignment]
        for _ in range(2):
            launcher.launch(1, aligned, (5, 64), constexprs, (4, 2), BF16)  # type: ignore[arg-type]
        assert len(kernel.slow) == 2
        knobs.launch_enter_hook, knobs.launch_exit_hook = _HookChain(), _HookChain()
    # Constexprs that are not the trailing parameters in this order cannot be appended blindly.
    kernel = _FakeJit()
    launcher = _launcher(kernel)
    for _ in range(2):
        launcher.launch(1, aligned, (5, 64), {"FLAG": False, "BLOCK": 16}, (4, 2), BF16)  # type: ignore[arg-type]
    assert len(kernel.slow) == 2
    # A swapped kernel object (a test's monkeypatch) is never served from the old one's cache.
    first, second = _FakeJit(), _FakeJit()
    current = [first]
    launcher = FastLauncher(lambda: current[0], enabled=True)
    launcher._stream_of, launcher._device_getter = (lambda device: 0), (lambda: 0)
    launcher.launch(1, aligned, (5, 64), constexprs, (4, 2), BF16)  # type: ignore[arg-type]
    current[0] = second
    launcher.launch(1, aligned, (5, 64), constexprs, (4, 2), BF16)  # type: ignore[arg-type]
    assert len(first.slow) == len(second.slow) == 1


def test_fast_launch_env_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYLORA_FAST_LAUNCH", "0")
    assert not FastLauncher(lambda: None)._enabled
    monkeypatch.delenv("POLYLORA_FAST_LAUNCH")
    assert FastLauncher(lambda: None)._enabled
