"""An OpenAI-compatible completions endpoint: the request's ``model`` names the adapter.

    POST /v1/completions  {"model": "support", "prompt": "Hello", "max_tokens": 16,
                           "temperature": 0, "top_p": 1, "seed": 1, "stream": false}
                          -> 200 {"object": "text_completion", "choices": [{"text": ..., "finish_reason": ...}],
                                  "usage": {...}}
                          with "stream": true: server-sent events, one chunk per token, then "data: [DONE]"
    GET  /v1/models       the adapters served ("base" is the model without an adapter)
    GET  /metrics         the runtime's Prometheus metrics

``prompt`` is a string (encoded with the app's tokenizer) or a list of token ids. ``temperature``
0 decodes greedily (OpenAI's default is 1: sampling). Every request is one
:meth:`Runtime.generate` stream: requests for different adapters decode in the same steps.
Errors answer OpenAI's shape ``{"error": {"message", "type", "code"}}``: 400 a bad request, 404
an unknown model, 503 overloaded or closing, 504 no result in time, 500 the model failed.

Run ``python examples/openai_server.py --port 8000`` (needs ``pip install 'polylora-async[web]'``):
it builds a small byte-level Llama from a config (its "tokenizer" is UTF-8 bytes, so any text is
a prompt) and writes two PEFT adapters, then serves them on 127.0.0.1. The official client works
against it: ``openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").completions.create(
model="support", prompt="Hi", max_tokens=8)``. Use :func:`create_app` with your model, adapter
directories and tokenizer (``encode`` / ``decode`` callables, e.g. a transformers tokenizer's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo model is built from a config: never ask a hub

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from polylora_async import (
    BASE_ADAPTER,
    AdapterNotFoundError,
    InputValidationError,
    MultiLoraModel,
    RequestTimeoutError,
    Runtime,
    RuntimeClosedError,
    RuntimeConfig,
    WorkerCrashedError,
    WrapConfig,
)

BASE_NAME = "base"  # the `model` name of the base model without an adapter
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# The demo's byte-level vocabulary: 256 bytes, then padding and end of sequence.
PAD_ID, EOS_ID, VOCAB = 256, 257, 258


def encode_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode_bytes(ids: Sequence[int]) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class _BadRequest(Exception):
    pass


def create_app(
    model: MultiLoraModel,
    adapters: Mapping[str, str | os.PathLike[str]],
    *,
    encode: Callable[[str], list[int]],
    decode: Callable[[Sequence[int]], str],
    eos_token_id: int | None = None,
    config: RuntimeConfig | None = None,
    request_timeout: float = 60.0,
) -> Starlette:
    """A Starlette app serving completions for ``adapters`` (id -> PEFT directory) over ``model``.

    The app owns one :class:`Runtime` (at ``app.state.runtime``), started and closed (draining)
    with the app's lifespan. ``encode`` / ``decode`` turn text into token ids and back.
    """
    runtime = Runtime(model, config)
    for adapter_id, path in adapters.items():
        runtime.register_adapter(adapter_id, path)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with runtime:
            yield

    def parse(body: Any) -> tuple[str, list[int], dict[str, Any], bool]:
        if not isinstance(body, dict):
            raise _BadRequest("the body must be a JSON object")
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise _BadRequest("`model` must name an adapter (or 'base')")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # one prompt given as a batch of one
        if isinstance(prompt, str):
            ids = encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise _BadRequest("`prompt` must be a string or a list of token ids (one prompt per request)")
        if not ids:
            raise _BadRequest("`prompt` is empty")
        temperature = body.get("temperature", 1.0)
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))):
            raise _BadRequest("`temperature` must be a number")
        sampling: dict[str, Any] = {"max_new_tokens": body.get("max_tokens", 16), "seed": body.get("seed")}
        if temperature is not None and temperature > 0:
            sampling.update(do_sample=True, temperature=float(temperature), top_p=body.get("top_p"))
        if eos_token_id is not None:
            sampling["eos_token_id"] = eos_token_id
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _BadRequest("`stream` must be true or false")
        return (BASE_ADAPTER if name == BASE_NAME else name), ids, sampling, stream

    def completion(name: str, text: str, finish: str | None, prompt: int, generated: int, rid: str) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated},
        }

    async def completions(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "invalid_request_error", "the body is not JSON")
        try:
            adapter, ids, sampling, stream = parse(body)
            tokens = runtime.generate({"input_ids": torch.tensor(ids)}, adapter, timeout=request_timeout, **sampling)
            first = await anext(tokens, None)  # unknown adapters and bad values fail here, before any byte is sent
        except _BadRequest as exc:
            return _error(400, "invalid_request_error", str(exc))
        except InputValidationError as exc:
            return _error(400, "invalid_request_error", str(exc))
        except Exception as exc:
            return _error_for(exc)
        name, rid = body["model"], f"cmpl-{uuid.uuid4().hex}"
        generated = [] if first is None else [first]
        if not stream:
            try:
                generated += [token async for token in tokens]
            except Exception as exc:
                return _error_for(exc)
            finish = "stop" if generated and generated[-1] == eos_token_id else "length"
            return JSONResponse(completion(name, decode(generated), finish, len(ids), len(generated), rid))

        async def events() -> AsyncIterator[bytes]:
            # Text is sent as it becomes whole: a character split over tokens (UTF-8 bytes, or a
            # tokenizer's byte-level pieces) waits for its last token, then goes out at once.
            done: list[int] = []
            sent = ""
            try:
                async for token in _chain(generated, tokens):
                    done.append(token)
                    text = decode(done)
                    if text.endswith("\ufffd"):
                        continue
                    yield _event(completion(name, text[len(sent) :], None, len(ids), len(done), rid))
                    sent = text
                finish = "stop" if done and done[-1] == eos_token_id else "length"
                yield _event(completion(name, decode(done)[len(sent) :], finish, len(ids), len(done), rid))
                yield b"data: [DONE]\n\n"
            finally:
                await tokens.aclose()  # a client that hangs up frees its sequence at once

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        names = [BASE_NAME, *runtime.store.adapter_ids()]
        data = [{"id": n, "object": "model", "owned_by": "polylora"} for n in names]
        return JSONResponse({"object": "list", "data": data})

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    return app


async def _chain(first: list[int], rest: AsyncIterator[int]) -> AsyncIterator[int]:
    for token in first:
        yield token
    async for token in rest:
        yield token


def _event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _error(status: int, kind: str, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def _error_for(exc: Exception) -> JSONResponse:
    if isinstance(exc, AdapterNotFoundError):
        return _error(404, "invalid_request_error", str(exc), "model_not_found")
    if isinstance(exc, RequestTimeoutError):
        return _error(504, "timeout", str(exc))
    if isinstance(exc, (RuntimeClosedError, WorkerCrashedError)):
        return _error(503, "server_error", str(exc))
    return _error(500, "server_error", f"{type(exc).__name__}: {exc}")


def build_model() -> torch.nn.Module:
    """The demo's small byte-level Llama, built from a config (random weights, no downloads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def write_adapter(directory: str, rank: int, seed: int) -> str:
    """A PEFT LoRA adapter for :func:`build_model` with random weights, written by PEFT."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        build_model(), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    peft_model.save_pretrained(directory)
    return directory


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="OpenAI-compatible completions over many LoRA adapters.")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        specs = (("support", 4, 1), ("legal", 8, 2))
        adapters = {name: write_adapter(os.path.join(tmp, name), rank, seed) for name, rank, seed in specs}
        model = MultiLoraModel(build_model(), WrapConfig(TARGETS, max_rank=8, num_slots=4))
        app = create_app(model, adapters, encode=encode_bytes, decode=decode_bytes, eos_token_id=EOS_ID)
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="info")


if __name__ == "__main__":
    main()
