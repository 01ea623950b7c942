"""ServerTeacher: running vLLM servers reached over their OpenAI-compatible `/v1/completions`.

Token ids in, token ids out: prompts are sent as id lists, scores come back as `prompt_logprobs`
(JSON keys are stringified ids). Sequences are packed into requests of at most `batch_tokens`
tokens (with several servers, into at least one request per server, so a batch is scored by all
of them at once), at most `concurrency` requests are in flight, each to the server with the
fewest in flight (in turn among equals). Where every server has the newest vLLM's
`prompt_logprob_token_ids`, scoring goes to `/inference/v1/generate` instead, one sequence per
request (teachers/scoring_route.py: what it buys, how it is detected). 5xx answers, dropped
connections, timeouts and truncated bodies are retried; 4xx answers are the caller's mistake and
raise at once, naming the fix.

A fleet (several URLs serving one model): a server whose request failed is skipped for `down_s`
while another is up, and the failed request (one in flight on a server that was just killed, say)
is sent again at once to a live one; only when every server is down does the client back off
exponentially. After `down_s` a skipped server gets requests again, so a restarted one rejoins.
Standard library only (urllib, threads).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from students.presets import folder_matmul_params
from students.sample import Generation, SamplingParams
from teachers.launch import API_KEY_ENV, model_shape
from teachers.protocol import TeacherError, TopK, check_scores
from teachers.scoring_route import (
    COMPLETIONS,
    GENERATE,
    ProbeFailed,
    detect_route,
    generate_request,
    token_id_logprobs,
    topk_from_json,
)

JSON = dict[str, object]
MAX_SINGLE_REQUESTS = 128  # threads, one blocking request each, on the one-sequence route


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    concurrency: int = 8  # requests in flight over all servers
    batch_tokens: int = 16_384  # prompt tokens packed into one request (one always fits)
    timeout_s: float = 600.0  # per request; a long prefill on a busy server is slow, not dead
    retries: int = 5  # attempts after the first
    backoff_s: float = 0.5  # first wait; doubles per attempt, capped at 30 s
    down_s: float = 30.0  # a server that failed gets no requests this long while another is up
    api_key_env: str = API_KEY_ENV  # read at each request; the key itself is never logged


class _Retryable(Exception):
    """A failure worth another attempt: 5xx, dropped connection, timeout, truncated body."""

    def __init__(self, message: str, kind: str = "dropped") -> None:
        super().__init__(message)
        self.kind = kind  # the key counted in ServerTeacher.faults


class ServerTeacher:
    """Scoring and generation on one or more vLLM servers serving the same model."""

    def __init__(
        self,
        urls: Sequence[str],
        model: str,
        *,
        vocab_size: int,
        logits_width: int,
        eos_id: int,
        max_top_k: int,
        config: ServerConfig = ServerConfig(),
        scoring_path: str = COMPLETIONS,
        matmul_params: int = 0,
    ) -> None:
        assert urls, "at least one server URL"
        assert scoring_path in (COMPLETIONS, GENERATE), scoring_path
        self.scoring_path = scoring_path  # `connect` detects it
        self.matmul_params = matmul_params  # FLOPs: 2·N per token; 0 when unknown
        self.urls = [u.rstrip("/") for u in urls]
        self.model, self.config = model, config
        self._vocab_size, self._width, self.eos_id = vocab_size, logits_width, eos_id
        self._max_top_k = max_top_k
        self._in_flight = dict.fromkeys(self.urls, 0)
        self._down_until = dict.fromkeys(self.urls, 0.0)  # time.monotonic() it may be used again
        self._turn = 0  # requests sent: ties on load go to the servers in turn
        self._lock = threading.Lock()
        self.answered = dict.fromkeys(self.urls, 0)  # requests each server answered, in URL order
        self.bytes_received = 0  # response bytes, for the benchmark's payload figure
        # Retried failures by kind (http_5xx, dropped, timeout, truncated): metrics, not logs.
        self.faults: dict[str, int] = {}

    @classmethod
    def connect(
        cls,
        urls: Sequence[str],
        model: str,
        *,
        max_top_k: int = 20,
        config: ServerConfig = ServerConfig(),
        matmul_params: int = 0,
    ) -> ServerTeacher:
        """Check every server answers and serves `model`; the shape comes from `model`'s folder.

        `matmul_params` (--teacher-params): the served model's N for the FLOPs of the ledger;
        0 reads it from `model`'s config (a local folder or a Qwen3 hub id). vLLM's /v1/models
        reports no parameter count, so an unknown served model counts 0 FLOPs.
        """
        if not urls:
            raise TeacherError(
                "--teacher-backend server needs --teacher-url (e.g. http://127.0.0.1:8000); start "
                f"a server with `distill teacher serve --teacher {model}`"
            )
        served = ""
        for url in urls:
            url = url.rstrip("/")
            try:
                body = _request(f"{url}/v1/models", None, config, timeout_s=10.0)
            except urllib.error.HTTPError as e:
                raise _client_error(e, url, config) from None
            except (urllib.error.URLError, OSError, _Retryable) as e:
                raise TeacherError(
                    f"teacher server {url} is unreachable ({_reason(e)}): start it with "
                    f"`distill teacher serve --teacher {model} --port {_port(url)}`"
                ) from None
            ids = [str(m["id"]) for m in body.get("data", [])]  # pyright: ignore
            if model not in ids and len(ids) != 1:
                raise TeacherError(f"server {url} serves {ids}, not {model!r}: pass one of them")
            served = model if model in ids else ids[0]
        # Once per base URL: the newest route only if every server has it (requests go to any).
        routes = [detect_route(u.rstrip("/"), served, _probe(config)) for u in urls]
        scoring_path = GENERATE if all(r.path == GENERATE for r in routes) else COMPLETIONS
        shape = model_shape(model)
        return cls(
            urls,
            served,
            vocab_size=shape.vocab_size,
            logits_width=shape.logits_width,
            eos_id=shape.eos_id,
            max_top_k=max_top_k,
            config=config,
            scoring_path=scoring_path,
            matmul_params=matmul_params or folder_matmul_params(model),
        )

    @property
    def name(self) -> str:
        return f"server:{self.model}"

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def logits_width(self) -> int:
        return self._width

    @property
    def max_top_k(self) -> int:
        return self._max_top_k

    def score(
        self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], top_k: int
    ) -> list[TopK]:
        check_request(
            sequences,
            prompt_lengths,
            top_k,
            self._max_top_k,
            self.name,
            fix="the server's --max-logprobs (and pass the same max_top_k here)",
        )
        # A fleet scores one batch on all its servers: at least one request per server.
        share = -(-sum(len(s) for s in sequences) // len(self.urls))  # ceil(tokens / servers)
        groups = pack(sequences, max(1, min(self.config.batch_tokens, share)))
        if self.scoring_path == GENERATE:
            scores = self._score_one_by_one(sequences, prompt_lengths, top_k, len(groups))
            check_scores(scores, self.name)
            return scores
        requests = [
            {
                "model": self.model,
                "prompt": [list(map(int, sequences[i])) for i in group],
                "max_tokens": 1,
                "temperature": 1.0,
                "prompt_logprobs": top_k,
            }
            for group in groups
        ]
        out: list[TopK | None] = [None] * len(sequences)
        for group, body in zip(groups, self._post_all(requests, COMPLETIONS), strict=True):
            choices = sorted(body["choices"], key=lambda c: c["index"])  # pyright: ignore
            for i, choice in zip(group, choices, strict=True):
                out[i] = topk_from_json(
                    choice["prompt_logprobs"], sequences[i], int(prompt_lengths[i]), top_k
                )
        scores = [s for s in out if s is not None]
        assert len(scores) == len(sequences)
        check_scores(scores, self.name)
        return scores

    def _score_one_by_one(
        self,
        sequences: Sequence[Sequence[int]],
        prompt_lengths: Sequence[int],
        top_k: int,
        n_batches: int,
    ) -> list[TopK]:
        """/inference/v1/generate, one sequence per request, as many in flight as in batches."""
        bodies = [
            generate_request(self.model, seq, int(P), top_k)
            for seq, P in zip(sequences, prompt_lengths, strict=True)
        ]
        per_batch = max(1, len(sequences) // max(1, n_batches))
        workers = min(MAX_SINGLE_REQUESTS, self.config.concurrency * per_batch)
        scores = []
        answers = self._post_all(bodies, GENERATE, workers)
        for seq, P, body in zip(sequences, prompt_lengths, answers, strict=True):
            actual = token_id_logprobs(body, len(seq) - int(P))  # (L,)
            rows = body["prompt_logprobs"]
            assert isinstance(rows, list), "vLLM answers prompt_logprobs as a list of rows"
            scores.append(topk_from_json(rows, seq, int(P), top_k, actual))
        return scores

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Generation]:
        # Padded head rows (ids >= vocab_size) are never sampled: a -100 bias removes them.
        bias = {str(i): -100.0 for i in range(self._vocab_size, self._width)}
        requests = [
            {
                "model": self.model,
                "prompt": list(map(int, p)),
                "max_tokens": params.max_tokens,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": params.top_k,
                "presence_penalty": params.presence_penalty,
                "seed": params.seed + i,
                "stop_token_ids": [self.eos_id],
                "return_token_ids": True,
                "logit_bias": bias,
            }
            for i, p in enumerate(prompts)
        ]
        gens = []
        for body in self._post_all(requests, COMPLETIONS):
            choice = body["choices"][0]  # pyright: ignore
            ids = [int(t) for t in choice["token_ids"]]
            stopped = choice["finish_reason"] == "stop"
            if stopped and (not ids or ids[-1] != self.eos_id):
                ids.append(self.eos_id)  # Generation keeps eos as the last id
            gens.append(
                Generation(
                    token_ids=np.asarray(ids, dtype=np.int32),
                    finish_reason="stop" if stopped else "length",
                )
            )
        return gens

    def _post_all(self, bodies: list[JSON], path: str, workers: int | None = None) -> list[JSON]:
        """POST each body to `path`, `concurrency` (or `workers`) at a time; answers in order."""
        workers = max(1, min(workers or self.config.concurrency, len(bodies)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda body: self._post(body, path), bodies))

    def _post(self, body: JSON, path: str) -> JSON:
        payload = json.dumps(body).encode()
        last = ""
        for attempt in range(self.config.retries + 1):
            url = self._acquire()
            try:
                answer = _request(f"{url}{path}", payload, self.config, counter=self)
            except urllib.error.HTTPError as e:
                if e.code < 500:
                    raise _client_error(e, url, self.config) from None
                last, kind = f"{url}: HTTP {e.code}", "http_5xx"
            except (_Retryable, urllib.error.URLError, OSError, http.client.HTTPException) as e:
                last, kind = f"{url}: {_reason(e)}", _kind(e)
            else:
                with self._lock:
                    self.answered[url] += 1
                    self._down_until[url] = 0.0  # answered: up again
                return answer
            finally:
                self._release(url)
            if not self._failed(url, kind):  # another server is up: retry there at once
                time.sleep(min(30.0, self.config.backoff_s * 2**attempt))
        raise TeacherError(
            f"teacher servers failed {self.config.retries + 1} times in a row (last: {last}); "
            "check the servers' logs and that they are up (`curl URL/health`)"
        )

    def _acquire(self) -> str:
        with self._lock:
            now = time.monotonic()
            up = [u for u in self.urls if self._down_until[u] <= now]
            # Every server down: the one that comes back first (with one server: that one).
            pool = up or [min(self.urls, key=lambda u: self._down_until[u])]
            n = len(self.urls)
            turn = {u: (i - self._turn) % n for i, u in enumerate(self.urls)}
            url = min(pool, key=lambda u: (self._in_flight[u], turn[u]))  # least loaded
            self._turn += 1
            self._in_flight[url] += 1
            return url

    def _failed(self, url: str, kind: str) -> bool:
        """Count the fault, skip `url` for `down_s`; True if another server is up now."""
        with self._lock:
            self.faults[kind] = self.faults.get(kind, 0) + 1
            now = time.monotonic()
            self._down_until[url] = now + self.config.down_s
            return any(self._down_until[u] <= now for u in self.urls)

    def _release(self, url: str) -> None:
        with self._lock:
            self._in_flight[url] -= 1


def check_request(
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    top_k: int,
    max_top_k: int,
    name: str,
    fix: str,
) -> None:
    """Refuse a request a backend would reject or mis-align, naming the fix."""
    if not 1 <= top_k <= max_top_k:
        raise TeacherError(f"top_k={top_k} is above what {name} serves ({max_top_k}): raise {fix}")
    if len(sequences) != len(prompt_lengths):
        raise TeacherError(f"{len(sequences)} sequences but {len(prompt_lengths)} prompt lengths")
    for i, (s, P) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        # Position 0 has no prefix to be scored from, so a completion needs P >= 1.
        if not 1 <= P <= len(s):
            raise TeacherError(f"sequence {i}: prompt length {P} outside 1..{len(s)}")


def pack(sequences: Sequence[Sequence[int]], batch_tokens: int) -> list[list[int]]:
    """Consecutive index groups of at most `batch_tokens` tokens (a longer sequence goes alone)."""
    groups: list[list[int]] = [[]]
    used = 0
    for i, s in enumerate(sequences):
        if groups[-1] and used + len(s) > batch_tokens:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += len(s)
    return [g for g in groups if g]


def _request(
    url: str,
    payload: bytes | None,
    config: ServerConfig,
    timeout_s: float | None = None,
    counter: ServerTeacher | None = None,
) -> JSON:
    headers = {"Content-Type": "application/json"}
    if key := os.environ.get(config.api_key_env):
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=payload, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s or config.timeout_s) as resp:
            raw = resp.read()
    except http.client.IncompleteRead as e:
        raise _Retryable(f"truncated response ({len(e.partial)} bytes)", "truncated") from None
    except (http.client.RemoteDisconnected, ConnectionError, TimeoutError) as e:
        raise _Retryable(_reason(e), _kind(e)) from None
    if counter is not None:
        counter.bytes_received += len(raw)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _Retryable(f"unparseable response body ({len(raw)} bytes)", "truncated") from None
    if not isinstance(body, dict):
        raise _Retryable("response body is not a JSON object", "truncated")
    return body


def _probe(config: ServerConfig) -> Callable[[str, JSON | None], JSON]:
    """One detection request (GET when no body), no retries; a failure is ProbeFailed."""

    def fetch(url: str, body: JSON | None) -> JSON:
        payload = None if body is None else json.dumps(body).encode()
        try:
            return _request(url, payload, config, timeout_s=30.0)
        except urllib.error.HTTPError as e:
            raise ProbeFailed(f"HTTP {e.code} {_error_message(e)}"[:300]) from None
        except (_Retryable, urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise ProbeFailed(_reason(e)) from None

    return fetch


def _error_message(e: urllib.error.HTTPError) -> str:
    """The `error.message` of a vLLM error body, or "" when there is none."""
    try:
        return str(json.loads(e.read()).get("error", {}).get("message", ""))
    except (json.JSONDecodeError, OSError, AttributeError):
        return ""


def _client_error(e: urllib.error.HTTPError, url: str, config: ServerConfig) -> TeacherError:
    """4xx: the request is wrong for this server; name the fix."""
    message = _error_message(e)
    if e.code == 401:
        return TeacherError(
            f"server {url} refused the API key: set {config.api_key_env} to the "
            "key the server was started with"
        )
    if "logprobs" in message and "max" in message:
        return TeacherError(
            f"server {url}: {message}; restart it with a larger --max-logprobs "
            "(distill teacher serve --max-logprobs K) or lower top_k"
        )
    return TeacherError(f"server {url} rejected the request (HTTP {e.code}): {message[:300]}")


def _kind(e: BaseException) -> str:
    """The fault key of a retried failure: timeout, truncated, or dropped (connection lost)."""
    if isinstance(e, _Retryable):
        return e.kind
    if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
        return "timeout"
    return "truncated" if isinstance(e, http.client.IncompleteRead) else "dropped"


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None)
    return f"{type(e).__name__}: {reason or e}"


def _port(url: str) -> str:
    tail = url.rsplit(":", 1)[-1]
    return tail if tail.isdigit() else "8000"
