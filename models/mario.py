"""MARIO (Kim, Lee, Shin & Kim, CIKM 2022): modality-aware attention and modality-preserving decoders.

Every item has one embedding per modality: the INTERACTION modality (its ID embedding smoothed over the user–item
graph, LightGCN) and each content modality m (its pre-trained features, L2-normalised, through a linear map).
Users have one embedding u (the LightGCN output of their ID embedding). For an interaction (u, i), with M the
modalities item i has (the interaction modality always):

    s^m      = u · v_i^m                                       the user's affinity to the item in modality m
    a^m_ui   = softmax_m(s^m / √d)                             modality-aware attention, per interaction
    v_ui     = Σ_m a^m_ui v_i^m                                the item's personalised embedding
    r̂_ui     = u · v_ui = Σ_m a^m_ui s^m                       the predicted preference

The attention logit is the scaled dot product Σ_k (u ⊙ v^m)_k / √d (a scalar per modality, the issue's
"softmax over modalities of u ⊙ v^m / √d"). Modality-preserving decoders: per content modality a linear decoder
D^m maps the personalised embedding of each observed interaction back to the item's normalised features,
L_MP = Σ_m mean_{(u,i⁺): i⁺ has m} ‖D^m(v_ui⁺) − x̂^m_i⁺‖². Loss: BPR(r̂) + mp_weight·L_MP + reg_weight·EmbLoss of
the batch's ego embeddings (LightGCN's regulariser).

Scoring. r̂ is not an inner product of a user vector and an item vector (the attention depends on the pair), so the
evaluator ranks by :meth:`MARIO.full_sort_scores`, the exact r̂. The returned representations are the SERVED form:
items [v^1 ‖ … ‖ v^M] (a block of zeros where the item lacks the modality) and users [ā^1_u u ‖ … ‖ ā^M_u u] with
ā_u the user's mean attention over their training interactions, so the bundle's inner product is
Σ_m ā^m_u s^m (the attention averaged per user, docs/models/mario.md measures the gap). The exact score is
recovered from those two arrays: u = Σ_m (user block m) since Σ_m ā^m_u = 1, and a zero item block means an
absent modality.

Missing modalities: an absent modality's block is zero and left out of the softmax, and of L_MP; a new item (content
encoder) has no interaction block (zero, absent) and is scored on its content modalities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import (
    BundleSection,
    ContentEncoder,
    ModelInputs,
    PairwiseBatch,
    Recommender,
    Representations,
    require_modalities,
)
from models.graph import light_propagate, normalized_bipartite_adjacency
from models.losses import bpr_loss, embedding_norm_penalty

INTERACTION = "interaction"  # the name of the ID/graph modality, always block 0


@dataclass(frozen=True)
class MARIOConfig:
    embedding_size: int = 64
    n_layers: int = 2  # LightGCN layers of the interaction modality (MMRec's LightGCN default)
    mp_weight: float = 0.1  # weight of the modality-preserving loss; validation grid {0.01, 0.1, 1.0}
    reg_weight: float = 1e-4  # EmbLoss on the batch's ego embeddings, as LightGCN here


def modality_attention(users: torch.Tensor, items: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(..., d) users, (..., M, d) item modality embeddings, (..., M) presence → (..., M) attention weights:
    softmax over the present modalities of u · v^m / √d (absent ones get weight 0)."""
    logits = (users.unsqueeze(-2) * items).sum(-1) / math.sqrt(users.shape[-1])  # (..., M)
    return torch.softmax(logits.masked_fill(~present, -torch.inf), dim=-1)


def attention_scores(users: torch.Tensor, items: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(B, d) users against (I, M, d) item modality embeddings with (I, M) presence → (B, I) scores
    Σ_m a^m s^m: the exact MARIO score of every pair, one (B, I) matmul per modality."""
    s = torch.stack([users @ items[:, m].T for m in range(items.shape[1])], dim=-1)  # (B, I, M)
    logits = (s / math.sqrt(users.shape[-1])).masked_fill(~present[None], -torch.inf)
    scores = (torch.softmax(logits, dim=-1) * s).sum(-1)  # (B, I); NaN for an item with no modality at all
    return torch.where(present.any(-1)[None], scores, torch.zeros_like(scores))


class MARIO(Recommender):
    adjacency: torch.Tensor
    present: torch.Tensor
    train_users: torch.Tensor
    train_items: torch.Tensor

    def __init__(self, config: MARIOConfig, inputs: ModelInputs) -> None:
        super().__init__()
        require_modalities(inputs, "MARIO")
        self.config = config
        self.n_users, self.n_items = inputs.n_users, inputs.n_items
        self.content_names = sorted(inputs.modalities)
        self.modality_names = [INTERACTION, *self.content_names]
        d = config.embedding_size
        self.user_embedding = nn.Embedding(inputs.n_users, d)
        self.item_embedding = nn.Embedding(inputs.n_items, d)
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_embedding.weight)
        dims = {name: inputs.modalities[name].features.shape[1] for name in self.content_names}
        self.projections = nn.ModuleDict({name: nn.Linear(dims[name], d) for name in self.content_names})
        self.decoders = nn.ModuleDict({name: nn.Linear(d, dims[name]) for name in self.content_names})
        for name in self.content_names:
            m = inputs.modalities[name]
            # normalised features, zero where absent (whatever the absent rows held)
            features = F.normalize(m.features, dim=1) * m.present[:, None]
            self.register_buffer(f"features_{name}", features, persistent=False)  # (I, d_m)
        present = torch.stack([torch.ones(inputs.n_items, dtype=torch.bool),
                               *[inputs.modalities[n].present for n in self.content_names]], dim=1)  # fmt: skip
        self.register_buffer("present", present, persistent=False)  # (I, M)
        adjacency = normalized_bipartite_adjacency(inputs.n_users, inputs.n_items, inputs.train_users, inputs.train_items)
        self.register_buffer("adjacency", adjacency, persistent=False)
        self.register_buffer("train_users", inputs.train_users.clone(), persistent=False)
        self.register_buffer("train_items", inputs.train_items.clone(), persistent=False)

    def features(self, name: str) -> torch.Tensor:
        features: torch.Tensor = self.get_buffer(f"features_{name}")
        return features

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder (C1): users (U, d) and item modality embeddings (I, M, d), zero where absent."""
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight])  # (U+I, d)
        final = light_propagate(self.adjacency, ego, self.config.n_layers)  # (U+I, d)
        content = [self.projections[n](self.features(n)) * self.present[:, m + 1, None]
                   for m, n in enumerate(self.content_names)]  # fmt: skip
        return final[: self.n_users], torch.stack([final[self.n_users :], *content], dim=1)

    def loss(self, batch: PairwiseBatch) -> torch.Tensor:  # type: ignore[override]
        users, items = self.encode()
        u = users[batch.users]  # (B, d)
        pos, neg = items[batch.pos_items], items[batch.neg_items]  # (B, M, d)
        a_pos = modality_attention(u, pos, self.present[batch.pos_items])  # (B, M)
        a_neg = modality_attention(u, neg, self.present[batch.neg_items])
        v_pos = (a_pos[..., None] * pos).sum(1)  # (B, d) personalised embeddings
        v_neg = (a_neg[..., None] * neg).sum(1)
        loss = bpr_loss((u * v_pos).sum(-1), (u * v_neg).sum(-1))
        if self.config.mp_weight > 0.0:
            loss = loss + self.config.mp_weight * self.modality_preserving_loss(v_pos, batch.pos_items)
        if self.config.reg_weight > 0.0:
            loss = loss + self.config.reg_weight * embedding_norm_penalty(
                self.user_embedding(batch.users), self.item_embedding(batch.pos_items),
                self.item_embedding(batch.neg_items))  # fmt: skip
        return loss

    def modality_preserving_loss(self, personalised: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Σ_m mean over the rows whose item has m of ‖D^m(v_ui) − x̂^m_i‖²: (B, d), (B,) → scalar."""
        terms = []
        for m, name in enumerate(self.content_names):
            keep = self.present[items, m + 1]  # (B,)
            if not bool(keep.any()):
                continue
            decoded = self.decoders[name](personalised[keep])  # (B', d_m)
            terms.append((decoded - self.features(name)[items[keep]]).pow(2).sum(-1).mean())
        return torch.stack(terms).sum() if terms else personalised.new_zeros(())

    def mean_user_attention(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(U, M) ā_u: each user's attention averaged over their training interactions (uniform without any)."""
        a = modality_attention(users[self.train_users], items[self.train_items], self.present[self.train_items])
        total = torch.zeros(self.n_users, a.shape[1], device=a.device).index_add(0, self.train_users, a)
        count = torch.bincount(self.train_users, minlength=self.n_users).to(a.dtype)[:, None]  # (U, 1)
        return torch.where(count > 0, total / count.clamp(min=1.0), torch.full_like(total, 1.0 / a.shape[1]))

    def representations(self) -> Representations:
        users, items = self.encode()
        weights = self.mean_user_attention(users, items)  # (U, M)
        lifted_users = (weights[..., None] * users[:, None, :]).flatten(1)  # (U, M·d)
        return Representations(users=lifted_users, items=items.flatten(1))  # items (I, M·d)

    def full_sort_scores(self, user_vectors: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The exact r̂ from the served arrays: (B, M·d) lifted users, (I, M·d) item blocks → (B, I)."""
        n_modalities = len(self.modality_names)
        blocks = items.view(items.shape[0], n_modalities, -1)  # (I, M, d)
        users = user_vectors.view(user_vectors.shape[0], n_modalities, -1).sum(1)  # (B, d): Σ_m ā^m = 1
        return attention_scores(users, blocks, blocks.abs().sum(-1) > 0)

    def content_encoder(self) -> ContentEncoder:
        return MARIOContentEncoder(self)

    def bundle_sections(self) -> tuple[BundleSection, ...]:
        """``modality_attention``: the blocks' order and the users' mean attention ā (U, M), what a consumer needs to
        rank by the exact score instead of the served inner product."""
        with torch.no_grad():
            weights = self.mean_user_attention(*self.encode())
        d = self.config.embedding_size
        return (BundleSection("modality_attention", {"user_attention": weights}, {
            "blocks": list(self.modality_names), "block_dim": d,
            "served_score": "inner product: user block m is ā^m_u·u (user_attention), item block m is v^m",
            "exact_score": f"u = Σ_m user block m; s^m = u·v^m; Σ_m softmax_m(s^m/√{d}) s^m over the item's "
                           "non-zero blocks (what the evaluator ranks by)",
        }),)  # fmt: skip


class MARIOContentEncoder(ContentEncoder):
    """A new item's MARIO vector: no interaction block (zeros: absent) and its projected content blocks."""

    def __init__(self, model: MARIO) -> None:
        super().__init__()
        self.modality_names = tuple(model.content_names)
        self.projections = nn.ModuleList([model.projections[n] for n in model.content_names])
        self.embedding_size = model.config.embedding_size

    def forward(self, *features_and_masks: torch.Tensor) -> torch.Tensor:
        blocks = []
        for k, projection in enumerate(self.projections):
            features, mask = features_and_masks[2 * k], features_and_masks[2 * k + 1]  # (N, d_m), (N, 1)
            blocks.append(projection(F.normalize(features * mask, dim=1)) * mask)  # (N, d)
        return torch.cat([torch.zeros_like(blocks[0]), *blocks], dim=1)  # (N, M·d)
