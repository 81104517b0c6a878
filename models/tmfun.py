"""TMFUN (Zhou, Guo, Sun, Song & Yu, SIGIR 2023): attention-guided multi-step fusion over graph-learned node vectors.

Graph-learned node vectors (all graphs built once, here, from the training edges and the raw features; frozen):

    ê_u, ê_i  = LightGCN over D^{-1/2} A D^{-1/2} of the user–item graph (mean of layers 0..L)   interaction vectors
    h^m_i     = ((S^m)^K E)_i   per content modality m: the item ID embeddings E smoothed over m's
                                modality feature graph S^m (binary cosine kNN, itself included, D^{-1/2} S D^{-1/2})
    h^f_i     = ((S^f)^K E)_i   the same over the ITEM feature graph S^f, a kNN graph of the concatenated
                                L2-normalised features [x̂^1 ‖ … ‖ x̂^M] (cross-modal item–item structure)

Attention-guided multi-step fusion, guided by the item's interaction vector ê_i (the interaction data decides how
much each modality matters to that item):

    att_g(c_1..c_n) = softmax_c(q · tanh(W_c c + b + W_g g))   one additive attention block per step; its scores
                                                              see g and c detached (they weigh, not shape, them)
    step 1, modality with modality:  a_i = att^1_{ê_i}(h^1_i..h^M_i),   h^mm_i = Σ_m a^m_i h^m_i
    step 2, modality with ID:        b_i = att^2_{ê_i}(ê_i, ĥ^mm_i),   z_i = n_i (b^id_i ê_i + b^mm_i ĥ^mm_i)

with ĥ^mm = h^mm / ‖h^mm‖ (LATTICE's and FREEDOM's normalisation of the item–item output before it meets the ID
vector) and n_i the number of step-2 candidates the item has (2, or 1 without any modality), so that equal
weights give LATTICE's ê_i + ĥ^mm_i. Users: z_u = ê_u. Score: z_u · z_i (an inner product; the bundle serves it).

Contrastive learning aligns the two multimodal views of an item: InfoNCE of ĥ^mm_i against ĥ^f_i (cosine / τ,
the batch's other distinct positive items as negatives). Loss: BPR(z_u·z_i⁺ − z_u·z_i⁻) + cl_weight · L_cl +
reg_weight · EmbLoss of the batch's layer-0 ID embeddings.

Missing modalities: an item without m is nobody's neighbour in S^m and has no row there (h^m_i = 0), and is left
out of step 1's softmax; its block of the concatenated features is zero (whatever its feature row holds). An item
with no modality has h^mm = h^f = 0, only the ID candidate in step 2 (z_i = ê_i) and no contrastive term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ModelInputs, PairwiseBatch, Recommender, Representations, require_modalities
from models.graph import knn_edges, light_propagate, normalized_bipartite_adjacency, row_sum_normalized
from models.losses import bpr_loss, embedding_norm_penalty, in_batch_info_nce


@dataclass(frozen=True)
class TMFUNConfig:
    embedding_size: int = 64
    n_ui_layers: int = 2  # user–item LightGCN layers (MMRec's LightGCN default)
    n_mm_layers: int = 1  # item–item graph layers (LATTICE's and FREEDOM's default)
    knn_k: int = 10  # neighbours per item in every feature graph (LATTICE, FREEDOM)
    cl_weight: float = 0.1  # λ of the contrastive loss (the paper's key hyper-parameter; our grid {0.01, 0.1, 0.5})
    temperature: float = 0.2  # τ of the InfoNCE (SGL's default; no published TMFUN value at hand)
    reg_weight: float = 1e-4  # EmbLoss on the batch's layer-0 embeddings, as LightGCN here


def binary_knn_graph(features: torch.Tensor, present: torch.Tensor, k: int) -> torch.Tensor:
    """(I, d) features, (I,) presence → the sparse (I, I) D^{-1/2} S D^{-1/2} of the binary cosine kNN graph (each
    present item keeps its k nearest present items, itself included); absent items have no edges."""
    rows, cols, _ = knn_edges(features * present[:, None], k, present=present)
    return row_sum_normalized(features.shape[0], rows, cols, torch.ones(rows.shape[0]))


class GuidedAttention(nn.Module):
    """Additive attention over candidates, guided: logit_c = q · tanh(W_c c + W_g g), softmax over the present
    candidates (absent ones get 0; a row with none present gets all zeros). Bounded logits (|logit| ≤ ‖q‖₁)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.candidate = nn.Linear(dim, dim)
        self.guide = nn.Linear(dim, dim, bias=False)
        self.query = nn.Linear(dim, 1, bias=False)

    def forward(self, guide: torch.Tensor, candidates: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(N, d) guides, (N, C, d) candidates, (N, C) presence → (N, C) weights. The inputs are detached: the
        attention weighs the node vectors but does not shape them (with gradients through its inputs the ID
        embeddings learned to game the ID-vs-modality gate and validation recall peaked by epoch 4 on lfm2k)."""
        guide, candidates = guide.detach(), candidates.detach()
        hidden = torch.tanh(self.candidate(candidates) + self.guide(guide).unsqueeze(1))  # (N, C, d)
        logits = self.query(hidden).squeeze(-1)  # (N, C)
        weights = torch.softmax(logits.masked_fill(~present, -torch.inf), dim=-1)
        return torch.where(present.any(-1, keepdim=True), weights, torch.zeros_like(weights))


class TMFUN(Recommender):
    adjacency: torch.Tensor
    present: torch.Tensor
    item_feature_graph: torch.Tensor

    def __init__(self, config: TMFUNConfig, inputs: ModelInputs) -> None:
        super().__init__()
        require_modalities(inputs, "TMFUN")
        self.config = config
        self.n_users, self.n_items = inputs.n_users, inputs.n_items
        self.content_names = sorted(inputs.modalities)
        d = config.embedding_size
        self.user_embedding = nn.Embedding(inputs.n_users, d)
        self.item_embedding = nn.Embedding(inputs.n_items, d)
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_embedding.weight)
        # one guided attention block per fusion step: step 1 over the modalities, step 2 over (ID, multimodal)
        self.modality_attention, self.fusion_attention = GuidedAttention(d), GuidedAttention(d)
        present = torch.stack([inputs.modalities[n].present for n in self.content_names], dim=1)  # (I, M)
        self.register_buffer("present", present, persistent=False)
        normalized = []
        for m, name in enumerate(self.content_names):
            # L2-normalised, zero where absent (whatever the absent rows held)
            x = F.normalize(inputs.modalities[name].features.float(), dim=1) * present[:, m, None]  # (I, d_m)
            normalized.append(x)
            self.register_buffer(f"modality_graph_{name}", binary_knn_graph(x, present[:, m], config.knn_k),
                                 persistent=False)  # fmt: skip
        self.register_buffer("item_feature_graph", binary_knn_graph(torch.cat(normalized, dim=1), present.any(1),
                                                                    config.knn_k), persistent=False)  # fmt: skip
        adjacency = normalized_bipartite_adjacency(inputs.n_users, inputs.n_items, inputs.train_users, inputs.train_items)
        self.register_buffer("adjacency", adjacency, persistent=False)

    def modality_graph(self, name: str) -> torch.Tensor:
        graph: torch.Tensor = self.get_buffer(f"modality_graph_{name}")
        return graph

    def item_graph_propagate(self, graph: torch.Tensor) -> torch.Tensor:
        """(S)^K E: the item ID embeddings over an item–item graph, (I, d)."""
        h = self.item_embedding.weight
        for _ in range(self.config.n_mm_layers):
            h = torch.sparse.mm(graph, h)
        return h

    def node_vectors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Users ê_u (U, d), items ê_i (I, d), per-modality item vectors h^m (I, M, d), item-feature-graph h^f (I, d)."""
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight])  # (U+I, d)
        final = light_propagate(self.adjacency, ego, self.config.n_ui_layers)  # (U+I, d)
        modality = torch.stack([self.item_graph_propagate(self.modality_graph(n)) for n in self.content_names], 1)
        return final[: self.n_users], final[self.n_users :], modality, self.item_graph_propagate(self.item_feature_graph)

    def fuse(self, items: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two fusion steps: (I, d) ê_i, (I, M, d) h^m → (I, d) z_i and (I, d) ĥ^mm (zero without modality)."""
        a = self.modality_attention(items, modality, self.present)  # (I, M)
        multimodal = F.normalize((a[..., None] * modality).sum(1), dim=1)  # (I, d) ĥ^mm
        has_content = self.present.any(1)  # (I,)
        candidates = torch.stack([items, multimodal], dim=1)  # (I, 2, d)
        candidate_present = torch.stack([torch.ones_like(has_content), has_content], dim=1)  # (I, 2)
        b = self.fusion_attention(items, candidates, candidate_present)  # (I, 2)
        count = candidate_present.sum(1, keepdim=True).to(items.dtype)  # (I, 1): n_i
        return count * (b[..., None] * candidates).sum(1), multimodal

    def loss(self, batch: PairwiseBatch) -> torch.Tensor:  # type: ignore[override]
        users, items, modality, joint = self.node_vectors()
        fused, multimodal = self.fuse(items, modality)
        u = users[batch.users]  # (B, d)
        loss = bpr_loss((u * fused[batch.pos_items]).sum(-1), (u * fused[batch.neg_items]).sum(-1))
        if self.config.cl_weight > 0.0:
            distinct = torch.unique(batch.pos_items)
            distinct = distinct[self.present[distinct].any(1)]  # (N,) items with at least one modality
            if distinct.numel() > 1:
                rows = torch.arange(distinct.numel(), device=distinct.device)
                loss = loss + self.config.cl_weight * in_batch_info_nce(
                    multimodal[distinct], F.normalize(joint[distinct], dim=1), rows,
                    temperature=self.config.temperature)  # fmt: skip
        if self.config.reg_weight > 0.0:
            loss = loss + self.config.reg_weight * embedding_norm_penalty(
                self.user_embedding(batch.users), self.item_embedding(batch.pos_items),
                self.item_embedding(batch.neg_items))  # fmt: skip
        return loss

    def representations(self) -> Representations:
        users, items, modality, _ = self.node_vectors()
        fused, _ = self.fuse(items, modality)
        return Representations(users=users, items=fused)
