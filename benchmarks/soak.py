"""Soak test: many clients over hundreds of adapters, with faults injected; every outcome checked.

Each request's outcome is classified against what that request may legitimately get:

* ``ok``: a result, compared with an fp64 reference of that row alone with the adapter version that
  was current when it was submitted (computed from a pristine copy of the base weights);
* an expected typed error for what the request did (a malformed request: InputValidationError or
  AdapterNotFoundError; a corrupted adapter file: AdapterLoadError; a token the model raises on:
  BatchFailedError, for that request alone; a timeout: RequestTimeoutError;
  a full queue: OverloadedError; a cancelling shutdown: RuntimeClosedError; its own cancellation);
* ``wrong``: a result that differs from its reference; ``untyped``: an exception outside the
  library's hierarchy; ``unexpected``: a typed error the request had no reason to get; ``lost``: a
  request that never resolved (its client still waits when the run's deadline passes).

A run passes when wrong, untyped, unexpected and lost are all 0. ``--fault`` breaks something on
purpose to show the checks can fail: ``perturb`` changes a served base weight after the start (the
reference keeps the pristine one, so rows come out wrong), ``drop`` makes one client wait on
nothing (a lost request).

Usage::

    python benchmarks/soak.py --requests 100000 --adapters 400 --clients 128 --json out/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from polylora_async import (
    BASE_ADAPTER,
    AdapterLoadError,
    AdapterNotFoundError,
    BatchFailedError,
    InputValidationError,
    MultiLoraModel,
    OverloadedError,
    PolyLoraError,
    RequestTimeoutError,
    Runtime,
    RuntimeClosedError,
    RuntimeConfig,
    StoreConfig,
    WrapConfig,
)

VOCAB, HIDDEN, INNER, MAX_RANK = 97, 16, 24, 8
POISON = VOCAB - 1  # a valid token id on which the model raises: its request must fail alone
SHAPES = {"up": (HIDDEN, INNER), "down": (INNER, HIDDEN)}
TOL = 1e-4  # fp32 model against an fp64 reference, relative to the output's scale


class SoakModel(nn.Module):
    """Embedding -> up -> GELU -> down, per token: cheap, so the runtime's own work dominates."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.up = nn.Linear(HIDDEN, INNER)
        self.down = nn.Linear(INNER, HIDDEN)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if bool((input_ids == POISON).any()):
            raise RuntimeError("the model cannot take token POISON")
        return self.down(nn.functional.gelu(self.up(self.embed(input_ids))))


@dataclass(frozen=True)
class Version:
    """One adapter version as written to disk: its directory and the fp64 deltas of its layers."""

    path: Path
    deltas: dict[str, torch.Tensor]


def write_adapter(root: Path, name: str, seed: int) -> Version:
    """A PEFT-format adapter (the layout ``save_pretrained`` writes) and its fp64 weight deltas."""
    g = torch.Generator().manual_seed(seed)
    rank = 1 + seed % MAX_RANK
    targets = ["up", "down"] if seed % 3 else ["up"]  # some adapters cover only part of the model
    tensors, deltas = {}, {}
    for t in targets:
        fan_in, fan_out = SHAPES[t]
        a = torch.randn(rank, fan_in, generator=g) * 0.3
        b = torch.randn(fan_out, rank, generator=g) * 0.3
        tensors[f"base_model.model.{t}.lora_A.weight"] = a
        tensors[f"base_model.model.{t}.lora_B.weight"] = b
        deltas[t] = 2.0 * (b.double() @ a.double())  # lora_alpha / r = 2
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return Version(path, deltas)


class Reference:
    """fp64 outputs of one row alone, from a copy of the base weights taken before serving."""

    def __init__(self, model: SoakModel) -> None:
        self.embed = model.embed.weight.detach().double().clone()
        self.weights = {
            n: (getattr(model, n).weight.detach().double().clone(), getattr(model, n).bias.detach().double().clone())
            for n in SHAPES
        }

    def __call__(self, version: Version | None, ids: torch.Tensor) -> torch.Tensor:
        deltas = {} if version is None else version.deltas

        def linear(name: str, x: torch.Tensor) -> torch.Tensor:
            weight, bias = self.weights[name]
            return x @ (weight + deltas.get(name, 0)).T + bias

        return linear("down", nn.functional.gelu(linear("up", self.embed[ids])))


@dataclass
class SoakConfig:
    requests: int = 3000
    adapters: int = 200
    clients: int = 64
    slots: int = 8
    cpu_adapters: int = 24  # the CPU tier's room, counted in adapters of the largest rank
    max_queue: int = 256
    seed: int = 0
    zipf: float = 1.1
    fault: str | None = None  # None, "perturb" or "drop"
    deadline_s: float = 600.0


@dataclass
class SoakReport:
    submitted: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    wrong: int = 0
    untyped: int = 0
    unexpected: int = 0
    lost: int = 0
    examples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    tiers: dict[str, dict[str, int]] = field(default_factory=dict)
    resolver: bool = False

    @property
    def passed(self) -> bool:
        return self.wrong == self.untyped == self.unexpected == self.lost == 0

    def note(self, text: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(text)


class Soak:
    """One soak run: two runtimes in turn (closed by draining, then by cancelling), chaos throughout."""

    def __init__(self, config: SoakConfig, root: Path) -> None:
        self.cfg = config
        self.rng = random.Random(config.seed)
        self.report = SoakReport()
        self.remote = root / "remote"
        self.cache = root / "cache"
        self.versions: dict[str, Version] = {}
        self.names = [f"ad{i:04d}" for i in range(config.adapters)]
        for i, name in enumerate(self.names):
            self.versions[name] = write_adapter(self.remote, name, seed=i)
        # Swapped while serving: each re-registration writes a new version under a new directory.
        self.swapped = [f"swap{i}" for i in range(4)]
        self.swap_count = Counter[str]()
        for i, name in enumerate(self.swapped):
            self.versions[name] = write_adapter(self.remote, f"{name}-v0", seed=10_000 + i)
        # A corrupted file: the safetensors data is cut short.
        bad = write_adapter(self.remote, "corrupt", seed=99_999).path / "adapter_model.safetensors"
        bad.write_bytes(bad.read_bytes()[:-40])
        self.flaky_failures = Counter[str]()
        weights = [1.0 / (k + 1) ** config.zipf for k in range(len(self.names))]
        self.popularity = weights
        self.done = 0
        self.closing = False

    # -- the catalog -------------------------------------------------------------------------------

    async def resolve(self, adapter_id: str) -> Any:
        """The resolver: fetch from the "remote" directory; ``flaky*`` ids fail their first try."""
        await asyncio.sleep(0)
        if adapter_id.startswith("flaky"):
            self.flaky_failures[adapter_id] += 1
            if self.flaky_failures[adapter_id] == 1:
                raise OSError(f"remote store unavailable for {adapter_id}")
            return self.versions["ad0000"].path
        if adapter_id == "corrupt":
            return self.remote / "corrupt"
        version = self.versions.get(adapter_id)
        return None if version is None or adapter_id in self.swapped else version.path

    def runtime(self, model: MultiLoraModel, shutdown: str) -> Runtime:
        config = RuntimeConfig(max_batch_size=32, max_wait=0.001, max_queue=self.cfg.max_queue, shutdown=shutdown)  # type: ignore[arg-type]
        room = self.cfg.cpu_adapters * 4 * MAX_RANK * (HIDDEN + INNER) * 2 * 2
        store = StoreConfig(cpu_bytes=room, disk_dir=self.cache, disk_bytes=50 * room)
        self.report.resolver = True
        return Runtime(model, config, store_config=store, resolver=self.resolve)

    def register(self, runtime: Runtime) -> None:
        for name in self.swapped:
            runtime.register_adapter(name, self.versions[name].path)

    # -- requests ------------------------------------------------------------------------------------

    def ids(self) -> torch.Tensor:
        return torch.randint(
            0, POISON, (self.rng.randint(1, 24),), generator=torch.Generator().manual_seed(self.rng.randrange(1 << 30))
        )

    def pick(self) -> str:
        return self.rng.choices(self.names, weights=self.popularity)[0]

    def plan(self) -> tuple[str, Callable[[Runtime], Awaitable[None]]]:
        """Choose the next request's kind and build its coroutine."""
        roll = self.rng.random()
        kinds = [
            (0.66, "normal"), (0.08, "base"), (0.05, "cancel"), (0.05, "timeout"), (0.06, "malformed"),
            (0.03, "swap"), (0.02, "corrupt"), (0.03, "flaky"), (0.02, "poison"),
        ]  # fmt: skip
        total, kind = 0.0, "normal"
        for share, name in kinds:
            total += share
            if roll < total:
                kind = name
                break
        return kind, getattr(self, f"_{kind}")

    def check(self, kind: str, result: torch.Tensor, version: Version | None, ids: torch.Tensor) -> None:
        expected = self.reference(version, ids)
        got = result.double()
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=TOL, atol=TOL):
            self.report.wrong += 1
            err = (got - expected).abs().max().item() if got.shape == expected.shape else math.nan
            self.report.note(f"wrong {kind}: shape {tuple(got.shape)} vs {tuple(expected.shape)}, max err {err:.3g}")
        else:
            self.report.outcomes[f"{kind}:ok"] += 1

    def classify(self, kind: str, exc: BaseException, allowed: tuple[type[BaseException], ...]) -> None:
        if isinstance(exc, allowed):
            self.report.outcomes[f"{kind}:{type(exc).__name__}"] += 1
        elif isinstance(exc, RuntimeClosedError) and self.closing:
            self.report.outcomes[f"{kind}:closed"] += 1
        elif not isinstance(exc, PolyLoraError):
            self.report.untyped += 1
            self.report.note(f"untyped {kind}: {exc!r}")
        else:
            self.report.unexpected += 1
            self.report.note(f"unexpected {kind}: {exc!r} (cause {exc.__cause__!r})")

    async def run_request(self, runtime: Runtime, kind: str, body: Callable[[Runtime], Awaitable[None]]) -> None:
        try:
            await body(runtime)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # an error the request body did not expect
            self.classify(kind, exc, ())
        finally:
            self.done += 1

    async def submit_checked(
        self,
        rt: Runtime,
        kind: str,
        name: str,
        ids: torch.Tensor,
        version: Version | None,
        allowed: tuple[type[BaseException], ...] = (),
        *,
        must_fail: bool = False,
        **kwargs: Any,
    ) -> None:
        """Submit one row and classify what comes back: a result (checked) or an error."""
        try:
            out = await rt.submit({"input_ids": ids}, name, **kwargs)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.classify(kind, exc, allowed)
            return
        if must_fail:
            self.report.unexpected += 1
            self.report.note(f"a {kind} request got a result")
        else:
            self.check(kind, out, version, ids)

    async def _normal(self, rt: Runtime) -> None:
        name = self.pick()
        await self.submit_checked(rt, "normal", name, self.ids(), self.versions[name])

    async def _base(self, rt: Runtime) -> None:
        await self.submit_checked(rt, "base", BASE_ADAPTER, self.ids(), None)

    async def _cancel(self, rt: Runtime) -> None:
        name, ids = self.pick(), self.ids()
        task = asyncio.ensure_future(rt.submit({"input_ids": ids}, name))
        for _ in range(self.rng.randint(0, 3)):
            await asyncio.sleep(0)
        task.cancel()
        try:
            out = await task
        except asyncio.CancelledError:
            self.report.outcomes["cancel:cancelled"] += 1
            return
        except BaseException as exc:
            self.classify("cancel", exc, ())
            return
        self.check("cancel", out, self.versions[name], ids)  # it finished before the cancel landed

    async def _timeout(self, rt: Runtime) -> None:
        name = self.pick()
        timeout = self.rng.choice([1e-4, 5e-4, 2e-3])
        await self.submit_checked(
            rt, "timeout", name, self.ids(), self.versions[name], (RequestTimeoutError,), timeout=timeout
        )

    async def _malformed(self, rt: Runtime) -> None:
        which = self.rng.randrange(7)
        ids = self.ids()
        cases: list[tuple[Any, Any, dict[str, Any]]] = [
            ({"input_ids": ids + VOCAB}, self.pick(), {}),  # ids outside the vocabulary
            ({"input_ids": ids[:0]}, self.pick(), {}),  # empty
            ({"input_ids": ids.float()}, BASE_ADAPTER, {}),  # float ids
            ({"input_ids": ids}, 123, {}),  # adapter not a string
            ({"input_ids": ids}, "no-such-adapter", {}),  # unknown id
            ({"input_ids": ids.tolist()}, BASE_ADAPTER, {}),  # not a tensor
            ({"input_ids": ids}, BASE_ADAPTER, {"timeout": -1.0}),  # bad timeout
        ]
        inputs, adapter, kwargs = cases[which]
        nowait = not kwargs and self.rng.random() < 0.5
        allowed: tuple[type[BaseException], ...] = (InputValidationError, AdapterNotFoundError)
        try:
            if nowait:
                await rt.submit_nowait(inputs, adapter)
            else:
                await rt.submit(inputs, adapter, **kwargs)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # A full queue refuses submit_nowait before it looks at the request.
            self.classify("malformed", exc, (*allowed, OverloadedError) if nowait else allowed)
            return
        self.report.unexpected += 1
        self.report.note(f"malformed case {which} was accepted")

    async def _swap(self, rt: Runtime) -> None:
        name = self.rng.choice(self.swapped)
        if self.rng.random() < 0.2:  # a hot swap: a new version under the same id
            self.swap_count[name] += 1
            seed = 20_000 + 100 * self.swapped.index(name) + self.swap_count[name]
            version = write_adapter(self.remote, f"{name}-v{self.swap_count[name]}", seed=seed)
            rt.register_adapter(name, version.path)
            self.versions[name] = version
        # What is registered now is the version this request must get.
        await self.submit_checked(rt, "swap", name, self.ids(), self.versions[name])

    async def _corrupt(self, rt: Runtime) -> None:
        await self.submit_checked(rt, "corrupt", "corrupt", self.ids(), None, (AdapterLoadError,), must_fail=True)

    async def _poison(self, rt: Runtime) -> None:
        ids = self.ids()
        ids[self.rng.randrange(len(ids))] = POISON
        name = self.rng.choice([self.pick(), BASE_ADAPTER])
        await self.submit_checked(rt, "poison", name, ids, None, (BatchFailedError,), must_fail=True)

    async def _flaky(self, rt: Runtime) -> None:
        name = f"flaky{self.rng.randrange(20)}"
        await self.submit_checked(rt, "flaky", name, self.ids(), self.versions["ad0000"], (AdapterLoadError,))

    async def burst(self, rt: Runtime, count: int) -> None:
        """An overload burst: ``submit_nowait`` far past the queue's bound, every answer checked."""
        futures = []
        for _ in range(count):
            # Registered ids only: submit_nowait cannot wait for a resolver.
            name, ids = self.rng.choice([*self.swapped, BASE_ADAPTER]), self.ids()
            self.report.submitted += 1
            try:
                version = None if name == BASE_ADAPTER else self.versions[name]
                futures.append((version, ids, rt.submit_nowait({"input_ids": ids}, name)))
            except OverloadedError:
                self.report.outcomes["burst:OverloadedError"] += 1
                self.done += 1
            except PolyLoraError as exc:
                self.classify("burst", exc, ())
                self.done += 1
        for version, ids, future in futures:
            try:
                out = await future
            except BaseException as exc:
                self.classify("burst", exc, ())
            else:
                self.check("burst", out, version, ids)
            self.done += 1

    # -- phases ----------------------------------------------------------------------------------------

    async def phase(self, model: MultiLoraModel, requests: int, shutdown: str) -> None:
        """Serve ``requests`` from ``clients`` concurrent clients, then close with requests in flight."""
        self.closing = False
        runtime = self.runtime(model, shutdown)
        await runtime.start()
        self.register(runtime)
        issued = 0
        tail = max(1, self.cfg.clients // 2)  # requests still outstanding when aclose() starts

        async def client() -> None:
            nonlocal issued
            while issued < requests - tail:
                issued += 1
                self.report.submitted += 1
                kind, body = self.plan()
                await self.run_request(runtime, kind, body)

        clients = [asyncio.ensure_future(client()) for _ in range(self.cfg.clients)]
        bursts = asyncio.ensure_future(self.burst(runtime, 2 * self.cfg.max_queue))
        await asyncio.wait([*clients, bursts], timeout=self.cfg.deadline_s)
        if self.cfg.fault == "drop":
            self.report.submitted += 1
            clients.append(asyncio.ensure_future(asyncio.Event().wait()))  # a client that never hears back
        # Close while a last wave is in flight: drain serves it, cancel fails it with RuntimeClosedError.
        last = []
        for _ in range(tail):
            self.report.submitted += 1
            last.append(asyncio.ensure_future(self.run_request(runtime, "normal", self._normal)))
        await asyncio.sleep(0)
        self.closing = True
        await runtime.aclose()
        pending = [t for t in (*clients, bursts, *last) if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=5.0)
            for task in still:
                task.cancel()
        stats = runtime.statistics().store
        for tier in ("gpu", "cpu", "disk"):
            counters = getattr(stats, tier)
            if counters is None:
                continue
            into = self.report.tiers.setdefault(tier, Counter())
            for name in ("hits", "misses", "loads", "evictions"):
                into[name] += getattr(counters, name)

    async def run(self) -> SoakReport:
        started = time.perf_counter()
        base = SoakModel()
        self.reference = Reference(base)
        model = MultiLoraModel(base, WrapConfig(["up", "down"], max_rank=MAX_RANK, num_slots=self.cfg.slots))
        if self.cfg.fault == "perturb":
            with torch.no_grad():
                base.down.base.bias.add_(1e-2)  # the served model changes; the reference does not
        half = self.cfg.requests // 2
        await self.phase(model, half, "drain")
        await self.phase(model, self.cfg.requests - half, "cancel")
        self.report.lost = self.report.submitted - self.done
        self.report.seconds = time.perf_counter() - started
        self.report.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.report.tiers = {k: dict(v) for k, v in self.report.tiers.items()}
        return self.report


def run_soak(config: SoakConfig) -> SoakReport:
    root = Path(tempfile.mkdtemp(prefix="polylora-soak-"))
    try:
        return asyncio.run(Soak(config, root).run())
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SoakConfig()
    for f in dataclasses.fields(SoakConfig):
        if f.name == "fault":
            parser.add_argument("--fault", choices=["perturb", "drop"], default=None)
        else:
            parser.add_argument(
                f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name)
            )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    config = SoakConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SoakConfig)})
    report = run_soak(config)
    summary = {
        **dataclasses.asdict(config),
        "submitted": report.submitted,
        "lost": report.lost,
        "wrong": report.wrong,
        "untyped": report.untyped,
        "unexpected": report.unexpected,
        "seconds": round(report.seconds, 1),
        "requests_per_s": round(report.submitted / report.seconds, 1),
        "peak_rss_mib": round(report.peak_rss_mib, 1),
        "tiers": report.tiers,
        "resolver": report.resolver,
        "outcomes": dict(sorted(report.outcomes.items())),
        "examples": report.examples,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print("PASS" if report.passed else "FAIL", file=sys.stderr)
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
