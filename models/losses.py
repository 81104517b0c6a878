"""Losses shared by the models: one BPR and one embedding regulariser, never copied into model files."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bpr_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """Bayesian personalised ranking: mean of −log σ(s⁺ − s⁻) over the batch (softplus form, stable)."""
    return F.softplus(neg_scores - pos_scores).mean()


def embedding_norm_penalty(*embeddings: torch.Tensor) -> torch.Tensor:
    """MMRec's ``EmbLoss``: the sum of the tensors' Frobenius norms (not squared) divided by the batch size.

    The published MMRec grids for ``reg_weight`` are calibrated for exactly this form.
    """
    return torch.stack([torch.linalg.vector_norm(e) for e in embeddings]).sum() / embeddings[-1].shape[0]


def squared_l2_penalty(*embeddings: torch.Tensor) -> torch.Tensor:
    """½ Σ‖x‖² divided by the batch size: the LightGCN paper's form of the same regulariser."""
    return torch.stack([e.pow(2).sum() for e in embeddings]).sum() / (2 * embeddings[-1].shape[0])


def mean_square_penalty(*tensors: torch.Tensor) -> torch.Tensor:
    """Σ mean(x²) over the tensors: MMGCN's regulariser (batch ID embeddings and the users' modality preferences)."""
    return torch.stack([t.pow(2).mean() for t in tensors]).sum()


def in_batch_info_nce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    positives: torch.Tensor,
    *,
    temperature: float,
    key_ids: torch.Tensor | None = None,
    extra_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE of queries (N, d) against the batch's keys (K, d) by inner product / ``temperature`` (normalise first
    for cosine): row n's positive is keys[positives[n]], the other keys are its negatives, except, with ``key_ids``
    (K,), keys with the same id as row n's positive (the same item twice in the batch). ``extra_negatives`` (N, d):
    one more negative per row, for row n only (MMGCL's modality-swapped negative). Mean over the rows."""
    logits = queries @ keys.T / temperature  # (N, K)
    if key_ids is not None:
        columns = torch.arange(keys.shape[0], device=keys.device)
        same = (key_ids[None, :] == key_ids[positives][:, None]) & (columns[None, :] != positives[:, None])
        logits = logits.masked_fill(same, -torch.inf)
    if extra_negatives is not None:
        logits = torch.cat([logits, (queries * extra_negatives).sum(-1, keepdim=True) / temperature], dim=1)
    return F.cross_entropy(logits, positives)
