"""The runtime on task models: the model's own pad id, evaluation mode, adapters fetched by a resolver."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import torch

from polylora_async import (
    BASE_ADAPTER,
    AdapterLoadError,
    AdapterNotFoundError,
    MultiLoraModel,
    RequestTimeoutError,
    Runtime,
    RuntimeConfig,
    StoreConfig,
    WrapConfig,
)
from tests._classifiers import FAMILIES, VOCAB, save_classifier_adapters
from tests._tiny import TARGETS, TinyModel, reference, write_adapter

TOL = {"rtol": 1e-4, "atol": 1e-5}


async def test_decoder_classifier_is_padded_with_its_pad_id(tmp_path: Path) -> None:
    # LlamaForSequenceClassification reads each row's logits at its last token that is not the pad id:
    # padded with any other id, a short row would be read at a padding position.
    cset = save_classifier_adapters("llama", {"a": 3, "b": 3}, tmp_path, base_labels=3)
    assert cset.base.config.pad_token_id == FAMILIES["llama"][1] != 0
    model = MultiLoraModel(copy.deepcopy(cset.base), WrapConfig(FAMILIES["llama"][0], max_rank=8))
    g = torch.Generator().manual_seed(0)
    plan = [("a", 5), (BASE_ADAPTER, 9), ("b", 3), ("a", 12), (BASE_ADAPTER, 2)]
    rows = [(name, torch.randint(cset.base.config.pad_token_id + 1, VOCAB, (n,), generator=g)) for name, n in plan]
    async with asyncio.timeout(120), Runtime(model) as runtime:
        for name, path in cset.paths.items():
            runtime.register_adapter(name, path)
        outs = await asyncio.gather(*(runtime.submit({"input_ids": ids}, name) for name, ids in rows))
        assert runtime.statistics().batches < len(rows)  # rows of different lengths shared a batch
    for (name, ids), out in zip(rows, outs, strict=True):
        torch.testing.assert_close(out, cset.solo(name, ids), **TOL)


async def test_a_model_in_training_mode_is_served_in_evaluation_mode() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40, vocab_size=VOCAB,
        max_position_embeddings=64, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3,
    )  # fmt: skip
    bert = BertModel(config)
    assert bert.training  # how transformers builds a model from a config
    reference_model = copy.deepcopy(bert).eval()
    model = MultiLoraModel(bert, WrapConfig(["query", "value"], max_rank=4))
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, VOCAB, (n,), generator=g) for n in (4, 11, 7)]
    async with asyncio.timeout(60), Runtime(model) as runtime:
        outs = await asyncio.gather(*(runtime.submit({"input_ids": ids}) for ids in rows))
    for ids, out in zip(rows, outs, strict=True):
        with torch.no_grad():
            expected = reference_model(input_ids=ids[None]).last_hidden_state[0]
        torch.testing.assert_close(out, expected, **TOL)


def _tiny_runtime(resolver: object, **store: object) -> tuple[Runtime, TinyModel]:
    tiny = TinyModel()
    model = MultiLoraModel(tiny, WrapConfig(TARGETS, max_rank=8, num_slots=2))
    runtime = Runtime(model, RuntimeConfig(), resolver=resolver, store_config=StoreConfig(**store))  # type: ignore[arg-type]
    return runtime, tiny


async def test_resolver_fetches_unregistered_adapters_through_the_disk_cache(tmp_path: Path) -> None:
    remote = {f"r{i}": write_adapter(tmp_path / "remote", f"r{i}", seed=i, rank=1 + i % 4) for i in range(6)}
    asked: list[str] = []

    async def resolver(adapter_id: str) -> Path | None:
        asked.append(adapter_id)
        if adapter_id == "broken":
            raise OSError("the remote store is down")
        return remote.get(adapter_id)

    runtime, tiny = _tiny_runtime(resolver, disk_dir=tmp_path / "cache", cpu_bytes=0)
    ids = torch.tensor([3, 1, 4, 1, 5])
    async with asyncio.timeout(60), runtime:
        outs = await asyncio.gather(*(runtime.submit({"input_ids": ids}, name) for name in [*remote, *remote]))
        with pytest.raises(AdapterNotFoundError, match="nope"):
            await runtime.submit({"input_ids": ids}, "nope")
        with pytest.raises(AdapterLoadError) as failed:
            await runtime.submit({"input_ids": ids}, "broken")
        assert isinstance(failed.value.__cause__, OSError)
        stats = runtime.statistics().store
    for name, out in zip([*remote, *remote], outs, strict=True):
        torch.testing.assert_close(out.double(), reference(tiny, remote[name], ids), rtol=1e-5, atol=1e-5)
    assert set(remote) <= set(asked)
    # Each resolved adapter was looked up in the disk cache once and copied there (write-behind).
    assert stats.disk is not None and stats.disk.misses == len(remote) and stats.disk.loads > 0, stats.disk


async def test_a_slow_resolver_counts_against_the_request_timeout(tmp_path: Path) -> None:
    never = asyncio.Event()

    async def resolver(adapter_id: str) -> Path | None:
        await never.wait()
        return None

    runtime, _ = _tiny_runtime(resolver)
    async with asyncio.timeout(30), runtime:
        with pytest.raises(RequestTimeoutError):
            await runtime.submit({"input_ids": torch.tensor([1, 2])}, "slow", timeout=0.05)
        assert runtime.statistics().timed_out == 1


async def test_outputs_that_merely_match_the_padded_width_are_not_cut() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, vocab_size=VOCAB,
        max_position_embeddings=80, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    bert = BertModel(config).eval()
    reference_model = copy.deepcopy(bert)
    model = MultiLoraModel(bert, WrapConfig(["query", "value"], max_rank=4))
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, VOCAB, (n,), generator=g) for n in (5, 10, 60)]  # padded to 64 = hidden size
    pooled = Runtime(model, select_output=lambda out: out.pooler_output)
    async with asyncio.timeout(60), pooled:
        outs = await asyncio.gather(*(pooled.submit({"input_ids": ids}) for ids in rows))
        assert pooled.statistics().batches == 1
    for ids, out in zip(rows, outs, strict=True):
        with torch.no_grad():
            expected = reference_model(input_ids=ids[None]).pooler_output[0]
        assert out.shape == (64,)
        torch.testing.assert_close(out, expected, **TOL)


async def test_each_row_gets_its_own_heads_labels(tmp_path: Path) -> None:
    # A 16-label base head in batches padded to 16, and adapters whose heads have 3 and 7 labels.
    cset = save_classifier_adapters("bert", {"three": 3, "seven": 7}, tmp_path, base_labels=16)
    model = MultiLoraModel(copy.deepcopy(cset.base), WrapConfig(FAMILIES["bert"][0], max_rank=8))
    g = torch.Generator().manual_seed(3)
    plan = [("three", 3), (BASE_ADAPTER, 7), ("seven", 12), ("three", 16), (BASE_ADAPTER, 1), ("seven", 5)]
    rows = [(name, torch.randint(1, VOCAB, (n,), generator=g)) for name, n in plan]
    async with asyncio.timeout(120), Runtime(model) as runtime:
        for name, path in cset.paths.items():
            runtime.register_adapter(name, path)
        outs = await asyncio.gather(*(runtime.submit({"input_ids": ids}, name) for name, ids in rows))
        assert runtime.statistics().mixed_batches >= 1
    for (name, ids), out in zip(rows, outs, strict=True):
        labels = 16 if name == BASE_ADAPTER else cset.labels[name]
        assert out.shape == (labels,), (name, out.shape)
        torch.testing.assert_close(out, cset.solo(name, ids), **TOL)


async def test_distilbert_classifier_adapters_with_pre_classifier(tmp_path: Path) -> None:
    # PEFT's modules_to_save rule is a plain name suffix: DistilBERT's SEQ_CLS adapters save
    # `pre_classifier` as well as `classifier`. One adapter's head is narrower than the model's, and
    # a request may run alone: its row must still come back with its own label count.
    from peft import LoraConfig, get_peft_model
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    def build(labels: int) -> torch.nn.Module:
        torch.manual_seed(0)
        config = DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=48, max_position_embeddings=40,
            num_labels=labels, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
        )  # fmt: skip
        return DistilBertForSequenceClassification(config).eval()

    base, solo = build(4), {}
    for i, (name, labels) in enumerate((("four", 4), ("two", 2))):
        peft_model = get_peft_model(
            build(labels),
            LoraConfig(
                task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"], init_lora_weights=False
            ),
        )
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "modules_to_save" in n:
                    p.normal_(0.0, 0.3)
        peft_model.save_pretrained(str(tmp_path / name))
        solo[name] = peft_model.eval()
    model = MultiLoraModel(copy.deepcopy(base), WrapConfig(["q_lin", "v_lin"], max_rank=8))
    assert sorted(model.head_names) == ["classifier", "pre_classifier"]
    g = torch.Generator().manual_seed(4)
    rows = [(n, torch.randint(1, VOCAB, (k,), generator=g)) for n, k in (("four", 5), ("two", 9), (BASE_ADAPTER, 3))]
    async with asyncio.timeout(120), Runtime(model) as runtime:
        for name in solo:
            runtime.register_adapter(name, tmp_path / name)
        outs = await asyncio.gather(*(runtime.submit({"input_ids": ids}, name) for name, ids in rows))
        alone = await runtime.submit({"input_ids": rows[1][1]}, "two")
    with torch.no_grad():
        for (name, ids), out in [*zip(rows, outs, strict=True), (rows[1], alone)]:
            reference_model = base if name == BASE_ADAPTER else solo[name]
            torch.testing.assert_close(out, reference_model(input_ids=ids[None]).logits[0], **TOL)
