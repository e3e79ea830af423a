"""Past one machine: Ray Serve replicas, each with its own Runtime, adapters multiplexed across them.

Every replica holds the base model once and serves the adapters Serve routes to it. Serve's model
multiplexing keeps a request for adapter X on a replica that already has X loaded (when one exists),
so each replica's runtime sees a few hot adapters and batches their requests together; a replica
loads an adapter on its first request for it, evicting its least recently used one beyond
``ADAPTERS_PER_REPLICA``.

A request names its adapter through Serve's multiplexed model id:

    handle.options(multiplexed_model_id="support").embed.remote([1, 2, 3])              # Python
    curl -H 'serve_multiplexed_model_id: support' -d '{"input_ids": [1, 2, 3]}' ...      # HTTP

Run ``python examples/ray_serve.py --port 8000`` (needs ``pip install 'polylora-async[ray]'``): it
starts a local Ray, writes four PEFT adapters and serves them from two replicas over HTTP on
127.0.0.1. (Ray's own services use the machine's address; set ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
to keep a local Ray on loopback.) On a cluster, adapter directories must be readable from every
node (shared storage), or the loader can download them first.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import tempfile
from collections.abc import Mapping
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo model is built from a config: never ask a hub

import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from polylora_async import AdapterNotFoundError, InputValidationError, MultiLoraModel, Runtime, WrapConfig

TARGETS = ["q_proj", "v_proj"]
VOCAB_SIZE = 256
# Adapters one replica keeps loaded: Serve's LRU bound and the runtime's device slots alike, so the
# adapters Serve routes to a replica fit its slots (the runtime's CPU tier keeps evicted ones warm).
ADAPTERS_PER_REPLICA = 3


def build_model() -> torch.nn.Module:
    """A small Llama with random weights (the same weights on every call, in every replica)."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB_SIZE,
    )
    return LlamaModel(config).eval()


def write_adapter(path: str, rank: int, seed: int) -> str:
    """Save a random LoRA adapter for :func:`build_model` with PEFT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(build_model(), lora).save_pretrained(path)
    return path


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 1})
class LoraEmbedder:
    """One replica: the base model once, a Runtime batching its requests, adapters loaded on demand.

    Args:
        adapter_dirs: adapter id -> PEFT directory (readable from the replica's node).
    """

    def __init__(self, adapter_dirs: Mapping[str, str]) -> None:
        self.adapter_dirs = dict(adapter_dirs)
        model = MultiLoraModel(build_model(), WrapConfig(TARGETS, max_rank=16, num_slots=ADAPTERS_PER_REPLICA))
        self.runtime = Runtime(model)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.loads: collections.Counter[str] = collections.Counter()  # adapter id -> loads on this replica
        self._start_lock = asyncio.Lock()
        self._running = False

    async def _started(self) -> Runtime:
        # Runtime.start() is a coroutine and __init__ is not: start on first use, once.
        async with self._start_lock:
            if not self._running:
                await self.runtime.start()
                self._running = True
        return self.runtime

    @serve.multiplexed(max_num_models_per_replica=ADAPTERS_PER_REPLICA)
    async def load_adapter(self, adapter_id: str) -> str:
        """Serve calls this on the replica's first request for ``adapter_id`` (and after an eviction)."""
        runtime = await self._started()
        if adapter_id not in self.loads:
            runtime.register_adapter(adapter_id, self.adapter_dirs[adapter_id])
        # Read, validate and copy the weights to a device slot now, so the first request does not pay.
        ref = await runtime.store.resolve(adapter_id)
        try:
            await runtime.store.ensure_gpu(ref)
        finally:
            runtime.store.release_ref(ref)
        self.loads[adapter_id] += 1
        return adapter_id

    async def embed(self, input_ids: Any) -> dict[str, Any]:
        """The mean-pooled hidden state of ``input_ids`` under the request's adapter, and who served it.

        Raises:
            AdapterNotFoundError: the request's adapter is not one of this deployment's.
            InputValidationError: ``input_ids`` is not a list of token ids.
        """
        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id not in self.adapter_dirs:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not served here")
        # An out-of-range id would fail the whole batch this request shares with others: refuse it here.
        if not isinstance(input_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < VOCAB_SIZE for t in input_ids
        ):
            raise InputValidationError(f"`input_ids` must be a list of integers in [0, {VOCAB_SIZE})")
        loads_before = self.loads[adapter_id]
        await self.load_adapter(adapter_id)
        hidden = await self.runtime.submit({"input_ids": torch.tensor(input_ids, dtype=torch.long)}, adapter_id)
        return {
            "adapter": adapter_id,
            "replica": self.replica,
            "already_loaded": self.loads[adapter_id] == loads_before,  # no load for this request
            "embedding": hidden.mean(dim=0).tolist(),
        }

    async def __call__(self, request: Request) -> Any:
        """HTTP: ``POST {"input_ids": [...]}`` with the header ``serve_multiplexed_model_id: <adapter>``."""
        try:
            body = await request.json()
            return await self.embed(body.get("input_ids") if isinstance(body, dict) else None)
        except AdapterNotFoundError as exc:
            return JSONResponse({"error": {"type": type(exc).__name__, "message": str(exc)}}, status_code=404)
        except (InputValidationError, ValueError) as exc:  # ValueError: the body is not JSON
            return JSONResponse({"error": {"type": type(exc).__name__, "message": str(exc)}}, status_code=422)

    async def __del__(self) -> None:
        # Serve awaits this when the replica stops: drain queued requests, stop the worker thread.
        await self.runtime.aclose()


def build_app(adapter_dirs: Mapping[str, str], num_replicas: int = 2) -> Any:
    """The Serve application: ``serve.run(build_app(dirs))`` returns a handle to it."""
    return LoraEmbedder.options(num_replicas=num_replicas).bind(dict(adapter_dirs))


def main(argv: list[str] | None = None) -> None:
    import ray

    parser = argparse.ArgumentParser(description="Serve LoRA adapters from Ray Serve replicas on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="polylora-ray-") as tmp:
        names = ["support", "legal", "chat", "code"]
        dirs = {name: write_adapter(os.path.join(tmp, name), 4 * (i + 1), seed=i + 1) for i, name in enumerate(names)}
        ray.init(include_dashboard=False)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app(dirs, args.replicas), name="polylora", route_prefix="/v1/embed", blocking=False)
        print(f"adapters: {', '.join(names)}. Try:")
        print(
            f"  curl -s http://127.0.0.1:{args.port}/v1/embed -H 'serve_multiplexed_model_id: support' "
            """-d '{"input_ids": [1, 2, 3]}'"""
        )
        try:
            input("Press Enter to stop.\n")
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
