"""A web service over one shared model: Starlette + uvicorn, one Runtime started in the app's lifespan.

    POST /v1/embed   {"adapter": "support", "input_ids": [1, 2, 3]}
                     -> 200 {"adapter": "support", "length": 3, "embedding": [...]}   (mean-pooled hidden state)
    GET  /metrics    the runtime's Prometheus metrics

Errors answer ``{"error": {"type": ..., "message": ...}}``: 400 body is not JSON, 404 unknown adapter,
422 unusable input, 503 overloaded (with ``Retry-After``) or shutting down, 504 no result in time,
500 the adapter or the model failed.

Run ``python examples/web_service.py --port 8000`` (needs ``pip install 'polylora-async[web]'``): it
builds a small Llama from a config and writes three PEFT adapters, then serves them on 127.0.0.1.
Use it in your own code through :func:`create_app` with your model and adapter directories.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import AsyncIterator, Mapping
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo model is built from a config: never ask a hub

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from polylora_async import (
    BASE_ADAPTER,
    AdapterLoadError,
    AdapterNotFoundError,
    BatchFailedError,
    InputValidationError,
    MultiLoraModel,
    OverloadedError,
    Runtime,
    RuntimeClosedError,
    RuntimeConfig,
    WorkerCrashedError,
    WrapConfig,
    metrics_asgi_app,
)

# The status each runtime error answers with; the first matching class wins (subclasses first).
_STATUS: list[tuple[type[Exception], int]] = [
    (AdapterNotFoundError, 404),
    (InputValidationError, 422),
    (OverloadedError, 503),  # the bounded queue is full: back off and retry
    (RuntimeClosedError, 503),  # shutting down: another instance should take the request
    (WorkerCrashedError, 503),  # this instance is broken: take it out of rotation
    (AdapterLoadError, 500),  # the adapter's files are missing or invalid (the message names them)
    (BatchFailedError, 500),  # the model's forward pass raised
]


def create_app(
    model: MultiLoraModel,
    adapters: Mapping[str, str | os.PathLike[str]],
    *,
    config: RuntimeConfig | None = None,
    request_timeout: float = 30.0,
    vocab_size: int | None = None,
) -> Starlette:
    """A Starlette app serving ``adapters`` (id -> PEFT directory) over ``model``.

    The app owns one :class:`Runtime` (also at ``app.state.runtime``): started when the server
    starts the app's lifespan, closed (draining queued requests) when it stops. An app runs once.

    Args:
        model: the wrapped model.
        adapters: adapter id -> directory written by PEFT's ``save_pretrained``.
        config: the runtime's batching and queue bounds; a full queue answers 503.
        request_timeout: seconds a request may wait for its result before 504.
        vocab_size: token ids must lie in ``[0, vocab_size)``; default: the model config's. Checked
            here because an out-of-range id would fail the whole batch it shares with other clients.
    """
    runtime = Runtime(model, config)
    for adapter_id, path in adapters.items():
        runtime.register_adapter(adapter_id, path)  # nothing is read until first use
    if vocab_size is None:
        vocab_size = getattr(getattr(model.model, "config", None), "vocab_size", None)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with runtime:
            runtime.prefetch(list(adapters))  # warm the first adapters before traffic arrives
            yield

    async def embed(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "InvalidJSON", "the request body is not valid JSON")
        try:
            adapter, ids = _parse(body, vocab_size)
            future = runtime.submit_nowait({"input_ids": ids}, adapter)
            hidden = await asyncio.wait_for(future, request_timeout)  # on timeout, the request is withdrawn
        except TimeoutError:  # the builtin TimeoutError from Python 3.11 on
            return _error(504, "RequestTimeoutError", f"no result within {request_timeout} s")
        except Exception as exc:  # asyncio.CancelledError is not an Exception: it propagates
            for cls, status in _STATUS:
                if isinstance(exc, cls):
                    retry = {"Retry-After": "1"} if isinstance(exc, OverloadedError) else None
                    return _error(status, type(exc).__name__, str(exc), retry)
            raise
        return JSONResponse({"adapter": adapter, "length": len(ids), "embedding": hidden.mean(dim=0).tolist()})

    app = Starlette(
        routes=[
            Route("/v1/embed", embed, methods=["POST"]),
            # A plain Route (not a Mount) answers /metrics itself, without a redirect to /metrics/.
            Route("/metrics", metrics_asgi_app(runtime.metrics.registry)),
        ],
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    return app


def _parse(body: Any, vocab_size: int | None) -> tuple[str, torch.Tensor]:
    """``(adapter, input_ids)`` from a request body; raises InputValidationError naming the field."""
    if not isinstance(body, dict):
        raise InputValidationError("the body must be a JSON object")
    adapter = body.get("adapter", BASE_ADAPTER)
    if not isinstance(adapter, str) or not adapter:
        raise InputValidationError(f"`adapter` must be a non-empty string, got {adapter!r}")
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise InputValidationError("`input_ids` must be a non-empty list of integers")
    limit = vocab_size if vocab_size is not None else 2**63
    for i, token in enumerate(ids):
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < limit:
            raise InputValidationError(f"`input_ids[{i}]` must be an integer in [0, {limit}), got {token!r}")
    return adapter, torch.tensor(ids, dtype=torch.long)


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


# -- the runnable demo -------------------------------------------------------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEMO_ADAPTERS = {"support": 4, "legal": 8, "chat": 16}  # id -> rank


def build_model() -> torch.nn.Module:
    """The demo's small Llama (random weights, the same on every call)."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
    )
    return LlamaModel(config).eval()


def write_adapter(path: str, rank: int, seed: int) -> str:
    """Save a random LoRA adapter for :func:`build_model` with PEFT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(build_model(), lora).save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve LoRA adapters over HTTP on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="polylora-web-") as tmp:
        adapters = {
            name: write_adapter(os.path.join(tmp, name), rank, seed=i + 1)
            for i, (name, rank) in enumerate(DEMO_ADAPTERS.items())
        }
        model = MultiLoraModel(build_model(), WrapConfig(TARGETS, max_rank=16, num_slots=4))
        print(f"adapters: {', '.join(adapters)}. Try:")
        print(
            f"  curl -s http://127.0.0.1:{args.port}/v1/embed "
            """-d '{"adapter": "support", "input_ids": [1, 2, 3]}'"""
        )
        uvicorn.run(create_app(model, adapters), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
