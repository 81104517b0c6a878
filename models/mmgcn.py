"""MMGCN (Wei et al., ACM MM 2019): one graph convolution network per modality over the user–item graph.

Per modality m, every node has a modality representation x: users a learned preference vector, items their
features (projected to 256-d first when the features are wide, as MMRec does for its 4096-d image features).
x starts L2-normalised, then each of the L layers computes (the paper's eq. 1, 5 and the concatenation
combination, which MMRec and the authors' code run):

    h      = LeakyReLU(mean_{j ∈ N(v)} x_j W_conv)            aggregation over the modality's user–item graph
    x̂      = LeakyReLU(W_lin x) + e_id                        the node's own representation plus its ID embedding
    x_next = LeakyReLU(W_g [h ‖ x̂])                           combination

A node's final representation is the mean over modalities of its last-layer x (MMRec: sum / number of
modalities; the paper's sum up to that constant). Score = user · item. Loss: BPR + reg_weight · (mean(e_id²) of
the batch users and items + Σ_m mean(P_m²) of the user preferences).

Where we differ from MMRec's code, following the paper: the ID embeddings and the user preferences are trained
(MMRec's are plain tensors moved with ``.to(device)``, outside ``parameters()``, so they stay at their random
initialisation), the number of layers is ``n_layers`` (MMRec's config says 2, its code always runs 3), and every
modality's preference is regularised (MMRec: only the image one).

Missing modalities: an item without modality m is not in m's graph (its users do not aggregate it, it
aggregates nothing), and its final representation averages only the modalities it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ModelInputs, PairwiseBatch, Recommender, Representations, require_modalities
from models.graph import bipartite_mean_aggregation, per_item_modality_weights
from models.losses import bpr_loss, mean_square_penalty


@dataclass(frozen=True)
class MMGCNConfig:
    embedding_size: int = 64
    n_layers: int = 2  # MMRec's config (its GCN code hard-codes 3)
    latent_dim: int = 256  # width wide features are projected to before the graph (MMRec: the image features)
    project_above: int = 512  # project features wider than this (MMRec: 4096-d image yes, 384-d text no)
    reg_weight: float = 1e-4  # MMRec grid {0, 1e-5, 1e-4, 1e-3, 1e-2, 0.1}


class ModalityGCN(nn.Module):
    """The GCN of one modality: users' preferences and items' features through ``n_layers`` layers → (U+I, d)."""

    aggregation: torch.Tensor

    def __init__(self, config: MMGCNConfig, n_users: int, feature_dim: int, aggregation: torch.Tensor) -> None:
        super().__init__()
        self.projection = nn.Linear(feature_dim, config.latent_dim) if feature_dim > config.project_above else None
        width = config.latent_dim if self.projection is not None else feature_dim
        self.preference = nn.Parameter(nn.init.xavier_normal_(torch.empty(n_users, width)))  # (U, width)
        d = config.embedding_size
        widths = [width] + [d] * (config.n_layers - 1)
        self.conv = nn.ParameterList([nn.Parameter(nn.init.xavier_normal_(torch.empty(w, w))) for w in widths])
        linear = [nn.Linear(w, d) for w in widths]
        combine = [nn.Linear(w + d, d) for w in widths]
        for layer in linear:
            nn.init.xavier_normal_(layer.weight)
        nn.init.xavier_normal_(combine[0].weight)  # as MMRec: later combination layers keep Linear's default
        self.linear, self.combine = nn.ModuleList(linear), nn.ModuleList(combine)
        self.register_buffer("aggregation", aggregation, persistent=False)  # (U+I, U+I) mean over neighbours

    def forward(self, features: torch.Tensor, id_embedding: torch.Tensor) -> torch.Tensor:
        items = self.projection(features) if self.projection is not None else features  # (I, width)
        x = F.normalize(torch.cat([self.preference, items]), dim=1)  # (U+I, width)
        for conv, linear, combine in zip(self.conv, self.linear, self.combine, strict=True):
            h = F.leaky_relu(torch.sparse.mm(self.aggregation, x @ conv))  # (U+I, width_l)
            x_hat = F.leaky_relu(linear(x)) + id_embedding  # (U+I, d)
            x = F.leaky_relu(combine(torch.cat([h, x_hat], dim=1)))  # (U+I, d)
        return x


class MMGCN(Recommender):
    node_weights: torch.Tensor

    def __init__(self, config: MMGCNConfig, inputs: ModelInputs) -> None:
        super().__init__()
        require_modalities(inputs, "MMGCN")
        if config.n_layers < 1:
            raise ValueError(f"MMGCN n_layers={config.n_layers}: expected at least 1")
        self.config = config
        self.n_users = inputs.n_users
        self.modality_names = sorted(inputs.modalities)
        n = inputs.n_users + inputs.n_items
        self.id_embedding = nn.Parameter(nn.init.xavier_normal_(torch.empty(n, config.embedding_size)))  # (U+I, d)
        self.gcns = nn.ModuleDict()
        for name in self.modality_names:
            m = inputs.modalities[name]
            has = m.present[inputs.train_items]  # edges to items that have the modality
            aggregation = bipartite_mean_aggregation(inputs.n_users, inputs.n_items, inputs.train_users[has],
                                                     inputs.train_items[has])  # fmt: skip
            self.gcns[name] = ModalityGCN(config, inputs.n_users, m.features.shape[1], aggregation)
            self.register_buffer(f"features_{name}", m.features.clone(), persistent=False)
        present = torch.stack([inputs.modalities[name].present for name in self.modality_names])  # (M, I)
        uniform = torch.full((len(self.modality_names),), 1.0 / len(self.modality_names))
        item_weights = per_item_modality_weights(uniform, present)  # (M, I)
        node_weights = torch.cat([uniform[:, None].expand(-1, inputs.n_users), item_weights], dim=1)  # (M, U+I)
        self.register_buffer("node_weights", node_weights, persistent=False)

    def propagate(self) -> torch.Tensor:
        out = torch.zeros_like(self.id_embedding)
        for m, name in enumerate(self.modality_names):
            out = out + self.node_weights[m][:, None] * self.gcns[name](getattr(self, f"features_{name}"),
                                                                        self.id_embedding)  # fmt: skip
        return out  # (U+I, d)

    def loss(self, batch: PairwiseBatch) -> torch.Tensor:  # type: ignore[override]
        nodes = self.propagate()
        u = nodes[batch.users]  # (B, d)
        pos, neg = nodes[self.n_users + batch.pos_items], nodes[self.n_users + batch.neg_items]
        ranking = bpr_loss((u * pos).sum(-1), (u * neg).sum(-1))
        batch_items = self.n_users + torch.cat([batch.pos_items, batch.neg_items])
        penalty = mean_square_penalty(self.id_embedding[batch.users], self.id_embedding[batch_items],
                                      *[cast(ModalityGCN, gcn).preference for gcn in self.gcns.values()])  # fmt: skip
        return ranking + self.config.reg_weight * penalty

    def representations(self) -> Representations:
        nodes = self.propagate()
        return Representations(users=nodes[: self.n_users], items=nodes[self.n_users :])
