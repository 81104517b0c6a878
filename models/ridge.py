"""Ridge regression with its strength chosen on held-out rows: the closed-form cold-start maps from content.

One implementation for the two places that map an item's content to what users taught the model: R2MR's content
encoder (``models/r2mr.py``: reviewer-score heads and the collaborative vector) and the exporter's ridge map for
ID models (``training/export/ridge.py``). They choose the strength by different criteria, an explicit argument:

- ``"mse"``: lowest mean squared error on the held-out rows (R2MR: the targets are logits and vectors whose size
  enters the gate);
- ``"cosine"``: highest mean cosine between predicted and true held-out vectors (the exporter's ridge map: the
  direction of an ID model's item vector).

Which rows are held out is the caller's draw (R2MR draws with torch, the exporter with numpy's generator): each
keeps the draw its numbers were recorded with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

RIDGE_STRENGTHS = (0.01, 0.1, 1.0, 10.0, 100.0)  # λ candidates, a decade apart
SelectionCriterion = Literal["mse", "cosine"]


@dataclass(frozen=True)
class RidgeFit:
    weight: torch.Tensor  # (F, T) float64, refitted on every row with the chosen strength
    strength: float
    held_out: dict[float, float] = field(default_factory=dict)  # criterion per strength; empty: nothing held out


def ridge_solution(x: torch.Tensor, y: torch.Tensor, strength: float) -> torch.Tensor:
    """argmin_W ‖xW − y‖² + strength·‖W‖² for float64 x (N, F) and y (N, T): W (F, T)."""
    gram = x.T @ x + strength * torch.eye(x.shape[1], dtype=torch.float64)
    solution: torch.Tensor = torch.linalg.solve(gram, x.T @ y)
    return solution


def held_out_score(prediction: torch.Tensor, target: torch.Tensor, criterion: SelectionCriterion) -> float:
    """Mean squared error, or mean cosine (per row, a 1e-12 floor on the norms' product), of (N, T) predictions."""
    if criterion == "mse":
        return float((prediction - target).pow(2).mean())
    denom = torch.linalg.vector_norm(prediction, dim=1) * torch.linalg.vector_norm(target, dim=1) + 1e-12
    return float(((prediction * target).sum(dim=1) / denom).mean())


def fit_ridge(x: torch.Tensor, y: torch.Tensor, held: torch.Tensor, *, criterion: SelectionCriterion,
              strengths: tuple[float, ...] = RIDGE_STRENGTHS) -> RidgeFit:  # fmt: skip
    """Ridge from x (N, F) (a bias column included by the caller) to y (N, T), solved in float64.

    Each strength is fitted on the rows not in ``held`` (N,) bool and scored on the held rows by ``criterion``;
    the best is refitted on all rows. With no held row, or every row held, nothing can be scored: the middle
    strength is taken.
    """
    x64, y64 = x.double(), y.double()
    if held.all() or not held.any():
        middle = strengths[len(strengths) // 2]
        return RidgeFit(ridge_solution(x64, y64, middle), middle)
    fit = ~held
    scores = {s: held_out_score(x64[held] @ ridge_solution(x64[fit], y64[fit], s), y64[held], criterion)
              for s in strengths}  # fmt: skip
    best = min(scores, key=lambda s: scores[s]) if criterion == "mse" else max(scores, key=lambda s: scores[s])
    return RidgeFit(ridge_solution(x64, y64, best), best, scores)
