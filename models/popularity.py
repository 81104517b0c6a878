"""Popularity: every user gets the items with the most training interactions. No parameters, no training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from models.base import BatchKind, ModelInputs, Recommender, Representations


@dataclass(frozen=True)
class PopularityConfig:
    """Popularity has no hyperparameters."""


class Popularity(Recommender):
    batch_kind: ClassVar[BatchKind] = "none"
    item_counts: torch.Tensor
    user_ones: torch.Tensor

    def __init__(self, config: PopularityConfig, inputs: ModelInputs) -> None:
        super().__init__()
        self.config = config
        counts = torch.bincount(inputs.train_items, minlength=inputs.n_items).float()
        self.register_buffer("item_counts", counts[:, None])  # (I, 1)
        self.register_buffer("user_ones", torch.ones(inputs.n_users, 1))  # (U, 1)

    def representations(self) -> Representations:
        return Representations(users=self.user_ones, items=self.item_counts)
