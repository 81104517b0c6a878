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
