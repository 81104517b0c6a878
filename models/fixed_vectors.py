"""Given user and item vectors behind the Recommender interface: score(u, i) = u · i, nothing to train.

The cold-start evaluation scores users against vectors made outside a model's own item table (a model's content
encoder applied to held-out items, content-similarity profiles) with the same evaluator as every trained model.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from models.base import BatchKind, Recommender, Representations


class FixedVectors(Recommender):
    batch_kind: ClassVar[BatchKind] = "none"
    users: torch.Tensor
    items: torch.Tensor

    def __init__(self, users: torch.Tensor, items: torch.Tensor) -> None:
        super().__init__()
        if users.ndim != 2 or items.ndim != 2 or users.shape[1] != items.shape[1]:
            raise ValueError(f"user vectors {tuple(users.shape)} and item vectors {tuple(items.shape)} do not match")
        self.register_buffer("users", users)  # (U, d)
        self.register_buffer("items", items)  # (I, d)

    def representations(self) -> Representations:
        return Representations(users=self.users, items=self.items)
