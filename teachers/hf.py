"""HFTeacher: a transformers model in this process; exact, dense, and the reference in tests."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from students import dtype as dtypes
from students.presets import config_matmul_params
from students.sample import Generation, SamplingParams, sample
from teachers.protocol import TeacherError, TopK, check_scores, refuse_remote_code

REMOTE_CODE_FIX = "read that code, then pass --trust-remote-code to run it"


class HFTeacher:
    """Scores with one forward pass per batch; log-softmax is taken `chunk` positions at a time."""

    def __init__(
        self,
        model: PreTrainedModel,
        vocab_size: int,
        eos_id: int,
        pad_id: int,
        name: str,
        batch_size: int = 16,
        chunk: int = 256,
    ) -> None:
        self.model = model.eval()
        self._vocab_size = vocab_size
        self.eos_id, self.pad_id = eos_id, pad_id
        self._name = name
        self.batch_size, self.chunk = batch_size, chunk
        self.matmul_params = config_matmul_params(model.config)  # FLOPs: 2·N per scored token

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | torch.dtype = "auto",
        device: str = "cpu",
        trust_remote_code: bool = False,
    ) -> HFTeacher:
        path = Path(path)
        if not (path / "config.json").exists():
            raise TeacherError(
                f"teacher model not found at {path}: pass a folder holding config.json and "
                "safetensors weights (e.g. one written by save_pretrained)"
            )
        refuse_remote_code(path, trust=trust_remote_code, fix=REMOTE_CODE_FIX)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        # "auto": the checkpoint's own dtype where the device supports it (students/dtype.py)
        torch_dtype = dtypes.resolve(dtype, path) if isinstance(dtype, str) else dtype
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
        model = model.to(torch.device(device))  # pyright: ignore[reportArgumentType]
        return cls(
            model,
            vocab_size=len(tokenizer),
            eos_id=int(tokenizer.eos_token_id),
            pad_id=int(tokenizer.pad_token_id),
            name=f"hf:{path.name}@{weights_digest(model)}",
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def logits_width(self) -> int:
        return int(self._head().weight.shape[0])

    def _head(self) -> torch.nn.Linear:
        head = self.model.get_output_embeddings()
        assert isinstance(head, torch.nn.Linear), type(head)
        return head

    @property
    def max_top_k(self) -> int:
        return self.logits_width

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Generation]:
        return sample(
            self.model,
            prompts,
            params,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            vocab_size=self._vocab_size,
            batch_size=self.batch_size * 4,
        )

    @torch.no_grad()
    def score(
        self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], top_k: int
    ) -> list[TopK]:
        if not 1 <= top_k <= self.max_top_k:
            raise TeacherError(f"top_k={top_k} is outside 1..{self.max_top_k} for {self.name}")
        assert len(sequences) == len(prompt_lengths)
        out: list[TopK] = []
        for start in range(0, len(sequences), self.batch_size):
            seqs = sequences[start : start + self.batch_size]
            plens = prompt_lengths[start : start + self.batch_size]
            out.extend(self._score_batch(seqs, plens, top_k))
        check_scores(out, self.name)
        return out

    def _score_batch(
        self, seqs: Sequence[Sequence[int]], plens: Sequence[int], top_k: int
    ) -> list[TopK]:
        device = next(self.model.parameters()).device
        B, T = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long, device=device)
        attn = torch.zeros((B, T), dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
            attn[i, : len(s)] = 1
        hidden = self.model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state
        # Alignment (see TopK): completion token t is predicted by the hidden state at P+t-1.
        # Every sequence's completion rows go through the head together, `chunk` rows at a time:
        # the (W, H) head weight is read once per chunk, not once per sequence.
        spans = [
            (i, int(P), len(s) - int(P)) for i, (s, P) in enumerate(zip(seqs, plens, strict=True))
        ]
        assert all(P >= 1 and L >= 0 for _, P, L in spans), spans  # a prompt token each
        rows = torch.cat([hidden[i, P - 1 : P - 1 + L] for i, P, L in spans])  # (N, H)
        targets = torch.cat([ids[i, P : P + L] for i, P, L in spans])  # (N,)
        N, head = rows.shape[0], self._head()
        top_ids = np.empty((N, top_k), dtype=np.int32)
        top_lp = np.empty((N, top_k), dtype=np.float32)
        actual = np.empty(N, dtype=np.float32)
        for c in range(0, N, self.chunk):
            # Raw temperature-1 log-softmax over the full head width, as vLLM reports it.
            logp = torch.log_softmax(head(rows[c : c + self.chunk]).float(), dim=-1)  # (C, W)
            vals, idx = torch.topk(logp, top_k, dim=-1)  # (C, K), sorted
            top_ids[c : c + self.chunk] = idx.cpu().numpy()
            top_lp[c : c + self.chunk] = vals.cpu().numpy()
            picked = logp.gather(-1, targets[c : c + self.chunk, None]).squeeze(-1)  # (C,)
            actual[c : c + self.chunk] = picked.cpu().numpy()
        ends = np.cumsum([L for _, _, L in spans])[:-1]
        # Copies, not views: a view would keep the whole batch's arrays alive (TopK.nbytes).
        return [
            TopK(ids=top.copy(), logprobs=lp.copy(), actual_logprobs=a.copy())
            for top, lp, a in zip(
                np.split(top_ids, ends), np.split(top_lp, ends), np.split(actual, ends), strict=True
            )
        ]


def weights_digest(model: torch.nn.Module, n: int = 12) -> str:
    """A short content hash of the weights: names the exact teacher in datasets and manifests."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:n]
