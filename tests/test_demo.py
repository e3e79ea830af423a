"""The demo's command line: bad arguments fail at once in one line, and a short real run verifies everything."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import polylora_async._demo as demo
from polylora_async.__main__ import main
from tests._models import tiny_llama

# Parsing and checking need no model: far below the seconds a model build and adapter writes take.
QUICK_S = 2.0


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the demo starts building a model or writing adapters."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the demo started working before rejecting its arguments")

    monkeypatch.setattr(demo, "_build_model", refuse)
    monkeypatch.setattr(demo, "_write_adapters", refuse)


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rejected(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command line in-process; assert exit status 2, quickly; return its one stderr line."""
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    elapsed = time.perf_counter() - t0
    assert exit_info.value.code == 2
    assert elapsed < QUICK_S, f"took {elapsed:.2f} s to reject {argv}"
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--requests", "0"], "argument --requests: must be >= 1, got 0"),
        (["--clients", "0"], "argument --clients: must be >= 1, got 0"),
        (["--clients", "-3"], "argument --clients: must be >= 1, got -3"),
        (["--adapters", "0"], "argument --adapters: must be >= 1, got 0"),
        (["--slots", "0"], "argument --slots: must be >= 1, got 0"),
        (["--requests", "many"], "argument --requests: not an integer: 'many'"),
        (["--zipf", "nan"], "argument --zipf: must be a finite number >= 0, got nan"),
        (["--base-share", "1.5"], "argument --base-share: must be between 0 and 1, got 1.5"),
        (["--metrics-port", "70000"], "argument --metrics-port: must be a port in 0..65535, got 70000"),
        (["--device", "floppy"], "argument --device: not a device: 'floppy'"),
        (["--model", "/no/such/model"], "argument --model: /no/such/model: no such directory"),
    ],
)
def test_a_bad_argument_exits_2_with_one_line_before_any_work(
    argv: list[str], expected: str, no_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _rejected(["demo", *argv], capsys)
    assert line.startswith("polylora-async demo: error: ")
    assert expected in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is missing")
def test_cuda_without_cuda_is_refused(no_work: None, capsys: pytest.CaptureFixture[str]) -> None:
    line = _rejected(["demo", "--device", "cuda"], capsys)
    assert "argument --device: 'cuda' asked for, but CUDA is not available" in line


def test_a_model_directory_without_config_is_refused(
    tmp_path: Path, no_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    line = _rejected(["demo", "--model", str(tmp_path)], capsys)
    assert f"argument --model: {tmp_path}: no config.json in it" in line
    file = tmp_path / "model.safetensors"
    assert f"argument --model: {file}: not a directory" in _rejected(["demo", "--model", str(file)], capsys)


def test_a_saved_model_directory_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_llama().save_pretrained(str(tmp_path))
    seen: list[Any] = []
    monkeypatch.setattr(demo, "run_demo", lambda args: seen.append(args) or 0)
    assert main(["demo", "--model", str(tmp_path), "--device", "cpu"]) == 0
    assert seen[0].model == tmp_path
    assert seen[0].device == torch.device("cpu")


def test_a_port_in_use_is_refused(taken_port: int, no_work: None, capsys: pytest.CaptureFixture[str]) -> None:
    line = _rejected(["demo", "--metrics-port", str(taken_port)], capsys)
    assert f"argument --metrics-port: cannot listen on 127.0.0.1:{taken_port}: " in line


def test_a_port_taken_after_the_check_is_refused_before_any_work(
    taken_port: int, no_work: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Another process takes the port between the check and the bind.
    monkeypatch.setattr(demo, "check_demo_arguments", lambda args: None)
    assert main(["demo", "--metrics-port", str(taken_port)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert f"cannot listen on 127.0.0.1:{taken_port}: " in lines[0]


@pytest.mark.timeout(60)
def test_the_installed_command_line_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "polylora_async", "demo", "--requests", "0"],
        capture_output=True,
        text=True,
        timeout=50,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "polylora-async demo: error: argument --requests: must be >= 1, got 0 (--help lists the options)"
    ]


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # the formatter wraps lines
    for default in ["24", "48", "600", "8", "1.1", "0.1", "auto", "0"]:
        assert f"(default: {default})" in text
    assert "--metrics-port METRICS_PORT port for /metrics on 127.0.0.1 (0: any free one) (default: 0)" in text


@pytest.mark.timeout(180)
def test_a_short_run_verifies_every_result_and_serves_metrics_until_it_ends(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = _free_port()
    requests = 24
    url = f"http://127.0.0.1:{port}/metrics"
    scrapes: list[str] = []
    verdicts: list[int] = []
    verify = demo._verify

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def verify_and_probe(oracle: Any, done: list[Any], device: Any, dtype: Any, checked: Any) -> int:
        # Runs in a worker thread after the runtime has closed: the server must still answer.
        scrapes.append(scrape())
        bad = verify(oracle, done, device, dtype, checked)
        scrapes.append(scrape())
        # The check itself can fail: one corrupted row must be reported.
        wrong = demo._Done(done[0].adapter, done[0].ids, done[0].output + 1.0, done[0].latency)
        verdicts.append(verify(oracle, [wrong], device, dtype, demo._Tally()))
        return bad

    monkeypatch.setattr(demo, "_verify", verify_and_probe)
    argv = ["--requests", str(requests), "--clients", "4", "--adapters", "3", "--slots", "2", "--device", "cpu"]
    assert main(["demo", *argv, "--metrics-port", str(port)]) == 0

    captured = capsys.readouterr()
    assert f"serving Prometheus metrics at {url}" in captured.out
    assert f"results      {requests} checked against solo PEFT runs: all verified" in captured.out
    assert f"verified    {requests}/{requests}" in captured.err
    assert verdicts == [1]
    assert len(scrapes) == 2
    for body in scrapes:
        ok = [line for line in body.splitlines() if line.startswith('polylora_requests_total{outcome="ok"}')]
        assert len(ok) == 1
        assert float(ok[0].split()[-1]) >= requests
    with pytest.raises(OSError):  # closed once the demo is over
        scrape()
