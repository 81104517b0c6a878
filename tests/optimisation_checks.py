"""Checks shared by the model test modules (not a test module itself): does the loss go down under Adam? And a
model moved off its initial parameter values, so that nothing is checked by accident."""

from __future__ import annotations

import torch

from models.base import PairwiseBatch, Recommender


def loss_before_and_after_adam(model: Recommender, batch: PairwiseBatch, *, steps: int = 30, lr: float = 0.01
                               ) -> tuple[float, float]:  # fmt: skip
    """The model's loss on ``batch`` before and after ``steps`` Adam steps on that same batch."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    with torch.no_grad():
        before = float(model(batch))
    for _ in range(steps):
        optimizer.zero_grad()
        model(batch).backward()
        optimizer.step()
    with torch.no_grad():
        after = float(model(batch))
    return before, after


def move_off_initial_values(model: torch.nn.Module, *, scale: float = 0.05) -> None:
    """Add ``scale`` times standard-normal noise (torch's global generator) to every parameter, in place."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn_like(param))
