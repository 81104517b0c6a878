"""VBPR (He & McAuley, AAAI 2016): item = [ID embedding ‖ linear projection of its content features].

Each modality's features are standardised (mean and standard deviation over the items that have it: raw scales
differ by orders of magnitude, e.g. unit-norm MiniLM text against 0–255 VGGish audio, and an unscaled modality
would swamp the projection), then all modalities are concatenated, each followed by its presence flag, so an item
missing a modality is fed zeros AND a 0 flag: the projection learns what "absent" means instead of reading zeros as
data.
Users have an embedding twice as wide, matching the concatenated item vector (as in MMRec).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import (
    ContentEncoder,
    ModelInputs,
    PairwiseBatch,
    Recommender,
    Representations,
    require_modalities,
)
from models.losses import bpr_loss, embedding_norm_penalty


@dataclass(frozen=True)
class VBPRConfig:
    embedding_size: int = 64  # per half: ID part and content part
    reg_weight: float = 1e-4
    dropout: float = 0.0


def feature_statistics(inputs: ModelInputs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per modality (sorted by name), the mean and standard deviation (d_m,) over the items that have it."""
    require_modalities(inputs, "VBPR")
    stats = {}
    for name in sorted(inputs.modalities):
        m = inputs.modalities[name]
        present = m.features[m.present] if bool(m.present.any()) else torch.zeros(1, m.features.shape[1])
        std = present.std(dim=0, unbiased=False) if present.shape[0] > 1 else torch.ones(m.features.shape[1])
        stats[name] = (present.mean(dim=0), std.clamp(min=1e-6))
    return stats


def standardised_content(
    features_and_masks: list[tuple[torch.Tensor, torch.Tensor]], stats: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """(N, Σ(d_m + 1)): each modality standardised and zeroed where absent (mask (N, 1)), then its presence flag."""
    parts = []
    for (features, mask), (mean, std) in zip(features_and_masks, stats, strict=True):
        parts += [(features - mean) / std * mask, mask]
    return torch.cat(parts, dim=1)


def content_matrix(inputs: ModelInputs) -> torch.Tensor:
    """The (I, Σ(d_m + 1)) content input of every item, modalities in sorted order."""
    stats = feature_statistics(inputs)
    pairs = [(inputs.modalities[n].features, inputs.modalities[n].present.float()[:, None]) for n in stats]
    return standardised_content(pairs, list(stats.values()))


class VBPR(Recommender):
    content: torch.Tensor

    def __init__(self, config: VBPRConfig, inputs: ModelInputs) -> None:
        super().__init__()
        self.config = config
        self.modality_names = sorted(inputs.modalities)
        for name, (mean, std) in feature_statistics(inputs).items():  # saved with the weights, for new items
            self.register_buffer(f"feature_mean_{name}", mean)
            self.register_buffer(f"feature_std_{name}", std)
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
        self.stats = [(model.get_buffer(f"feature_mean_{n}"), model.get_buffer(f"feature_std_{n}")) for n in self.modality_names]

    def forward(self, *features_and_masks: torch.Tensor) -> torch.Tensor:
        pairs = [(features_and_masks[2 * k], features_and_masks[2 * k + 1]) for k in range(len(self.modality_names))]
        content = self.projection(standardised_content(pairs, self.stats))  # (N, d)
        return torch.cat([torch.zeros_like(content[:, :1]).expand(-1, self.id_size), content], dim=1)
