"""LATTICE (Zhang et al., ACM MM 2021): mine a latent item–item graph from the modalities, over a LightGCN backbone.

- Original graph per modality: cosine kNN (k = 10, the item itself included) over the RAW features, weighted by
  similarity, S̃ = D^{-1/2} S D^{-1/2} (D: row sums); built once.
- Learned graph per modality: the same kNN over PROJECTED features W_m x_m + b_m (the raw features fine-tuned,
  as in the paper's and MMRec's code), so the structure itself is learned.
- Fusion: learnable modality weights α = softmax(w) (w initialised equal) combine the per-modality graphs:
  A = (1 − λ) · norm(Σ_m α_m S_m^learned) + λ · Σ_m α_m S̃_m^original, λ = 0.9 (the skip to the original graph).
- Item graph convolution over A: h = A^L e_id (L = 1); the item output is LightGCN's item embedding + h/‖h‖.
- Backbone: LightGCN over D^{-1}(A_ui + I) (MMRec's LATTICE graph: row-normalised, self loops), 2 layers,
  mean of layers 0..2.
- Loss: BPR + reg_weight · ½(‖u‖² + ‖i⁺‖² + ‖i⁻‖²)/B on the FINAL batch embeddings (as in MMRec's LATTICE).
- As in the paper's code, the learned graph is rebuilt (with gradients) on the first batch of every epoch and
  reused, detached, for the epoch's other batches; evaluation rebuilds it from the current parameters.

Missing modalities: an item without modality m has no edges in m's graphs (original and learned) and is nobody's
neighbour there, and its fusion weights are renormalised over the modalities it has. Any set of modalities works;
α has one entry per modality.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ModelInputs, PairwiseBatch, Recommender, Representations, require_modalities
from models.graph import (
    bipartite_mean_aggregation,
    fuse_graphs,
    knn_edges,
    light_propagate,
    per_item_modality_weights,
    row_sum_normalized,
)
from models.losses import bpr_loss, squared_l2_penalty


@dataclass(frozen=True)
class LATTICEConfig:
    embedding_size: int = 64
    feat_embed_dim: int = 64  # size of the projected features the learned graph is mined from
    knn_k: int = 10
    lambda_coeff: float = 0.9  # weight of the original (raw-feature) graph against the learned one
    n_layers: int = 1  # item–item graph layers
    n_ui_layers: int = 2  # MMRec: len(weight_size) = len([64, 64])
    reg_weight: float = 1e-4  # MMRec grid {0, 1e-5, 1e-4, 1e-3}


def knn_similarity_graph(n_items: int, features: torch.Tensor, k: int, present: torch.Tensor) -> torch.Tensor:
    """Sparse (I, I) kNN graph weighted by cosine similarity, not normalised."""
    rows, cols, sims = knn_edges(features, k, present=present)
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), sims, (n_items, n_items), check_invariants=True).coalesce()


class LATTICE(Recommender):
    adjacency: torch.Tensor
    present: torch.Tensor

    def __init__(self, config: LATTICEConfig, inputs: ModelInputs) -> None:
        super().__init__()
        require_modalities(inputs, "LATTICE")
        self.config = config
        self.n_users, self.n_items = inputs.n_users, inputs.n_items
        self.modality_names = sorted(inputs.modalities)
        self.user_embedding = nn.Embedding(inputs.n_users, config.embedding_size)
        self.item_embedding = nn.Embedding(inputs.n_items, config.embedding_size)
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_embedding.weight)
        self.features = nn.ParameterDict(
            {name: nn.Parameter(inputs.modalities[name].features.clone()) for name in self.modality_names}
        )  # fine-tuned raw features (nn.Embedding.from_pretrained(..., freeze=False) in the paper's code)
        self.projections = nn.ModuleDict(
            {name: nn.Linear(inputs.modalities[name].features.shape[1], config.feat_embed_dim)
             for name in self.modality_names}
        )  # fmt: skip
        self.modal_weight = nn.Parameter(torch.full((len(self.modality_names),), 1.0 / len(self.modality_names)))
        present = torch.stack([inputs.modalities[name].present for name in self.modality_names])  # (M, I)
        self.register_buffer("present", present, persistent=False)
        for name in self.modality_names:  # original graphs, normalised per modality (sub-second: built, not cached)
            m = inputs.modalities[name]
            rows, cols, sims = knn_edges(m.features, config.knn_k, present=m.present)
            self.register_buffer(f"original_{name}", row_sum_normalized(inputs.n_items, rows, cols, sims),
                                 persistent=False)  # fmt: skip
        adjacency = bipartite_mean_aggregation(inputs.n_users, inputs.n_items, inputs.train_users, inputs.train_items,
                                               self_loops=True)  # fmt: skip
        self.register_buffer("adjacency", adjacency, persistent=False)
        self.epoch_graph: torch.Tensor | None = None  # the learned graph of this epoch, detached; None: rebuild

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        self.epoch_graph = None  # rebuilt, with gradients, on the epoch's first batch

    def item_graph(self) -> torch.Tensor:
        """(1 − λ) · norm(Σ α_m S_m^learned) + λ · Σ α_m S̃_m^original, sparse (I, I)."""
        weights = per_item_modality_weights(torch.softmax(self.modal_weight, dim=0), self.present)  # (M, I)
        learned = [
            knn_similarity_graph(self.n_items, self.projections[name](self.features[name]), self.config.knn_k,
                                 self.present[m])  # fmt: skip
            for m, name in enumerate(self.modality_names)
        ]
        fused = fuse_graphs(learned, weights)
        learned_normalized = row_sum_normalized(self.n_items, fused.indices()[0], fused.indices()[1], fused.values())
        original = fuse_graphs([getattr(self, f"original_{name}") for name in self.modality_names], weights)
        lam = self.config.lambda_coeff
        mix = torch.tensor([[1.0 - lam], [lam]], device=weights.device).expand(2, self.n_items)
        return fuse_graphs([learned_normalized, original], mix)

    def propagate(self, item_graph: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.item_embedding.weight  # (I, d)
        for _ in range(self.config.n_layers):
            h = torch.sparse.mm(item_graph, h)
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight])  # (U+I, d)
        final = light_propagate(self.adjacency, ego, self.config.n_ui_layers)  # (U+I, d)
        return final[: self.n_users], final[self.n_users :] + F.normalize(h, dim=1)

    def loss(self, batch: PairwiseBatch) -> torch.Tensor:  # type: ignore[override]
        if self.epoch_graph is None:
            graph = self.item_graph()  # gradients reach the projections, features and modality weights
            self.epoch_graph = graph.detach()
        else:
            graph = self.epoch_graph
        users, items = self.propagate(graph)
        u, p, n = users[batch.users], items[batch.pos_items], items[batch.neg_items]  # (B, d) each
        ranking = bpr_loss((u * p).sum(-1), (u * n).sum(-1))
        return ranking + self.config.reg_weight * squared_l2_penalty(u, p, n)

    def representations(self) -> Representations:
        users, items = self.propagate(self.item_graph())
        return Representations(users=users, items=items)
