"""LightGCN (He et al., SIGIR 2020): ID embeddings smoothed over the normalised user–item graph.

E⁽ˡ⁺¹⁾ = Â E⁽ˡ⁾ with no weights or non-linearities; the final embedding is the mean of layers 0..L.
BPR on the final embeddings plus a penalty on the layer-0 (ego) embeddings of the batch, as in MMRec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.base import ModelInputs, PairwiseBatch, Recommender, Representations
from models.graph import light_propagate, normalized_bipartite_adjacency
from models.losses import bpr_loss, embedding_norm_penalty


@dataclass(frozen=True)
class LightGCNConfig:
    embedding_size: int = 64
    n_layers: int = 2  # MMRec grid {1, 2, 3, 4}
    reg_weight: float = 1e-4  # MMRec grid {1e-2 … 1e-6}


class LightGCN(Recommender):
    adjacency: torch.Tensor

    def __init__(self, config: LightGCNConfig, inputs: ModelInputs) -> None:
        super().__init__()
        self.config = config
        self.n_users = inputs.n_users
        self.user_embedding = nn.Embedding(inputs.n_users, config.embedding_size)
        self.item_embedding = nn.Embedding(inputs.n_items, config.embedding_size)
        nn.init.xavier_uniform_(self.user_embedding.weight)  # MMRec's initialisation
        nn.init.xavier_uniform_(self.item_embedding.weight)
        adjacency = normalized_bipartite_adjacency(
            inputs.n_users, inputs.n_items, inputs.train_users, inputs.train_items
        )
        self.register_buffer("adjacency", adjacency, persistent=False)

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight])  # (U+I, d)
        final = light_propagate(self.adjacency, ego, self.config.n_layers)  # (U+I, d)
        return final[: self.n_users], final[self.n_users :]

    def loss(self, batch: PairwiseBatch) -> torch.Tensor:  # type: ignore[override]
        users, items = self.propagate()
        u, p, n = users[batch.users], items[batch.pos_items], items[batch.neg_items]  # (B, d) each
        ranking = bpr_loss((u * p).sum(-1), (u * n).sum(-1))
        ego = embedding_norm_penalty(
            self.user_embedding(batch.users), self.item_embedding(batch.pos_items), self.item_embedding(batch.neg_items)
        )
        return ranking + self.config.reg_weight * ego

    def representations(self) -> Representations:
        users, items = self.propagate()
        return Representations(users=users, items=items)
