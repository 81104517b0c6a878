"""BPR-MF (Rendle et al., UAI 2009): user and item ID embeddings, score = dot product, BPR loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.base import ModelInputs, PairwiseBatch, Recommender, Representations
from models.losses import bpr_loss, embedding_norm_penalty


@dataclass(frozen=True)
class BPRMFConfig:
    embedding_size: int = 64
    reg_weight: float = 1e-4  # MMRec grid {2.0 … 1e-5}; the large values over-regularise, chosen on validation


class BPRMF(Recommender):
    def __init__(self, config: BPRMFConfig, inputs: ModelInputs) -> None:
        super().__init__()
        self.config = config
        self.user_embedding = nn.Embedding(inputs.n_users, config.embedding_size)
        self.item_embedding = nn.Embedding(inputs.n_items, config.embedding_size)
        nn.init.xavier_normal_(self.user_embedding.weight)  # MMRec's initialisation
        nn.init.xavier_normal_(self.item_embedding.weight)

    def loss(self, batch: PairwiseBatch) -> torch.Tensor:  # type: ignore[override]
        u = self.user_embedding(batch.users)  # (B, d)
        p = self.item_embedding(batch.pos_items)  # (B, d)
        n = self.item_embedding(batch.neg_items)  # (B, d)
        ranking = bpr_loss((u * p).sum(-1), (u * n).sum(-1))
        return ranking + self.config.reg_weight * embedding_norm_penalty(u, p, n)

    def representations(self) -> Representations:
        return Representations(users=self.user_embedding.weight, items=self.item_embedding.weight)
