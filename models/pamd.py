"""PAMD (Han, Wang, Niu & Li, WWW 2022): pre-training modality-disentangled item representations.

Disentangled encoder. Per content modality m, the item's L2-normalised pre-trained feature x̂^m goes through two
linear heads: a modality-COMMON part c^m = C_m x̂^m and a modality-SPECIFIC part s^m = S_m x̂^m (each p wide, zero
where the item lacks m). A linear decoder per modality reconstructs x̂^m from [c^m ‖ s^m].

Pre-training losses, on the distinct positive and negative items of the batch's first ``contrastive_rows`` rows
(docs/models/pamd.md says which parts are the paper's):

- alignment (contrastive): for every ordered pair of modalities (a, b) and the batch items having both, InfoNCE of
  ĉ^a_i (cosine / τ) with positive ĉ^b_i, negatives the other items' ĉ^b AND every batch item's specific parts ŝ^a,
  ŝ^b (the item's own included): common parts of one item match across modalities, and are pushed away from what is
  specific;
- separation: mean over items having both of cos²(s^a_i, s^b_i): the specific parts of two modalities pushed apart
  (orthogonal);
- reconstruction: Σ_m mean over items having m of ‖D_m([c^m ‖ s^m]) − x̂^m‖²: the parts together keep the feature,
  so a specific part cannot collapse to nothing.

L_pre = L_align + L_sep + L_rec.

Item content vector h_i = [c̄_i ‖ s^1_i ‖ … ‖ s^M_i], c̄_i the mean of c^m_i over the modalities the item has (aligned
common parts are interchangeable, so an item missing a modality keeps a common part).

Stages (the pre-training → fine-tuning of docs/mp4sr.md: ``init_from`` loads the pre-training run):

- ``stage="pretrain"``: loss L_pre; content only (no ID or user parameters): a user is the mean content vector of
  their training items, items are h_i (an item-to-item content recommender, evaluated and selected like any run).
- ``stage="finetune"``: LightGCN over the user–item graph on ego vectors [ID ‖ content]: users [e_u ‖ t_u] (both
  learned), items [e_i ‖ h_i]; score z_u · z_i. Loss BPR + pretrain_weight · L_pre + reg_weight · EmbLoss of the
  batch's ID and user-content embeddings.

Missing modalities: an absent modality's parts are zero (whatever its feature row holds), it is left out of c̄ and of
every pre-training term. A new item (content encoder) gets a zero ID block and h_i / (L + 1) (fine-tuning: what
LightGCN gives an item without edges) or h_i (pre-training).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

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
from models.graph import light_propagate, mean_aggregation, normalized_bipartite_adjacency
from models.losses import bpr_loss, embedding_norm_penalty, in_batch_info_nce


@dataclass(frozen=True)
class PAMDConfig:
    stage: Literal["pretrain", "finetune"] = "finetune"
    embedding_size: int = 64  # the ID block (LightGCN, as the project's LightGCN)
    part_size: int = 32  # p: width of the common part and of each specific part (content block (1 + M)·p)
    n_layers: int = 2  # LightGCN layers in fine-tuning
    temperature: float = 0.2  # τ of the alignment InfoNCE (SGL's default; the paper's value is not at hand)
    pretrain_weight: float = 0.1  # fine-tuning: weight of L_pre kept beside BPR (0: plain fine-tuning); grid below
    # L_pre on the distinct items of the batch's first rows (positives and negatives): InfoNCE over every item of
    # a 2048-row batch (all of lfm2k's 1425) made an epoch ~15× slower than LightGCN on these shared CPUs
    contrastive_rows: int = 256
    reg_weight: float = 1e-4  # EmbLoss on the batch's ID and user-content embeddings, as LightGCN here


class DisentangledEncoder(nn.Module):
    """Per modality a common and a specific linear head on the normalised feature, zero where the item lacks it."""

    def __init__(self, dims: dict[str, int], part_size: int) -> None:
        super().__init__()
        self.names = sorted(dims)
        self.common = nn.ModuleDict({n: nn.Linear(dims[n], part_size) for n in self.names})
        self.specific = nn.ModuleDict({n: nn.Linear(dims[n], part_size) for n in self.names})

    def forward(self, features: list[torch.Tensor], masks: list[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Per modality features (N, d_m) and float masks (N, 1) → common parts (N, M, p), specific parts (N, M, p)
        and the (N, M) float presence."""
        common, specific = [], []
        for name, x, mask in zip(self.names, features, masks, strict=True):
            x_hat = F.normalize(x * mask, dim=1)  # (N, d_m), zero where absent
            common.append(self.common[name](x_hat) * mask)
            specific.append(self.specific[name](x_hat) * mask)
        return torch.stack(common, 1), torch.stack(specific, 1), torch.cat(masks, dim=1)


def content_vectors(common: torch.Tensor, specific: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(N, M, p) common and specific parts, (N, M) float presence → (N, (1 + M)·p) h = [c̄ ‖ s^1 ‖ … ‖ s^M], c̄ the
    mean common part over the present modalities (zero for an item with none)."""
    count = present.sum(1, keepdim=True)  # (N, 1)
    mean_common = common.sum(1) / count.clamp(min=1.0)  # absent parts are already zero
    return torch.cat([mean_common, specific.flatten(1)], dim=1)


class PAMD(Recommender):
    present: torch.Tensor
    adjacency: torch.Tensor

    def __init__(self, config: PAMDConfig, inputs: ModelInputs) -> None:
        super().__init__()
        require_modalities(inputs, "PAMD")
        self.config = config
        self.n_users, self.n_items = inputs.n_users, inputs.n_items
        self.content_names = sorted(inputs.modalities)
        dims = {n: inputs.modalities[n].features.shape[1] for n in self.content_names}
        p = config.part_size
        self.encoder = DisentangledEncoder(dims, p)
        self.decoders = nn.ModuleDict({n: nn.Linear(2 * p, dims[n]) for n in self.content_names})
        for name in self.content_names:
            m = inputs.modalities[name]
            self.register_buffer(f"features_{name}", m.features * m.present[:, None], persistent=False)
        present = torch.stack([inputs.modalities[n].present for n in self.content_names], dim=1)  # (I, M)
        self.register_buffer("present", present.float(), persistent=False)
        content_size = (1 + len(self.content_names)) * p
        if config.stage == "finetune":
            self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_users, config.embedding_size)))
            self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_items, config.embedding_size)))
            self.user_content = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_users, content_size)))
            adjacency = normalized_bipartite_adjacency(inputs.n_users, inputs.n_items, inputs.train_users,
                                                       inputs.train_items)  # fmt: skip
        else:  # pre-training: a user is the mean content vector of their training items
            adjacency = mean_aggregation(inputs.n_users, inputs.n_items, inputs.train_users, inputs.train_items)
        self.register_buffer("adjacency", adjacency, persistent=False)

    # ------------------------------------------------------------------------------------------- the encoder
    def parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every item's common and specific parts, each (I, M, p)."""
        features = [self.get_buffer(f"features_{n}") for n in self.content_names]
        masks = [self.present[:, m, None] for m in range(len(self.content_names))]
        common, specific, _ = self.encoder(features, masks)
        return common, specific

    def pretraining_loss(self, common: torch.Tensor, specific: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """L_align + L_sep + L_rec on the distinct ``items`` (N,), from all items' parts (I, M, p)."""
        c, s, present = common[items], specific[items], self.present[items] > 0  # (N, M, p), (N, M)
        terms = []
        for a, b in itertools.permutations(range(len(self.content_names)), 2):
            both = present[:, a] & present[:, b]
            if int(both.sum()) < 2:  # InfoNCE needs a negative
                continue
            anchors = F.normalize(c[both, a], dim=1)  # (N', p)
            keys = F.normalize(torch.cat([c[both, b], s[both, a], s[both, b]]), dim=1)  # (3N', p)
            rows = torch.arange(anchors.shape[0], device=anchors.device)
            terms.append(in_batch_info_nce(anchors, keys, rows, temperature=self.config.temperature))
            if a < b:  # separation, once per unordered pair
                terms.append(F.cosine_similarity(s[both, a], s[both, b], dim=1).pow(2).mean())
        for m, name in enumerate(self.content_names):
            has = present[:, m]
            if not bool(has.any()):
                continue
            x_hat = F.normalize(self.get_buffer(f"features_{name}")[items[has]], dim=1)  # (N', d_m)
            decoded = self.decoders[name](torch.cat([c[has, m], s[has, m]], dim=1))
            terms.append((decoded - x_hat).pow(2).sum(-1).mean())
        return torch.stack(terms).sum() if terms else common.new_zeros(())

    def nodes(self, common: torch.Tensor, specific: torch.Tensor) -> torch.Tensor:
        """(U+I, D) user and item vectors of the current stage from the items' parts."""
        items = content_vectors(common, specific, self.present)  # (I, (1+M)·p)
        if self.config.stage == "pretrain":
            return torch.cat([torch.sparse.mm(self.adjacency, items), items])
        ego = torch.cat([torch.cat([self.user_embedding, self.user_content], 1),
                         torch.cat([self.item_embedding, items], 1)])  # fmt: skip  (U+I, d + (1+M)·p)
        return light_propagate(self.adjacency, ego, self.config.n_layers)

    # ------------------------------------------------------------------------------------------------ the model
    def loss(self, batch: PairwiseBatch) -> torch.Tensor:  # type: ignore[override]
        common, specific = self.parts()
        rows = self.config.contrastive_rows
        batch_items = torch.unique(torch.cat([batch.pos_items[:rows], batch.neg_items[:rows]]))
        if self.config.stage == "pretrain":
            return self.pretraining_loss(common, specific, batch_items)
        nodes = self.nodes(common, specific)
        u = nodes[batch.users]
        pos, neg = nodes[self.n_users + batch.pos_items], nodes[self.n_users + batch.neg_items]
        loss = bpr_loss((u * pos).sum(-1), (u * neg).sum(-1))
        if self.config.pretrain_weight > 0.0:
            loss = loss + self.config.pretrain_weight * self.pretraining_loss(common, specific, batch_items)
        if self.config.reg_weight > 0.0:
            loss = loss + self.config.reg_weight * embedding_norm_penalty(
                torch.cat([self.user_embedding[batch.users], self.user_content[batch.users]], 1),
                self.item_embedding[batch.pos_items], self.item_embedding[batch.neg_items])  # fmt: skip
        return loss

    def representations(self) -> Representations:
        nodes = self.nodes(*self.parts())
        return Representations(users=nodes[: self.n_users], items=nodes[self.n_users :])

    def content_encoder(self) -> ContentEncoder:
        return PAMDContentEncoder(self)


class PAMDContentEncoder(ContentEncoder):
    """A new item's PAMD vector from its content: fine-tuned, a zero ID block and h / (L + 1) (no edges to smooth);
    pre-trained, h."""

    def __init__(self, model: PAMD) -> None:
        super().__init__()
        self.modality_names = tuple(model.content_names)
        self.encoder = model.encoder
        finetuned = model.config.stage == "finetune"
        self.id_size = model.config.embedding_size if finetuned else 0
        self.layer_share = 1.0 / (model.config.n_layers + 1) if finetuned else 1.0

    def forward(self, *features_and_masks: torch.Tensor) -> torch.Tensor:
        features, masks = list(features_and_masks[0::2]), list(features_and_masks[1::2])  # (N, d_m), (N, 1)
        common, specific, present = self.encoder(features, masks)
        content = content_vectors(common, specific, present) * self.layer_share  # (N, (1+M)·p)
        return torch.cat([content.new_zeros(content.shape[0], self.id_size), content], dim=1)
