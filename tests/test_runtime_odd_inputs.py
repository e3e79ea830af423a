"""Inputs at the edges of what a model takes: its last positions, its embedding tables, inputs with no length.

Each case either runs exactly as the row alone would (checked against the model or PEFT alone)
or is refused at submit with an InputValidationError that names the input and the rule.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from polylora_async import BASE_ADAPTER, InputValidationError, MultiLoraModel, Runtime, RuntimeConfig, WrapConfig

VOCAB = 101
TOL = {"rtol": 1e-4, "atol": 1e-5}


def _bert(positions: int, **extra: Any) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40, vocab_size=VOCAB,
        max_position_embeddings=positions, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra,
    )  # fmt: skip
    return BertModel(config).eval()


async def _serve(model: torch.nn.Module, requests: list[dict[str, torch.Tensor]], **config: Any) -> list[Any]:
    wrapped = MultiLoraModel(copy.deepcopy(model), WrapConfig(["query", "value", "q_lin", "c_attn"], max_rank=4))
    async with asyncio.timeout(60), Runtime(wrapped, RuntimeConfig(max_wait=0.02, **config)) as runtime:
        outs = await asyncio.gather(*(runtime.submit(r) for r in requests), return_exceptions=True)
        assert runtime.statistics().batches < len(requests)
    return list(outs)


async def test_padding_never_passes_the_last_position() -> None:
    # 40 positions; rows of 40 and 5 tokens share a batch: padding to a multiple of 16 would be 48.
    bert = _bert(40)
    g = torch.Generator().manual_seed(1)
    requests = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=g)} for n in (40, 5, 33)]
    for request, out in zip(requests, await _serve(bert, requests), strict=True):
        with torch.no_grad():
            torch.testing.assert_close(
                out, bert(**{k: v[None] for k, v in request.items()}).last_hidden_state[0], **TOL
            )


async def test_gpt2_rows_near_its_last_position() -> None:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    gpt2 = GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=40)).eval()
    g = torch.Generator().manual_seed(2)
    requests = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=g)} for n in (36, 3, 40)]
    for request, out in zip(requests, await _serve(gpt2, requests), strict=True):
        with torch.no_grad():
            torch.testing.assert_close(
                out, gpt2(**{k: v[None] for k, v in request.items()}).last_hidden_state[0], **TOL
            )


async def test_roberta_counts_only_the_positions_it_can_use() -> None:
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    config = RobertaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40, vocab_size=VOCAB,
        max_position_embeddings=66, pad_token_id=1,
    )  # fmt: skip
    roberta = RobertaModel(config).eval()  # positions start at pad_token_id + 1 = 2: 64 usable
    model = MultiLoraModel(copy.deepcopy(roberta), WrapConfig(["query"], max_rank=4))
    async with asyncio.timeout(60), Runtime(model) as runtime:
        with pytest.raises(InputValidationError, match="length 65, above the model's 64 positions"):
            await runtime.submit({"input_ids": torch.full((65,), 5)})
        out = await runtime.submit({"input_ids": torch.full((64,), 5)})
    with torch.no_grad():
        torch.testing.assert_close(out, roberta(input_ids=torch.full((1, 64), 5)).last_hidden_state[0], **TOL)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"input_ids": torch.ones(3, dtype=torch.long), "token_type_ids": torch.tensor([0, 1, 2])},
         r"'token_type_ids' holds id 2, outside the model's token type table \[0, 2\)"),
        ({"input_ids": torch.ones(3, dtype=torch.long), "position_ids": torch.tensor([0, 1, 40])},
         r"'position_ids' holds id 40, outside the model's position table \[0, 40\)"),
        ({"inputs_embeds": torch.zeros(4, 31)}, r"'inputs_embeds' must have shape \[L, 32\] or \[1, L, 32\]"),
        ({"input_ids": torch.ones(4, dtype=torch.long), "inputs_embeds": torch.zeros(4, 32)},
         "'input_ids' and 'inputs_embeds' are given together"),
    ],
)  # fmt: skip
async def test_ids_past_their_tables_and_misshapen_embeddings_are_refused(
    inputs: dict[str, torch.Tensor], message: str
) -> None:
    model = MultiLoraModel(_bert(40), WrapConfig(["query"], max_rank=4))
    async with asyncio.timeout(60), Runtime(model) as runtime:
        with pytest.raises(InputValidationError, match=message):
            await runtime.submit(inputs)
        with pytest.raises(InputValidationError, match=message):
            runtime.submit_nowait(inputs)


async def test_a_decoder_classifier_given_only_embeddings_is_refused() -> None:
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    model = MultiLoraModel(Qwen2ForSequenceClassification(config), WrapConfig(["q_proj"], max_rank=4))
    async with asyncio.timeout(60), Runtime(model) as runtime:
        with pytest.raises(InputValidationError, match="finds from 'input_ids'; with 'inputs_embeds' alone"):
            await runtime.submit({"inputs_embeds": torch.zeros(5, 32)})


def test_models_that_read_the_pad_id_only_for_labels_need_none() -> None:
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, pad_token_id=None,
    )  # fmt: skip
    Runtime(MultiLoraModel(BartForConditionalGeneration(config), WrapConfig(["q_proj"], max_rank=4)))


async def test_image_inputs_are_batched_whole_and_each_row_gets_its_own_head(tmp_path: Path) -> None:
    # pixel_values [3, H, W] has no length: never padded; heads of 2 and 5 labels over one body.
    from peft import LoraConfig, get_peft_model
    from transformers import ViTConfig, ViTForImageClassification

    def build(labels: int) -> torch.nn.Module:
        torch.manual_seed(0)
        config = ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40, image_size=16,
            patch_size=8, num_labels=labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return ViTForImageClassification(config).eval()

    targets = r".*\.(query|value|q_proj|v_proj)"  # transformers renamed ViT's projections (5.2x)
    alone = {}
    for i, (name, labels) in enumerate((("two", 2), ("five", 5))):
        peft_model = get_peft_model(
            build(labels),
            LoraConfig(r=4, target_modules=targets, modules_to_save=["classifier"], init_lora_weights=False),
        )
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n or "modules_to_save" in n:
                    p.normal_(0.0, 0.3)
        peft_model.save_pretrained(str(tmp_path / name))
        alone[name] = peft_model.eval()
    base = build(3)
    model = MultiLoraModel(copy.deepcopy(base), WrapConfig(targets, max_rank=4))
    g = torch.Generator().manual_seed(3)
    plan = [("two", torch.randn(3, 16, 16, generator=g)) for _ in range(2)]
    plan += [("five", torch.randn(3, 16, 16, generator=g)), (BASE_ADAPTER, torch.randn(3, 16, 16, generator=g))]
    async with asyncio.timeout(60), Runtime(model, RuntimeConfig(max_wait=0.02)) as runtime:
        for name in alone:
            runtime.register_adapter(name, tmp_path / name)
        outs = await asyncio.gather(*(runtime.submit({"pixel_values": px}, name) for name, px in plan))
        assert runtime.statistics().mixed_batches >= 1
    for (name, pixels), out in zip(plan, outs, strict=True):
        with torch.no_grad():
            expected = (base if name == BASE_ADAPTER else alone[name])(pixel_values=pixels[None]).logits[0]
        torch.testing.assert_close(out, expected, **TOL)
