"""MMGCL (Yi, Wang, Ounis & Macdonald, SIGIR 2022): multi-modal graph contrastive learning.

Channels. Per content modality m a user–item graph (the training edges to items that HAVE m): users have a learned
modality-m embedding, items their L2-normalised features through a linear map W_m; LightGCN smooths both (mean of
layers 0..L over D^{-1/2} A D^{-1/2}). With ``id_channel`` one more graph carries ID embeddings (all edges). A node's
representation is the concatenation of its channels' outputs, z = [z^id ‖ z^1 ‖ … ‖ z^M], and the score is z_u · z_i.

Two views of every node, for the contrastive task only (ranking uses the full graphs, no masking):

- view 1, modality edge dropout: each channel's graph keeps each edge with probability 1 − ρ, drawn independently per
  channel (so the views of the modalities differ) and redrawn every epoch;
- view 2, modality masking: each node draws one content modality (uniformly) whose layer-0 input is replaced by
  random noise (a Gaussian of that channel's input scale, redrawn every step), on the full graphs.

Contrastive loss, for the batch's distinct users and, separately, its distinct positive items (as SGL): InfoNCE of view 1
against view 2 with cosine similarity / τ, the other batch nodes' view 2 as negatives, and the negative-sampling trick:
one more negative per anchor, its OWN view-2 representation with one content modality's block (drawn per anchor)
swapped for another batch node's. Matching on all modalities but one is then not enough, so every modality has to
carry the node (the paper's "learn the correlation between modalities and ensure each modality contributes").

Loss: BPR(z_u·z_i⁺, z_u·z_i⁻) + ssl_weight · (L_user + L_item) + reg_weight · EmbLoss of the batch's layer-0
embeddings.

Missing modalities: an item without m has no edge in m's graph, a zero input there (whatever its feature row holds),
and is never masked in m; its m block is then zero. A new item (content encoder) has a zero ID block and, per
modality it has, W_m x̂^m / (L + 1): exactly what LightGCN gives a trained item without edges.
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
from models.graph import light_propagate, normalized_bipartite_adjacency
from models.losses import bpr_loss, embedding_norm_penalty, in_batch_info_nce

ID_CHANNEL = "id"


@dataclass(frozen=True)
class MMGCLConfig:
    embedding_size: int = 64  # per channel: z is (1 + M)·64 wide with the ID channel
    n_layers: int = 2  # LightGCN layers per channel
    id_channel: bool = True  # an ID-embedding graph beside the modality graphs (docs/models/mmgcl.md)
    edge_dropout: float = 0.1  # ρ of view 1 (SGL's edge-dropout ratio; the paper's value is not public)
    ssl_weight: float = 0.1  # λ of the contrastive loss; validation grid {0.01, 0.1, 0.5}
    temperature: float = 0.2  # τ (SGL's default)
    hard_negatives: bool = True  # the negative-sampling trick (one modality-swapped negative per anchor)
    reg_weight: float = 1e-4  # EmbLoss on the batch's layer-0 embeddings, as LightGCN here


def swap_one_block(
    blocks: torch.Tensor, channels: torch.Tensor, partners: torch.Tensor, choice: torch.Tensor
) -> torch.Tensor:
    """(N, C, d) per-channel representations → the same with, in row n, block ``channels[choice[n]]`` taken from row
    ``partners[n]``: the modality-swapped negatives. ``channels`` (K,) the swappable channels, ``choice`` (N,) in
    [0, K), ``partners`` (N,) rows."""
    swapped = channels[choice]  # (N,)
    out = blocks.clone()
    rows = torch.arange(blocks.shape[0], device=blocks.device)
    out[rows, swapped] = blocks[partners, swapped]
    return out


class MMGCL(Recommender):
    present: torch.Tensor

    def __init__(self, config: MMGCLConfig, inputs: ModelInputs) -> None:
        super().__init__()
        require_modalities(inputs, "MMGCL")
        if not 0.0 <= config.edge_dropout < 1.0:
            raise ValueError(f"MMGCL edge_dropout={config.edge_dropout}: expected a fraction in [0, 1)")
        self.config = config
        self.n_users, self.n_items = inputs.n_users, inputs.n_items
        self.content_names = sorted(inputs.modalities)
        self.channel_names = [ID_CHANNEL, *self.content_names] if config.id_channel else list(self.content_names)
        d = config.embedding_size
        self.user_embeddings = nn.ParameterDict(
            {c: nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_users, d))) for c in self.channel_names})
        self.item_embedding = (nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_items, d)))
                               if config.id_channel else None)  # fmt: skip
        self.projections = nn.ModuleDict(
            {n: nn.Linear(inputs.modalities[n].features.shape[1], d) for n in self.content_names})
        presence = [torch.ones(inputs.n_items, dtype=torch.bool)] if config.id_channel else []
        presence += [inputs.modalities[n].present for n in self.content_names]
        self.register_buffer("present", torch.stack(presence, dim=1), persistent=False)  # (I, C)
        self.channel_edges: list[tuple[torch.Tensor, torch.Tensor]] = []  # per channel: its (users, items) edges
        for c, name in enumerate(self.channel_names):
            has = self.present[inputs.train_items, c]
            users, items = inputs.train_users[has], inputs.train_items[has]
            self.channel_edges.append((users, items))
            self.register_buffer(f"adjacency_{name}", normalized_bipartite_adjacency(
                inputs.n_users, inputs.n_items, users, items), persistent=False)  # fmt: skip
            if name != ID_CHANNEL:
                features = F.normalize(inputs.modalities[name].features, dim=1) * self.present[:, c, None]
                self.register_buffer(f"features_{name}", features, persistent=False)  # (I, d_m), 0 where absent
        self.dropped: list[torch.Tensor] | None = None  # this epoch's edge-dropped graphs (view 1)
        self.view_generator = torch.Generator()  # the masking draws; seeded by on_epoch_start

    # ------------------------------------------------------------------------------------------- the encoder
    def adjacency(self, channel: str) -> torch.Tensor:
        adjacency: torch.Tensor = self.get_buffer(f"adjacency_{channel}")
        return adjacency

    def inputs(self) -> list[torch.Tensor]:
        """Layer-0 embeddings per channel, each (U+I, d)."""
        egos = []
        for c, name in enumerate(self.channel_names):
            if name == ID_CHANNEL:
                assert self.item_embedding is not None
                items = self.item_embedding
            else:
                items = self.projections[name](self.get_buffer(f"features_{name}")) * self.present[:, c, None]
            egos.append(torch.cat([self.user_embeddings[name], items]))
        return egos

    def propagate(self, egos: list[torch.Tensor], graphs: list[torch.Tensor]) -> torch.Tensor:
        """(U+I, C, d): each channel's LightGCN output."""
        return torch.stack([light_propagate(g, e, self.config.n_layers) for g, e in zip(graphs, egos, strict=True)],
                           dim=1)  # fmt: skip

    def full_graphs(self) -> list[torch.Tensor]:
        return [self.adjacency(name) for name in self.channel_names]

    # ---------------------------------------------------------------------------------------------- the views
    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        """Draw this epoch's edge-dropped graphs (view 1) and seed the masking draws (view 2)."""
        device = self.present.device
        dropped = []
        for users, items in self.channel_edges:
            keep = torch.rand(users.shape[0], generator=generator) >= self.config.edge_dropout
            dropped.append(normalized_bipartite_adjacency(self.n_users, self.n_items, users[keep], items[keep]).to(device))
        self.dropped = dropped
        self.view_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))

    def masked_inputs(self, egos: list[torch.Tensor]) -> list[torch.Tensor]:
        """View 2's inputs: per node one content channel (uniform) replaced by noise of that channel's scale."""
        n = self.n_users + self.n_items
        content = [c for c, name in enumerate(self.channel_names) if name != ID_CHANNEL]
        choice = torch.randint(0, len(content), (n,), generator=self.view_generator)  # (U+I,)
        can_mask = torch.cat([torch.ones(self.n_users, len(self.channel_names), dtype=torch.bool),
                              self.present.cpu()])  # fmt: skip  (U+I, C): an absent modality is not masked
        out = list(egos)
        for k, c in enumerate(content):
            noise = torch.randn(n, egos[c].shape[1], generator=self.view_generator).to(egos[c].device)
            masked = ((choice == k) & can_mask[:, c]).to(egos[c].device)[:, None]  # (U+I, 1)
            out[c] = torch.where(masked, noise * egos[c].detach().std(), egos[c])
        return out

    def masked_view(self, egos: list[torch.Tensor], full: torch.Tensor) -> torch.Tensor:
        """View 2 (U+I, C, d): the full graphs on the masked inputs. A channel no node masks (the ID channel) is the
        ranking pass's output ``full`` (U+I, C, d) itself: not propagated twice."""
        masked = self.masked_inputs(egos)
        graphs = self.full_graphs()
        return torch.stack([full[:, c] if masked[c] is egos[c] else light_propagate(graphs[c], masked[c],
                                                                                     self.config.n_layers)
                            for c in range(len(self.channel_names))], dim=1)  # fmt: skip

    def contrastive_loss(self, view1: torch.Tensor, view2: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """InfoNCE of (N, C, d) view-1 anchors against view 2 for ``nodes`` (N,), with modality-swapped negatives."""
        anchors, keys = view1[nodes], view2[nodes]  # (N, C, d)
        rows = torch.arange(nodes.shape[0], device=nodes.device)
        extra = None
        if self.config.hard_negatives:
            content = torch.tensor([c for c, n in enumerate(self.channel_names) if n != ID_CHANNEL])
            choice = torch.randint(0, content.numel(), (nodes.shape[0],), generator=self.view_generator)
            partners = torch.randperm(nodes.shape[0], generator=self.view_generator)
            swapped = swap_one_block(keys, content.to(nodes.device), partners.to(nodes.device), choice.to(nodes.device))
            extra = F.normalize(swapped.flatten(1), dim=1)
        return in_batch_info_nce(F.normalize(anchors.flatten(1), dim=1), F.normalize(keys.flatten(1), dim=1), rows,
                                 temperature=self.config.temperature, key_ids=nodes, extra_negatives=extra)  # fmt: skip

    # ------------------------------------------------------------------------------------------------ the model
    def loss(self, batch: PairwiseBatch) -> torch.Tensor:  # type: ignore[override]
        egos = self.inputs()
        full = self.propagate(egos, self.full_graphs())  # (U+I, C, d)
        nodes = full.flatten(1)  # (U+I, C·d)
        u = nodes[batch.users]
        pos, neg = nodes[self.n_users + batch.pos_items], nodes[self.n_users + batch.neg_items]
        loss = bpr_loss((u * pos).sum(-1), (u * neg).sum(-1))
        if self.config.ssl_weight > 0.0:
            if self.dropped is None:  # before the trainer's first epoch (a test calling loss directly): epoch 0
                self.on_epoch_start(0, torch.Generator().manual_seed(0))
            assert self.dropped is not None
            view1 = self.propagate(egos, self.dropped)  # (U+I, C, d)
            view2 = self.masked_view(egos, full)
            # each distinct user and positive item of the batch once (SGL): no node is its own negative
            ssl = self.contrastive_loss(view1, view2, torch.unique(batch.users))
            ssl = ssl + self.contrastive_loss(view1, view2, self.n_users + torch.unique(batch.pos_items))
            loss = loss + self.config.ssl_weight * ssl
        if self.config.reg_weight > 0.0:
            batch_egos = [torch.cat([self.user_embeddings[c][batch.users] for c in self.channel_names], dim=1)]
            if self.item_embedding is not None:
                batch_egos += [self.item_embedding[batch.pos_items], self.item_embedding[batch.neg_items]]
            loss = loss + self.config.reg_weight * embedding_norm_penalty(*batch_egos)
        return loss

    def representations(self) -> Representations:
        nodes = self.propagate(self.inputs(), self.full_graphs()).flatten(1)  # (U+I, C·d)
        return Representations(users=nodes[: self.n_users], items=nodes[self.n_users :])

    def content_encoder(self) -> ContentEncoder:
        return MMGCLContentEncoder(self)


class MMGCLContentEncoder(ContentEncoder):
    """A new item's MMGCL vector: a zero ID block, and per modality it has W_m x̂^m / (L + 1) (no edges to smooth)."""

    def __init__(self, model: MMGCL) -> None:
        super().__init__()
        self.modality_names = tuple(model.content_names)
        self.projections = nn.ModuleList([model.projections[n] for n in model.content_names])
        self.id_channel = model.config.id_channel
        self.layer_share = 1.0 / (model.config.n_layers + 1)

    def forward(self, *features_and_masks: torch.Tensor) -> torch.Tensor:
        blocks = []
        for k, projection in enumerate(self.projections):
            features, mask = features_and_masks[2 * k], features_and_masks[2 * k + 1]  # (N, d_m), (N, 1)
            blocks.append(projection(F.normalize(features * mask, dim=1)) * mask * self.layer_share)  # (N, d)
        if self.id_channel:
            blocks.insert(0, torch.zeros_like(blocks[0]))
        return torch.cat(blocks, dim=1)  # (N, C·d)
