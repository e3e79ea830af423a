"""The examples run and serve what PEFT computes: quickstart, web service over real HTTP, Ray Serve."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import json
import os
import socket
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from polylora_async import (
    BASE_ADAPTER,
    AdapterNotFoundError,
    InputValidationError,
    MultiLoraModel,
    RuntimeConfig,
    WrapConfig,
)
from tests._tiny import TARGETS as TINY_TARGETS
from tests._tiny import TinyModel
from tests._tiny import write_adapter as write_tiny_adapter

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOL = {"rtol": 1e-4, "atol": 1e-5}  # fp32: the runtime and PEFT differ only in summation order

pytestmark = [
    # ray.serve's config models still pass pydantic-v1-style extra keywords to `Field` at import.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
]


def _example(name: str) -> types.ModuleType:
    """Import ``examples/<name>.py`` as the top-level module ``name`` (as Ray's workers will too)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _peft_oracle(build_model: Any, paths: Mapping[str, str | Path]) -> Any:
    """One PeftModel holding every adapter, loaded by PEFT from the directories the example served."""
    from peft import PeftModel

    names = list(paths)
    oracle = PeftModel.from_pretrained(build_model(), str(paths[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        oracle.load_adapter(str(paths[name]), adapter_name=name)
    return oracle.eval()


def _solo(oracle: Any, adapter: str, ids: list[int] | torch.Tensor) -> torch.Tensor:
    """The hidden states of one row run alone through PEFT with ``adapter`` (or the base model)."""
    row = torch.as_tensor(ids, dtype=torch.long)[None]
    with torch.no_grad():
        if adapter == BASE_ADAPTER:
            with oracle.disable_adapter():
                return oracle(input_ids=row).last_hidden_state[0]
        oracle.set_adapter(adapter)
        return oracle(input_ids=row).last_hidden_state[0]


def _assert_distinct(values: Mapping[str, torch.Tensor]) -> None:
    """The oracle is only meaningful if every adapter really changes the output."""
    names = list(values)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (values[a] - values[b]).abs().max() > 1e-2, f"{a} and {b} give the same output"


# -- quickstart ----------------------------------------------------------------------------------------


async def test_quickstart_prints_each_adapters_output_and_matches_peft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    quickstart = _example("quickstart")
    # Keep the adapters it writes, to check its results against PEFT with the very same files.
    keep = types.SimpleNamespace(TemporaryDirectory=lambda: contextlib.nullcontext(str(tmp_path)))
    monkeypatch.setattr(quickstart, "tempfile", keep)
    outputs = await quickstart.main()

    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["support", "legal", BASE_ADAPTER]
    assert all("hidden state (8, 64)" in line for line in lines), lines
    assert lines[2].endswith("max change from the base model 0.000")
    oracle = _peft_oracle(quickstart.build_model, {name: tmp_path / name for name in ("support", "legal")})
    expected = {name: _solo(oracle, name, quickstart.IDS) for name in outputs}
    _assert_distinct(expected)
    for name, hidden in outputs.items():
        torch.testing.assert_close(hidden, expected[name], **TOL)


# -- web service ---------------------------------------------------------------------------------------

# Loopback only: never through a proxy the environment may name.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(method: str, url: str, body: Any = None) -> tuple[int, Any, Mapping[str, str]]:
    """One blocking HTTP request (run it in a thread): status, decoded body, headers."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(request, timeout=60) as response:
            status, raw, headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        with error:
            status, raw, headers = error.code, error.read(), error.headers
    is_json = headers.get("content-type", "").startswith("application/json")
    return status, json.loads(raw) if is_json else raw.decode(), headers


async def _post(url: str, body: Any) -> tuple[int, Any, Mapping[str, str]]:
    return await asyncio.to_thread(_http, "POST", url, body)


@contextlib.asynccontextmanager
async def _serving(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in this event loop; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        for _ in range(1000):  # readiness: bounded polling, at most ~10 s
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def _counter(text: str, name: str) -> dict[str, float]:
    """Samples of a labelled counter in a Prometheus text exposition: label value -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        next(iter(sample.labels.values())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


async def test_web_service_serves_peft_results_over_http_and_maps_errors(tmp_path: Path) -> None:
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    web = _example("web_service")
    paths = {"support": web.write_adapter(str(tmp_path / "support"), 4, seed=1)}
    paths["legal"] = web.write_adapter(str(tmp_path / "legal"), 8, seed=2)
    model = MultiLoraModel(web.build_model(), WrapConfig(web.TARGETS, max_rank=8, num_slots=2))
    app = web.create_app(model, paths)
    good = [("support", [1, 5, 9, 300]), ("legal", [7, 7, 8]), (BASE_ADAPTER, [2, 511, 4, 6, 10]), ("legal", [1, 5])]
    bad_inputs: list[Any] = [
        {"adapter": "support", "input_ids": []},
        {"adapter": "support", "input_ids": [1, "2"]},
        {"adapter": "support", "input_ids": [1, 512]},  # the vocabulary has 512 tokens
        {"adapter": "support", "input_ids": [1, True]},
        {"adapter": 5, "input_ids": [1]},
        ["support", [1, 2]],
    ]
    async with _serving(app) as url:
        answers = await asyncio.gather(
            *(_post(f"{url}/v1/embed", {"adapter": a, "input_ids": ids}) for a, ids in good)
        )
        unknown = await _post(f"{url}/v1/embed", {"adapter": "nope", "input_ids": [1, 2]})
        invalid = [await _post(f"{url}/v1/embed", body) for body in bad_inputs]
        not_json = await _post(f"{url}/v1/embed", b"{not json")
        metrics_status, metrics, metrics_headers = await asyncio.to_thread(_http, "GET", f"{url}/metrics")

    oracle = _peft_oracle(web.build_model, paths)
    expected = [_solo(oracle, adapter, ids).mean(dim=0) for adapter, ids in good]
    _assert_distinct({adapter: _solo(oracle, adapter, good[0][1]) for adapter in ["support", "legal", BASE_ADAPTER]})
    for (adapter, ids), (status, body, _), want in zip(good, answers, expected, strict=True):
        assert status == 200, body
        assert body["adapter"] == adapter and body["length"] == len(ids)
        torch.testing.assert_close(torch.tensor(body["embedding"]), want, **TOL)

    assert unknown[0] == 404 and unknown[1]["error"]["type"] == "AdapterNotFoundError", unknown
    assert "nope" in unknown[1]["error"]["message"]
    for body, (status, answer, _) in zip(bad_inputs, invalid, strict=True):
        assert status == 422 and answer["error"]["type"] == "InputValidationError", (body, answer)
    assert not_json[0] == 400, not_json

    assert metrics_status == 200 and metrics_headers["content-type"].startswith("text/plain")
    outcomes = _counter(metrics, "polylora_requests_total")
    assert outcomes["ok"] == len(good) and outcomes["error"] == 0 and outcomes["rejected"] == 0, outcomes


async def test_web_service_answers_503_when_overloaded_and_when_closed(tmp_path: Path) -> None:
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    web = _example("web_service")
    tiny = TinyModel()
    model = MultiLoraModel(tiny, WrapConfig(TINY_TARGETS, max_rank=4, num_slots=2))
    adapters = {"ad": write_tiny_adapter(tmp_path, "ad", seed=1)}
    app = web.create_app(model, adapters, config=RuntimeConfig(max_queue=1, max_inflight_batches=1))
    runtime = app.state.runtime
    async with _serving(app) as url:
        tiny.gate = threading.Event()  # the next forward pass holds the worker until the gate opens
        tiny.entered.clear()
        first = asyncio.ensure_future(_post(f"{url}/v1/embed", {"adapter": "ad", "input_ids": [1, 2, 3]}))
        assert await asyncio.to_thread(tiny.entered.wait, 30)
        queued = runtime.submit_nowait({"input_ids": torch.tensor([4, 5])})  # the queue (of one) is full now
        overloaded = await _post(f"{url}/v1/embed", {"adapter": "ad", "input_ids": [6]})
        tiny.gate.set()
        served = await first
        await queued
        metrics = (await asyncio.to_thread(_http, "GET", f"{url}/metrics"))[1]
        await runtime.aclose()
        closed = await _post(f"{url}/v1/embed", {"adapter": "ad", "input_ids": [6]})

    assert overloaded[0] == 503 and overloaded[1]["error"]["type"] == "OverloadedError", overloaded
    assert overloaded[2]["retry-after"] == "1"
    assert served[0] == 200 and served[1]["length"] == 3, served
    assert _counter(metrics, "polylora_requests_total")["rejected"] == 1
    assert closed[0] == 503 and closed[1]["error"]["type"] == "RuntimeClosedError", closed


# -- Ray Serve -----------------------------------------------------------------------------------------


def test_ray_serve_routes_each_adapter_to_a_replica_that_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On Linux, Ray replaces a node address of 127.0.0.1 with the machine's routable one (on purpose:
    # ray-project/ray#26293). This switch, read when ray is imported, keeps a local cluster on loopback
    # as on macOS: every Ray service then listens on 127.0.0.1 and all traffic stays there.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # in case ray was imported earlier
    example = _example("ray_serve")
    # One adapter more than a replica holds: in the steady state both replicas must serve.
    names = [f"adapter-{i}" for i in range(example.ADAPTERS_PER_REPLICA + 1)]
    dirs = {name: example.write_adapter(str(tmp_path / name), 2 + 2 * i, seed=i + 1) for i, name in enumerate(names)}
    oracle = _peft_oracle(example.build_model, dirs)
    rows = [[1, 2, 3, 4], [9, 8, 7], [200, 100, 50, 25, 12]]
    expected = {(name, i): _solo(oracle, name, ids).mean(dim=0) for name in names for i, ids in enumerate(rows)}
    _assert_distinct({name: expected[name, 0] for name in names})

    # Replicas import the example by module name, as this process did.
    pythonpath = os.pathsep.join(filter(None, [str(EXAMPLES), os.environ.get("PYTHONPATH")]))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 1024**2,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
    )
    try:
        serve.start(proxy_location="Disabled")  # handles only: no HTTP proxy
        handle = serve.run(example.build_app(dirs, num_replicas=2), name="polylora-test", route_prefix=None)
        assert ray.util.get_node_ip_address() == "127.0.0.1"

        def call(name: str, row: int) -> dict[str, Any]:
            answer = handle.options(multiplexed_model_id=name).embed.remote(rows[row]).result(timeout_s=60)
            torch.testing.assert_close(torch.tensor(answer["embedding"]), expected[name, row], **TOL)
            return answer

        # Warm-up: each replica loads what Serve routes to it. Routers learn which replica holds which
        # adapter through the controller (replicas push every 0.1 s), so wait, bounded, until no load
        # happened for a whole second.
        started = last_load = time.monotonic()
        while time.monotonic() - last_load < 1.0:
            assert time.monotonic() - started < 60, "adapters kept moving between replicas for 60 s"
            if not all([call(name, 0)["already_loaded"] for name in names]):
                last_load = time.monotonic()

        served_by: dict[str, set[str]] = collections.defaultdict(set)
        for repeat in range(4):
            for name in names:
                answer = call(name, (repeat + 1) % len(rows))
                assert answer["adapter"] == name
                assert answer["already_loaded"], f"{name} was routed to replica {answer['replica']}, which lacked it"
                served_by[name].add(answer["replica"])
        replicas = set().union(*served_by.values())
        assert len(replicas) == 2, served_by  # the adapters are spread over both replicas

        with pytest.raises(AdapterNotFoundError, match="unknown-adapter"):
            handle.options(multiplexed_model_id="unknown-adapter").embed.remote(rows[0]).result(timeout_s=60)
        with pytest.raises(InputValidationError, match="input_ids"):
            handle.options(multiplexed_model_id=names[0]).embed.remote([1, 256]).result(timeout_s=60)
    finally:
        serve.shutdown()
        ray.shutdown()


async def test_openai_server_answers_the_openai_client_as_peft_would(tmp_path: Path) -> None:
    # The official client over 127.0.0.1: every completion equals PEFT's greedy generation of
    # that prompt alone; streaming gives the same text chunk by chunk; errors keep OpenAI's shape.
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    openai = pytest.importorskip("openai")
    from peft import PeftModel

    server = _example("openai_server")
    paths = {"support": server.write_adapter(str(tmp_path / "support"), 4, seed=1)}
    paths["legal"] = server.write_adapter(str(tmp_path / "legal"), 8, seed=2)
    base = server.build_model()
    model = MultiLoraModel(base, WrapConfig(server.TARGETS, max_rank=8, num_slots=4))
    app = server.create_app(
        model, paths, encode=server.encode_bytes, decode=server.decode_bytes, eos_token_id=server.EOS_ID
    )
    prompts = [("support", "Hello, world"), ("legal", [72, 105, 33]), ("base", "abc"), ("legal", "The contract")]
    async with (
        asyncio.timeout(120),
        _serving(app) as url,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client,
    ):
        answers = await asyncio.gather(
            *(client.completions.create(model=m, prompt=p, max_tokens=8, temperature=0) for m, p in prompts)
        )
        chunks = [
            c.choices[0].text
            async for c in await client.completions.create(
                model="support", prompt="Hello, world", max_tokens=8, temperature=0, stream=True
            )
        ]
        listed = await client.models.list()
        with pytest.raises(openai.NotFoundError, match="nope"):
            await client.completions.create(model="nope", prompt="x", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="max_new_tokens"):
            await client.completions.create(model="support", prompt="x", max_tokens=0)
    assert sorted(m.id for m in listed.data) == ["base", "legal", "support"]
    reference_base = server.build_model()
    for (name, prompt), answer in zip(prompts, answers, strict=True):
        ids = server.encode_bytes(prompt) if isinstance(prompt, str) else prompt
        oracle = reference_base if name == "base" else PeftModel.from_pretrained(server.build_model(), paths[name])
        with torch.no_grad():
            out = oracle.generate(
                input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=8, do_sample=False, pad_token_id=server.PAD_ID, eos_token_id=server.EOS_ID,
            )  # fmt: skip
        new = out[0, len(ids) :].tolist()
        assert answer.choices[0].text == server.decode_bytes(new), name
        assert answer.usage.completion_tokens == len(new)
    assert "".join(chunks) == answers[0].choices[0].text
