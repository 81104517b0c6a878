"""FREEDOM (Zhou & Shen, ACM MM 2023): freeze the item–item graph, denoise the user–item graph.

- Item–item graph: per modality a cosine kNN graph (k = 10, the item itself included) over the RAW features,
  binary weights, D^{-1/2} S D^{-1/2}; fused with fixed weights (text 0.9, image 0.1 in MMRec) and FROZEN:
  built once here, never learned (LATTICE relearns it every epoch; the paper shows freezing loses nothing).
- Item graph convolution: h = S^L e_id over the item ID embeddings (L = 1), added UNnormalised to the item output.
- User–item graph: LightGCN (2 layers, mean of layers 0..2). In training it runs on a degree-sensitively pruned
  graph, re-drawn every epoch: keep (1 − dropout) of the edges, sampled ∝ 1/√(d_u d_i); evaluation uses all edges.
- Loss: BPR on ê_u·ê_i, plus reg_weight × Σ_m BPR(ê_u, W_m x_m⁺, W_m x_m⁻), each modality's projected features
  (the raw features fine-tuned, as in MMRec) ranked against the user's final embedding. No L2 penalty.

Missing modalities: an item without modality m has no edges in m's kNN graph and is nobody's neighbour there; its
fusion weights are renormalised over the modalities it has; triples whose positive or negative item lacks m are
left out of m's auxiliary BPR term.

With more or other modalities than (text, image), text keeps ``text_weight`` and the others share the rest
(lfm2k: text 0.9, audio 0.1); without text the weights are equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.base import ModelInputs, PairwiseBatch, Recommender, Representations, require_modalities
from models.graph import (
    degree_sensitive_edge_sample,
    fuse_graphs,
    knn_edges,
    light_propagate,
    normalized_bipartite_adjacency,
    per_item_modality_weights,
    row_sum_normalized,
)
from models.losses import bpr_loss


@dataclass(frozen=True)
class FREEDOMConfig:
    embedding_size: int = 64  # also the projected feature size (MMRec: feat_embed_dim = embedding_size = 64)
    knn_k: int = 10
    n_mm_layers: int = 1  # item–item graph layers
    n_ui_layers: int = 2  # user–item LightGCN layers
    text_weight: float = 0.9  # MMRec's mm_image_weight = 0.1: text 0.9, the other modalities share 0.1
    dropout: float = 0.8  # fraction of user–item edges pruned each epoch; MMRec grid {0.8, 0.9}
    reg_weight: float = 1e-3  # weight of the modality BPR terms; MMRec grid {0, 1e-5, 1e-4, 1e-3}


def fixed_modality_weights(names: list[str], text_weight: float) -> torch.Tensor:
    """(M,) FREEDOM's fixed fusion weights: text gets ``text_weight``, the other modalities share the rest."""
    if "text" not in names or len(names) == 1:
        return torch.full((len(names),), 1.0 / len(names))
    other = (1.0 - text_weight) / (len(names) - 1)
    return torch.tensor([text_weight if name == "text" else other for name in names])


def frozen_item_graph(inputs: ModelInputs, k: int, text_weight: float) -> torch.Tensor:
    """The fused, frozen (I, I) kNN item graph of FREEDOM (sub-second on thousands of items: built, not cached)."""
    names = sorted(inputs.modalities)
    graphs = []
    for name in names:
        m = inputs.modalities[name]
        rows, cols, _ = knn_edges(m.features, k, present=m.present)
        graphs.append(row_sum_normalized(inputs.n_items, rows, cols, torch.ones(rows.shape[0])))
    present = torch.stack([inputs.modalities[name].present for name in names])  # (M, I)
    weights = per_item_modality_weights(fixed_modality_weights(names, text_weight), present)  # (M, I)
    return fuse_graphs(graphs, weights)


class FREEDOM(Recommender):
    item_graph: torch.Tensor
    adjacency: torch.Tensor
    train_users: torch.Tensor
    train_items: torch.Tensor

    def __init__(self, config: FREEDOMConfig, inputs: ModelInputs) -> None:
        super().__init__()
        require_modalities(inputs, "FREEDOM")
        if not 0.0 <= config.dropout < 1.0:
            raise ValueError(f"FREEDOM dropout={config.dropout}: expected a fraction in [0, 1)")
        self.config = config
        self.n_users, self.n_items = inputs.n_users, inputs.n_items
        self.modality_names = sorted(inputs.modalities)
        d = config.embedding_size
        self.user_embedding = nn.Embedding(inputs.n_users, d)
        self.item_embedding = nn.Embedding(inputs.n_items, d)
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_embedding.weight)
        # MMRec fine-tunes the raw features (nn.Embedding.from_pretrained(..., freeze=False)); they only feed the
        # auxiliary BPR terms, the frozen graph is built from the originals.
        self.features = nn.ParameterDict(
            {name: nn.Parameter(inputs.modalities[name].features.clone()) for name in self.modality_names}
        )
        self.projections = nn.ModuleDict(
            {name: nn.Linear(inputs.modalities[name].features.shape[1], d) for name in self.modality_names}
        )
        for name in self.modality_names:
            self.register_buffer(f"present_{name}", inputs.modalities[name].present.clone(), persistent=False)
        self.register_buffer("item_graph", frozen_item_graph(inputs, config.knn_k, config.text_weight), persistent=False)
        adjacency = normalized_bipartite_adjacency(inputs.n_users, inputs.n_items, inputs.train_users, inputs.train_items)
        self.register_buffer("adjacency", adjacency, persistent=False)
        self.register_buffer("train_users", inputs.train_users.clone(), persistent=False)
        self.register_buffer("train_items", inputs.train_items.clone(), persistent=False)
        self.pruned_adjacency: torch.Tensor | None = None  # this epoch's pruned graph; None: not drawn yet

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        """Draw this epoch's degree-sensitively pruned user–item graph (MMRec's ``pre_epoch_processing``)."""
        if self.config.dropout <= 0.0:
            self.pruned_adjacency = None
            return
        pruned = degree_sensitive_edge_sample(self.n_users, self.n_items, self.train_users, self.train_items,
                                              1.0 - self.config.dropout, generator=generator)  # fmt: skip
        self.pruned_adjacency = pruned.to(self.adjacency.device)

    def propagate(self, adjacency: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.item_embedding.weight  # (I, d)
        for _ in range(self.config.n_mm_layers):
            h = torch.sparse.mm(self.item_graph, h)
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight])  # (U+I, d)
        final = light_propagate(adjacency, ego, self.config.n_ui_layers)  # (U+I, d)
        return final[: self.n_users], final[self.n_users :] + h

    def loss(self, batch: PairwiseBatch) -> torch.Tensor:  # type: ignore[override]
        # until the trainer's first on_epoch_start (or with dropout 0) the full graph is used
        users, items = self.propagate(self.adjacency if self.pruned_adjacency is None else self.pruned_adjacency)
        u = users[batch.users]  # (B, d)
        loss = bpr_loss((u * items[batch.pos_items]).sum(-1), (u * items[batch.neg_items]).sum(-1))
        if self.config.reg_weight == 0.0:
            return loss
        modality_terms = []
        for name in self.modality_names:
            present: torch.Tensor = getattr(self, f"present_{name}")
            keep = present[batch.pos_items] & present[batch.neg_items]  # (B,)
            if not bool(keep.any()):
                continue
            projected = self.projections[name](self.features[name])  # (I, d): cheaper than 2B rows
            uk, pos, neg = u[keep], projected[batch.pos_items[keep]], projected[batch.neg_items[keep]]  # (B', d)
            modality_terms.append(bpr_loss((uk * pos).sum(-1), (uk * neg).sum(-1)))
        if not modality_terms:
            return loss
        return loss + self.config.reg_weight * torch.stack(modality_terms).sum()

    def representations(self) -> Representations:
        users, items = self.propagate(self.adjacency)
        return Representations(users=users, items=items)
