"""The generation engine: a running batch that sequences join and leave at any step, and sampling.

Greedy sequences are checked token for token against PEFT's own ``generate`` on each prompt
alone; sampling against an fp64 reference of the filtered distribution and by seeds.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from polylora_async import BASE_ADAPTER, InputValidationError, MultiLoraModel, WrapConfig
from polylora_async.runtime._decode import GenSequence, RunningBatch, SamplingParams, filtered_probs, sample
from tests._causal import FAMILIES, PAD, VOCAB, CausalSet, prompts, save_adapters


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def causal(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CausalSet:
    return save_adapters(request.param, {"a": 4, "b": 8}, tmp_path_factory.mktemp(request.param))


def _model(cset: CausalSet) -> MultiLoraModel:
    model = MultiLoraModel(copy.deepcopy(cset.base), WrapConfig(FAMILIES[cset.family], max_rank=8, num_slots=4))
    for name, path in cset.paths.items():
        model.load_adapter(name, path)
    return model


def _run(batch: RunningBatch, plan: list[tuple[int, GenSequence]], cancel: dict[int, GenSequence] | None = None) -> int:
    """Steps until every sequence finished; ``plan`` says at which step each joins. Returns the steps."""
    step, cancel = 0, cancel or {}
    while any(not s.finished for _, s in plan if s not in cancel.values()):
        admit = [s for join, s in plan if join == step]
        drop = [cancel[step]] if step in cancel else []
        batch.step(admit, drop)
        step += 1
        assert step < 100, "generation did not end"
    return step


def test_sequences_joining_at_any_step_match_peft_alone(causal: CausalSet) -> None:
    model = _model(causal)
    batch = RunningBatch(model, PAD)
    plan = [("a", 5, 0), (BASE_ADAPTER, 9, 0), ("b", 3, 2), ("a", 12, 4), ("b", 7, 4), (BASE_ADAPTER, 1, 5)]
    seqs = []
    for (name, _, join), prompt in zip(plan, prompts([n for _, n, _ in plan]), strict=True):
        params = SamplingParams(max_new_tokens=5 + len(prompt) % 4)
        seqs.append((name, join, GenSequence(prompt, model.slot_of(name), params)))
    _run(batch, [(join, s) for _, join, s in seqs])
    assert batch.rows == [] and batch.kv_bytes == 0
    for name, _, s in seqs:
        assert s.tokens == causal.generate(name, s.prompt, max_new_tokens=s.params.max_new_tokens, do_sample=False), (
            name
        )


def test_a_sequence_leaving_frees_its_row_and_the_padding_only_it_used(causal: CausalSet) -> None:
    model = _model(causal)
    batch = RunningBatch(model, PAD)
    pairs = zip(prompts([20, 4, 6], seed=1), ["a", "b", BASE_ADAPTER], strict=True)
    long, short, other = (GenSequence(p, model.slot_of(a), SamplingParams(max_new_tokens=12)) for p, a in pairs)
    batch.step([long, short, other], [])
    assert batch.width == 20 and len(batch.rows) == 3
    before = batch.kv_bytes
    batch.step([], [long])  # the longest row leaves: its left padding goes with it
    assert len(batch.rows) == 2 and batch.width == 6 + 1  # the next longest prompt, plus this step's token
    assert batch.kv_bytes == 2 * batch.width * batch.bytes_per_token < before
    _run(batch, [(-1, short), (-1, other)])
    for s, name in ((short, "b"), (other, BASE_ADAPTER)):
        assert s.tokens == causal.generate(name, s.prompt, max_new_tokens=12, do_sample=False)


def test_eos_ends_a_sequence_with_the_eos_token(causal: CausalSet) -> None:
    model = _model(causal)
    (prompt,) = prompts([6], seed=2)
    free = causal.generate("a", prompt, max_new_tokens=8, do_sample=False)
    eos = free[3]
    first = free.index(eos)
    batch = RunningBatch(model, PAD)
    seq = GenSequence(prompt, model.slot_of("a"), SamplingParams(max_new_tokens=8, eos_token_ids=frozenset({eos})))
    _run(batch, [(0, seq)])
    assert seq.tokens == free[: first + 1] and seq.finished


def test_seeded_sampling_does_not_depend_on_the_batch(causal: CausalSet) -> None:
    model = _model(causal)
    params = SamplingParams(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=1234)
    (prompt,) = prompts([7], seed=3)
    alone = GenSequence(prompt, model.slot_of("b"), params)
    _run(RunningBatch(model, PAD), [(0, alone)])
    crowd = [GenSequence(p, model.slot_of("a"), SamplingParams(max_new_tokens=9, do_sample=True, seed=i))
             for i, p in enumerate(prompts([4, 11, 2], seed=4))]  # fmt: skip
    batched = GenSequence(prompt, model.slot_of("b"), params)
    _run(RunningBatch(model, PAD), [(0, crowd[0]), (1, crowd[1]), (1, batched), (2, crowd[2])])
    assert batched.tokens == alone.tokens
    other_seed = GenSequence(prompt, model.slot_of("b"), SamplingParams(**{**params.__dict__, "seed": 99}))
    _run(RunningBatch(model, PAD), [(0, other_seed)])
    assert other_seed.tokens != alone.tokens  # the seed matters (8 draws from ~20 tokens)


def _reference_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    # fp64, token by token in order of probability: an independent statement of the rules.
    scores = [float(x) / temperature for x in logits.double()]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = order if top_k is None else order[:top_k]
    if top_p is not None:
        z = sum(math.exp(scores[i]) for i in keep)
        kept, mass = [], 0.0
        for i in keep:
            if mass >= top_p:
                break
            kept.append(i)
            mass += math.exp(scores[i]) / z
        keep = kept
    z = sum(math.exp(scores[i]) for i in keep)
    out = torch.zeros(len(scores), dtype=torch.float64)
    for i in keep:
        out[i] = math.exp(scores[i]) / z
    return out


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.6), (0.9, 12, 0.8), (1.0, 1, None)],
)
def test_filtered_distribution_matches_a_reference(temperature: float, top_k: int | None, top_p: float | None) -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(5)) * 3
    params = SamplingParams(max_new_tokens=1, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    got = filtered_probs(logits, params).double()
    torch.testing.assert_close(got, _reference_probs(logits, temperature, top_k, top_p), rtol=1e-5, atol=1e-6)


def test_sampling_frequencies_follow_the_distribution() -> None:
    logits = torch.randn(8, generator=torch.Generator().manual_seed(6))
    params = SamplingParams(max_new_tokens=1, do_sample=True, top_p=0.9)
    g = torch.Generator().manual_seed(7)
    draws = torch.stack([sample(logits[None], [params], [g]) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=8).double() / len(draws)
    expected = _reference_probs(logits, 1.0, None, 0.9)
    assert (freq - expected).abs().max() < 0.03  # ~4 sigma at 4,000 draws
    assert (freq[expected == 0] == 0).all()


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(8))
    params = [SamplingParams(max_new_tokens=1), SamplingParams(max_new_tokens=1, do_sample=True, top_k=1)] * 2
    assert sample(logits, params[:3], [None, torch.Generator(), None]).tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"max_new_tokens": 0}, "`max_new_tokens` must be an integer >= 1"),
        ({"max_new_tokens": 4, "temperature": 0.0}, "`temperature` must be a finite number > 0"),
        ({"max_new_tokens": 4, "top_k": 0}, "`top_k` must be an integer >= 1"),
        ({"max_new_tokens": 4, "top_p": 1.5}, r"`top_p` must be a number in \(0, 1\]"),
        ({"max_new_tokens": 4, "eos_token_id": "x"}, "`eos_token_id` must be a token id"),
        ({"max_new_tokens": 4, "seed": 1.5}, "`seed` must be an integer"),
        ({}, "`max_new_tokens` is required"),
        ({"max_new_tokens": 4, "num_beams": 2}, r"unknown generation arguments \['num_beams'\]"),
    ],
)
def test_bad_generation_arguments_are_named(arguments: dict[str, object], message: str) -> None:
    with pytest.raises(InputValidationError, match=message):
        SamplingParams.build(**arguments)


def test_generation_config_fields_are_taken_and_arguments_override_them() -> None:
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=7, do_sample=True, temperature=0.5, top_k=0, top_p=0.8, eos_token_id=[2, 5]
    )
    params = SamplingParams.build(config, temperature=0.9)
    assert params == SamplingParams(
        max_new_tokens=7, do_sample=True, temperature=0.9, top_k=None, top_p=0.8, eos_token_ids=frozenset({2, 5})
    )
