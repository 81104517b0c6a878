"""VBPR (He & McAuley, AAAI 2016): item = [ID embedding ‖ linear projection of its content features].

Features of all modalities are concatenated, each followed by its presence flag, so an item missing a modality
is fed zeros AND a 0 flag: the projection learns what "absent" means instead of reading zeros as data.
Users have an embedding twice as wide, matching the concatenated item vector (as in MMRec).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ContentEncoder, ModelInputs, PairwiseBatch, Recommender, Representations
from models.losses import bpr_loss, embedding_norm_penalty


@dataclass(frozen=True)
class VBPRConfig:
    embedding_size: int = 64  # per half: ID part and content part
    reg_weight: float = 1e-4
    dropout: float = 0.0


def content_matrix(inputs: ModelInputs) -> torch.Tensor:
    """(I, Σ(d_m + 1)): each modality's features, zeroed where absent, followed by its presence flag."""
    if not inputs.modalities:
        raise ValueError("VBPR needs at least one item modality; this dataset has none")
    parts = []
    for name in sorted(inputs.modalities):
        m = inputs.modalities[name]
        flag = m.present.float()[:, None]
        parts += [m.features * flag, flag]
    return torch.cat(parts, dim=1)


class VBPR(Recommender):
    content: torch.Tensor

    def __init__(self, config: VBPRConfig, inputs: ModelInputs) -> None:
        super().__init__()
        self.config = config
        self.modality_names = sorted(inputs.modalities)
        self.register_buffer("content", content_matrix(inputs), persistent=False)  # (I, F)
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_users, 2 * config.embedding_size)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_items, config.embedding_size)))
        self.content_projection = nn.Linear(self.content.shape[1], config.embedding_size)

    def content_encoder(self) -> ContentEncoder:
        return VBPRContentEncoder(self)

    def content_vectors(self, content: torch.Tensor) -> torch.Tensor:
        """The content half of an item vector, from its (N, F) content row: all a new item has."""
        projected: torch.Tensor = self.content_projection(content)
        return projected

    def item_vectors(self) -> torch.Tensor:
        return torch.cat([self.item_embedding, self.content_vectors(self.content)], dim=1)  # (I, 2d)

    def loss(self, batch: PairwiseBatch) -> torch.Tensor:  # type: ignore[override]
        items = F.dropout(self.item_vectors(), self.config.dropout, self.training)
        users = F.dropout(self.user_embedding, self.config.dropout, self.training)
        u, p, n = users[batch.users], items[batch.pos_items], items[batch.neg_items]
        ranking = bpr_loss((u * p).sum(-1), (u * n).sum(-1))
        return ranking + self.config.reg_weight * embedding_norm_penalty(u, p, n)

    def representations(self) -> Representations:
        return Representations(users=self.user_embedding, items=self.item_vectors())


class VBPRContentEncoder(ContentEncoder):
    """A new item's VBPR vector: a zero ID half (nothing was learned for it) and the projected content half."""

    def __init__(self, model: VBPR) -> None:
        super().__init__()
        self.modality_names = tuple(model.modality_names)
        self.projection = model.content_projection
        self.id_size = model.config.embedding_size

    def forward(self, *features_and_masks: torch.Tensor) -> torch.Tensor:
        parts = []
        for k in range(len(self.modality_names)):
            features, mask = features_and_masks[2 * k], features_and_masks[2 * k + 1]  # (N, d_m), (N, 1)
            parts += [features * mask, mask]
        content = self.projection(torch.cat(parts, dim=1))  # (N, d)
        return torch.cat([torch.zeros_like(content[:, :1]).expand(-1, self.id_size), content], dim=1)
