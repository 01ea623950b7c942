"""The on-policy top-k overlap: a teacher top-k as wide as the vocabulary (counted in a (..., V)
table) gives what the pairwise (..., K, K) compare gives."""

import pytest
import torch

from distill.onpolicy.metrics import Diagnostics, accumulate_rows


@pytest.mark.parametrize("K", [5, 8, 50, 53])
def test_overlap_matches_pairwise_compare(K: int) -> None:
    torch.manual_seed(K)
    V, rows = 50, 6
    logits = torch.randn(rows, V + 3)  # 3 padded head rows
    t_ids = torch.stack([torch.randperm(V + 3)[:K] for _ in range(rows)])  # some >= V
    t_lp = torch.randn(rows, K).log_softmax(-1)
    diag = Diagnostics()
    accumulate_rows(diag, logits, t_ids, t_lp, torch.ones(rows), V)
    student = torch.topk(logits[:, :V], min(K, V)).indices
    valid = t_ids < V
    pairwise = (student[:, :, None] == t_ids[:, None, :]) & valid[:, None, :]
    expected = float(pairwise.any(-1).float().mean(-1).sum())
    assert diag.overlap == pytest.approx(expected)
    assert 0.0 < diag.overlap <= rows
