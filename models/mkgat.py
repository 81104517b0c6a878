"""MKGAT (Sun et al., CIKM 2020): multi-modal knowledge graph attention for recommendation.

The multimodal knowledge graph. Nodes: users, items (an item linked to a KG entity is that entity), the KG's other
entities, and per content modality m one "tail" node per item that HAS m. Directed edges (h, r, t), each with its
inverse relation: user –interact→ item (training edges), the KG triples, and item –has_m→ tail_m.

Entity encoder (layer 0): users, items, entities and relations have learned d-dim embeddings; a modality tail is its
item's L2-normalised feature through a linear map, e_{t_m} = W_m x̂^m (the paper's image/text entity encoders on
top of fixed features).

Multimodal graph attention layer (the paper's MGAT, per layer l with its own weights, "add" aggregator):

    e(h,r,t) = W1 [e_h ‖ e_r ‖ e_t]                 (computed as A e_h + B e_r + C e_t: W1 = [A B C])
    π(h,r,t) = softmax_{(r,t) ∈ N(h)} LeakyReLU(w2ᵀ e(h,r,t))
    e_h^{l+1} = LeakyReLU(W3 e_h^l + Σ_{(r,t) ∈ N(h)} π(h,r,t) e(h,r,t))

A node's representation is KGAT's layer concatenation z = [e^0 ‖ ê^1 ‖ … ‖ ê^L] (ê: L2-normalised) and the score
z_u · z_i.

Loss: BPR(z_u·z_i⁺, z_u·z_i⁻) + kg_weight · L_KG + reg_weight · ½‖batch layer-0 embeddings‖² / B, where L_KG is the
paper's TransE margin loss on the entity encoder's outputs, Σ max(0, γ + ‖e_h + e_r − e_t‖² − ‖e_h + e_r − e_t'‖²)
over a uniform sample of KG and modality triples (t' a random tail of the same kind: an item/entity for KG triples,
another item's m-tail for has_m), trained jointly in every step (the paper alternates the two modules).

Missing modalities: an item without m has no m-tail (no node input, no edge), whatever its feature row holds. A new
item (content encoder) has a zero ID embedding and only its modality tails as neighbours: exactly the propagation
of that star graph (``MKGATContentEncoder``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import (
    ContentEncoder,
    KnowledgeGraph,
    ModelInputs,
    PairwiseBatch,
    Recommender,
    Representations,
    require_modalities,
)
from models.losses import bpr_loss, squared_l2_penalty

NEGATIVE_SLOPE = 0.2  # LeakyReLU slope of the attention logits and layer outputs (GAT's, as KGAT's code)


@dataclass(frozen=True)
class MKGATConfig:
    embedding_size: int = 64  # d of every layer (KGAT's embed_size; its later layers are narrower, here not)
    n_layers: int = 2  # MGAT layers (as the other graph models here; one propagation costs 2.2-3 s a step on CPU)
    kg_weight: float = 1.0  # weight of the TransE loss beside BPR (the paper alternates the two losses 1:1)
    kg_batch_size: int = 4096  # triples sampled per step for the TransE loss
    margin: float = 1.0  # γ of the TransE margin loss
    reg_weight: float = 1e-5  # KGAT's L2 on the batch's layer-0 embeddings
    # KG entities (not items) in fewer triples than this are dropped with their triples (1: keep every entity); on
    # ml100k 21,215 of 33,048 entities (an actor of one film, ...) are in one triple: leaves that link no two items
    min_entity_triples: int = 1


def prune_rare_entities(kg: KnowledgeGraph, n_items: int, min_triples: int) -> KnowledgeGraph:
    """``kg`` without the entities that are not items and appear in fewer than ``min_triples`` of its triples (as
    head or tail), nor the triples that touch them; the remaining entities renumbered in their order (node rows
    ``n_items``, ``n_items + 1``, ...). Items are never dropped."""
    if min_triples <= 1:
        return kg
    ends = torch.cat([kg.heads, kg.tails])
    counts = torch.bincount(ends[ends >= n_items] - n_items, minlength=kg.n_entities)
    kept_entity = counts >= min_triples  # (n_entities,)
    kept_node = torch.cat([torch.ones(n_items, dtype=torch.bool), kept_entity])
    kept_triple = kept_node[kg.heads] & kept_node[kg.tails]
    new_row = torch.cat([torch.arange(n_items), n_items + torch.cumsum(kept_entity, 0) - 1])
    return KnowledgeGraph(n_entities=int(kept_entity.sum()), n_relations=kg.n_relations,
                          heads=new_row[kg.heads[kept_triple]], relations=kg.relations[kept_triple],
                          tails=new_row[kg.tails[kept_triple]])  # fmt: skip


@dataclass(frozen=True)
class MultimodalGraph:
    """The directed edges (h, r, t) of the multimodal KG as node rows; messages flow from t into h."""

    heads: torch.Tensor  # (E,)
    relations: torch.Tensor  # (E,)
    tails: torch.Tensor  # (E,)


class EdgeWeightedSum(torch.autograd.Function):
    """out[h] = Σ_{edges (h, t)} w_e x[t] as a sparse product, with its gradients written out: autograd through a
    sparse tensor's values is two orders of magnitude slower on CPU (measured: 65 s vs under 1 s a step on ml100k)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, heads: torch.Tensor, tails: torch.Tensor,
                weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(heads, tails, weights, x)
        n = x.shape[0]
        adjacency = torch.sparse_coo_tensor(torch.stack([heads, tails]), weights, (n, n), check_invariants=False)
        out: torch.Tensor = torch.sparse.mm(adjacency, x)  # rows and columns are node rows by construction: no check
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> tuple[None, None, torch.Tensor, torch.Tensor]:  # fmt: skip
        heads, tails, weights, x = ctx.saved_tensors  # type: ignore[attr-defined]
        n = x.shape[0]
        transposed = torch.sparse_coo_tensor(torch.stack([tails, heads]), weights, (n, n), check_invariants=False)
        grad_x = torch.sparse.mm(transposed, grad)
        grad_weights = (grad[heads] * x[tails]).sum(1)  # (E,)
        return None, None, grad_weights, grad_x


def edge_weighted_sum(heads: torch.Tensor, tails: torch.Tensor, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = EdgeWeightedSum.apply(heads, tails, weights, x)  # type: ignore[no-untyped-call]
    return out


class MGATLayer(nn.Module):
    """One multimodal graph attention layer (module docstring): W1 split as A, B, C; w2; W3; no biases."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.head, self.relation, self.tail = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.attention = nn.Linear(d, 1, bias=False)
        self.self_map = nn.Linear(d, d, bias=False)

    def forward(self, nodes: torch.Tensor, relations: torch.Tensor, graph: MultimodalGraph) -> torch.Tensor:
        """(N, d) node inputs, (R, d) relation embeddings → (N, d) outputs; a node without edges gets W3 e_h only.

        e(h,r,t) is never materialised per edge: its attention logit is w2ᵀA e_h + w2ᵀB e_r + w2ᵀC e_t (three
        gathered scalars), and Σ π e(h,r,t) = A e_h + Σ_r (Σ_{edges with r} π) B e_r + Σ_t π C e_t (π sums to 1
        over a head's edges): a per-relation weight table and one sparse product.
        """
        h, r, t = graph.heads, graph.relations, graph.tails
        n, n_relations = nodes.shape[0], relations.shape[0]
        head, relation, tail = self.head(nodes), self.relation(relations), self.tail(nodes)  # (N, d), (R, d), (N, d)
        score_head, score_relation, score_tail = (self.attention(x).squeeze(1) for x in (head, relation, tail))
        logits = F.leaky_relu(score_head[h] + score_relation[r] + score_tail[t], NEGATIVE_SLOPE)  # (E,)
        top = torch.full((n,), -torch.inf, device=nodes.device).scatter_reduce(0, h, logits, "amax")
        weights = torch.exp(logits - top[h])  # (E,)
        total = torch.zeros(n, device=nodes.device).index_add(0, h, weights)
        attention = weights / total[h]  # π(h,r,t): softmax over each head's edges
        per_relation = torch.zeros(n * n_relations, device=nodes.device).index_add(0, h * n_relations + r, attention)
        aggregated = (head * (total > 0).to(head.dtype)[:, None] + per_relation.view(n, n_relations) @ relation
                      + edge_weighted_sum(h, t, attention, tail))  # fmt: skip  (N, d) Σ π e(h,r,t)
        return F.leaky_relu(self.self_map(nodes) + aggregated, NEGATIVE_SLOPE)


def concatenate_layers(layers: list[torch.Tensor]) -> torch.Tensor:
    """KGAT's readout: [e^0 ‖ ê^1 ‖ … ‖ ê^L], layers after the first L2-normalised."""
    return torch.cat([layers[0], *(F.normalize(x, dim=1) for x in layers[1:])], dim=1)


class MKGAT(Recommender):
    present: torch.Tensor

    def __init__(self, config: MKGATConfig, inputs: ModelInputs) -> None:
        super().__init__()
        require_modalities(inputs, "MKGAT")
        kg = inputs.knowledge_graph
        if kg is None:
            raise ValueError("MKGAT needs a knowledge graph; this dataset has none joined to its items")
        if config.min_entity_triples < 1:
            raise ValueError(f"min_entity_triples must be at least 1, got {config.min_entity_triples}")
        kg = prune_rare_entities(kg, inputs.n_items, config.min_entity_triples)
        self.config = config
        self.n_users, self.n_items = inputs.n_users, inputs.n_items
        self.n_entities = kg.n_entities
        self.content_names = sorted(inputs.modalities)
        n_modalities = len(self.content_names)
        d = config.embedding_size
        # relations: interact, KG relations, has_m per modality; then the inverse of each
        self.n_forward_relations = 1 + kg.n_relations + n_modalities
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_users, d)))
        self.entity_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_items + kg.n_entities, d)))
        self.relation_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(2 * self.n_forward_relations, d)))
        self.projections = nn.ModuleDict(
            {n: nn.Linear(inputs.modalities[n].features.shape[1], d) for n in self.content_names})
        self.layers = nn.ModuleList([MGATLayer(d) for _ in range(config.n_layers)])
        self.register_buffer("present", torch.stack([inputs.modalities[n].present for n in self.content_names]),
                             persistent=False)  # fmt: skip  (M, I)
        for name in self.content_names:
            features = F.normalize(inputs.modalities[name].features, dim=1) * inputs.modalities[name].present[:, None]
            self.register_buffer(f"features_{name}", features, persistent=False)  # (I, d_m), 0 where absent

        # node rows: users | items | other entities | m-tails (one per item, per modality in content_names order)
        items_at, tails_at = self.n_users, self.n_users + self.n_items + kg.n_entities
        self.n_nodes = tails_at + n_modalities * self.n_items
        heads = [inputs.train_users, kg.heads + items_at]
        relations = [torch.zeros_like(inputs.train_users), kg.relations + 1]
        tails = [inputs.train_items + items_at, kg.tails + items_at]
        transe_heads, transe_relations, transe_tails, transe_pools = [kg.heads + items_at], [kg.relations + 1], [
            kg.tails + items_at], [torch.zeros_like(kg.heads)]  # fmt: skip
        self.tail_pools = [torch.arange(items_at, tails_at)]  # pool 0: items and entities (KG tails)
        for m in range(n_modalities):
            items = torch.nonzero(self.present[m]).squeeze(1)
            tail_rows = tails_at + m * self.n_items + items
            relation = torch.full_like(items, 1 + kg.n_relations + m)
            heads.append(items + items_at)
            relations.append(relation)
            tails.append(tail_rows)
            transe_heads.append(items + items_at)
            transe_relations.append(relation)
            transe_tails.append(tail_rows)
            transe_pools.append(torch.full_like(items, 1 + m))
            self.tail_pools.append(tail_rows)
        forward_h, forward_r, forward_t = torch.cat(heads), torch.cat(relations), torch.cat(tails)
        self.graph = MultimodalGraph(
            heads=torch.cat([forward_h, forward_t]),
            relations=torch.cat([forward_r, forward_r + self.n_forward_relations]),
            tails=torch.cat([forward_t, forward_h]),
        )
        self.transe_triples = (torch.cat(transe_heads), torch.cat(transe_relations), torch.cat(transe_tails))
        self.transe_pools = torch.cat(transe_pools)  # (T,) which pool a triple's corrupted tail is drawn from
        self.sampling_generator = torch.Generator()  # the TransE samples; seeded by on_epoch_start

    # ----------------------------------------------------------------------------------------- the encoder
    def node_inputs(self) -> torch.Tensor:
        """(N, d) layer 0: ID embeddings of users, items and entities; W_m x̂^m for the m-tails (0 where absent)."""
        tails = [self.projections[n](self.get_buffer(f"features_{n}")) * self.present[m, :, None]
                 for m, n in enumerate(self.content_names)]  # fmt: skip
        return torch.cat([self.user_embedding, self.entity_embedding, *tails])

    def propagate(self, nodes: torch.Tensor) -> torch.Tensor:
        """(N, d) layer-0 inputs → (N, (L+1)·d) concatenated layer outputs over the multimodal graph."""
        graph = MultimodalGraph(*(x.to(nodes.device) for x in (self.graph.heads, self.graph.relations,
                                                                 self.graph.tails)))  # fmt: skip
        layers = [nodes]
        for layer in self.layers:
            layers.append(layer(layers[-1], self.relation_embedding, graph))
        return concatenate_layers(layers)

    # --------------------------------------------------------------------------------------- the KG module
    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        """Seed this epoch's TransE triple and corrupted-tail draws."""
        self.sampling_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))

    def sample_triples(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A uniform sample of KG and modality triples with a corrupted tail of the same kind: (h, r, t, t')."""
        n = self.transe_pools.shape[0]
        chosen = torch.randint(0, n, (min(self.config.kg_batch_size, n),), generator=self.sampling_generator)
        h, r, t = (x[chosen] for x in self.transe_triples)
        pools = self.transe_pools[chosen]
        corrupted = torch.empty_like(t)
        for p, pool in enumerate(self.tail_pools):
            rows = torch.nonzero(pools == p).squeeze(1)
            corrupted[rows] = pool[torch.randint(0, pool.shape[0], (rows.shape[0],), generator=self.sampling_generator)]
        return h, r, t, corrupted

    def transe_loss(self, nodes: torch.Tensor) -> torch.Tensor:
        """The TransE margin loss on the (N, d) entity-encoder outputs for a sample of triples."""
        h, r, t, corrupted = (x.to(nodes.device) for x in self.sample_triples())
        translated = nodes[h] + self.relation_embedding[r]  # (T, d)
        positive = (translated - nodes[t]).pow(2).sum(1)
        negative = (translated - nodes[corrupted]).pow(2).sum(1)
        return F.relu(self.config.margin + positive - negative).mean()

    # ------------------------------------------------------------------------------------------ the model
    def loss(self, batch: PairwiseBatch) -> torch.Tensor:  # type: ignore[override]
        nodes = self.node_inputs()
        z = self.propagate(nodes)  # (N, (L+1)·d)
        items_at = self.n_users
        u = z[batch.users]
        pos, neg = z[items_at + batch.pos_items], z[items_at + batch.neg_items]
        loss = bpr_loss((u * pos).sum(-1), (u * neg).sum(-1))
        if self.config.kg_weight > 0.0:
            loss = loss + self.config.kg_weight * self.transe_loss(nodes)
        if self.config.reg_weight > 0.0:
            loss = loss + self.config.reg_weight * squared_l2_penalty(
                self.user_embedding[batch.users], self.entity_embedding[batch.pos_items],
                self.entity_embedding[batch.neg_items])  # fmt: skip
        return loss

    def representations(self) -> Representations:
        z = self.propagate(self.node_inputs())
        return Representations(users=z[: self.n_users], items=z[self.n_users : self.n_users + self.n_items])

    def content_encoder(self) -> ContentEncoder:
        return MKGATContentEncoder(self)


class MKGATContentEncoder(ContentEncoder):
    """A new item's MKGAT vector: the propagation of its star graph (a zero ID embedding, its present m-tails W_m x̂^m
    as neighbours over has_m, the item as each tail's only neighbour over the inverse), written densely for ONNX."""

    has_relations: torch.Tensor

    def __init__(self, model: MKGAT) -> None:
        super().__init__()
        self.modality_names = tuple(model.content_names)
        self.projections = nn.ModuleList([model.projections[n] for n in model.content_names])
        self.layers = model.layers
        first_has = model.n_forward_relations - len(model.content_names)
        self.register_buffer("has_relations", torch.arange(first_has, model.n_forward_relations))  # (M,)
        self.n_forward_relations = model.n_forward_relations
        self.relation_embedding = model.relation_embedding

    def forward(self, *features_and_masks: torch.Tensor) -> torch.Tensor:
        masks = torch.cat([features_and_masks[2 * k + 1] for k in range(len(self.projections))], dim=1)  # (N, M)
        tails = torch.stack([projection(F.normalize(features_and_masks[2 * k] * features_and_masks[2 * k + 1], dim=1))
                             * features_and_masks[2 * k + 1] for k, projection in enumerate(self.projections)],
                            dim=1)  # fmt: skip  (N, M, d)
        item = torch.zeros_like(tails[:, 0])  # (N, d): no ID embedding
        has = self.relation_embedding[self.has_relations]  # (M, d)
        of = self.relation_embedding[self.has_relations + self.n_forward_relations]  # (M, d)
        outputs = [item]
        for layer in self.layers:
            assert isinstance(layer, MGATLayer)
            triple = (layer.head(item)[:, None] + layer.relation(has)[None] + layer.tail(tails))  # (N, M, d)
            logits = F.leaky_relu(layer.attention(triple).squeeze(2), NEGATIVE_SLOPE)  # (N, M)
            logits = torch.where(masks > 0.5, logits, torch.full_like(logits, -1e30))
            attention = torch.softmax(logits, dim=1) * masks  # an item with no modality has no edge at all
            new_item = F.leaky_relu(layer.self_map(item) + (attention[:, :, None] * triple).sum(1), NEGATIVE_SLOPE)
            tail_message = layer.head(tails) + layer.relation(of)[None] + layer.tail(item)[:, None]  # (N, M, d)
            tails = F.leaky_relu(layer.self_map(tails) + tail_message * masks[:, :, None], NEGATIVE_SLOPE)
            item = new_item
            outputs.append(item)
        return concatenate_layers(outputs)
