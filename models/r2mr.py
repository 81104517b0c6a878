"""R2MR — Review and Rewrite Modality for Recommendation (Tang et al., KDD 2025).

The text and the image (or audio) of one item can differ a lot in quality. R2MR

1. **reviews** each modality of each item: s_i^m = mean over the item's training users j and their K interests
   p_j^k of σ(ẽ_i^m · p_j^k), computed over the training edges (no users × items matrix);
2. **rewrites** the weak modality of a *disparity* item (exactly one modality scored ≥ η) from its strong one, with a
   VQ-GAN-style generator trained on *high-quality* items (both modalities ≥ η) in both directions;
3. **gates** each modality against the item's collaborative vector h_i by its score:
   x_i^m = (s_i^m + 1e-3)·ē_i^m + (1 − s_i^m)·h_i, then LightGCN per modality; item/user vectors are the two
   branches concatenated, score = dot product, loss BPR. The reviewer learns through the gate (as in the official
   code) and from its own BCE on the batch's edges against the sampled negatives (``review_loss_weight``), which is
   what makes η = 0.5 a meaningful line between agreeing and disagreeing with the item's users.

A missing modality is the lowest quality: its score is 0 and its gate weight is exactly 0 (x_i^m = h_i), never a
zero feature at full weight. A rewrite can fill it in (a missing modality of an item whose other modality is good is
a disparity case like any other).

Where the official code (github gutang-97/R2MR, ``models/rmr.py``) and the note differ, the reference spec says
which to follow; deviations are listed in docs/r2mr.md. Reading order: shared-dimension projection, reviewer,
rewriter (VQ-GAN), the model, the inductive encoder for new items.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ContentEncoder, ModelInputs, PairwiseBatch, Recommender, Representations
from models.graph import mean_aggregation, normalized_bipartite_adjacency
from models.losses import bpr_loss, squared_l2_penalty
from models.ridge import fit_ridge

HIGH_QUALITY, DISPARITY, LOW_QUALITY = 0, 1, 2
STATE_NAMES = ("high-quality", "disparity", "low-quality")  # index = state code
ROUND_STAT_FIELDS = ("epoch", "rewriter_l1", "n_high", "n_disparity", "n_low")
ROUND_STAT_PER_MODALITY = ("candidates", "kept_improves", "kept_threshold", "kept")


@dataclass(frozen=True)
class R2MRConfig:
    feature_dim: int = 384  # official run: both modalities at 384; capped by the smallest modality (lfm2k audio: 128)
    n_interests: int = 1  # K of DECOUPLE (official 1)
    threshold: float = 0.5  # η for both modalities (official)
    n_layers: int = 2
    reg_weight: float = 1e-4  # ½‖·‖² of the batch's final embeddings / B (official)
    dropout: float = 0.3  # on the user ID embeddings before DECOUPLE and before h (official)
    score_floor: float = 1e-3  # the gate's (s + 1e-3): a present modality never vanishes entirely
    review_loss_weight: float = 1.0  # BCE of the reviewer on train edges vs sampled negatives; 0 = official (gate only)
    gate_gradient: bool = True  # official: the ranking loss also trains the reviewer through the gate
    tune_features: bool = True  # official: the item feature table is trainable (Embedding.from_pretrained(freeze=False))
    reviewer: bool = True  # False: s ≡ 0.5 for every present modality (ablation); no states, hence no rewriting
    rewriter: bool = True  # False: review only (ablation)
    keep_rule: Literal["improves", "threshold"] = "improves"  # the note's rule; the official code keeps s_new > η
    rewrite_every: int = 6  # epochs between review/rewrite rounds (official)
    max_rounds: int = 10  # (official)
    first_round_epochs: int = 200  # rewriter epochs in the first round (official; scale down on CPU)
    later_round_epochs: int = 20  # rewriter epochs in later rounds (official)
    rewriter_batch_size: int = 128  # (official)
    prompt_dim: int = 256  # direction prompt embedding (official)
    encoder_channels: tuple[int, ...] = (1024, 2048)  # (official)
    n_codes: int = 32  # chunks per item: the encoder output is n_codes × code_dim = 1024 (official)
    code_dim: int = 32  # (official)
    codebook_size: int = 4096  # (official)
    commitment: float = 0.1  # β of the vector quantiser (official)
    decoder_channels: tuple[int, ...] = (1024, 2048)  # (official)
    discriminator_channels: tuple[int, ...] = (512, 128)  # (official)
    adversarial_weight: float = 0.1  # (official)
    generator_lr: float = 5e-4  # AdamW (official)
    discriminator_lr: float = 5e-5  # Adam (official)
    gan_beta1: float = 0.5  # both GAN optimisers (official)
    gan_beta2: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold}")
        if self.n_interests < 1 or self.feature_dim < 1 or self.rewrite_every < 1:
            raise ValueError("n_interests, feature_dim and rewrite_every must be at least 1")


# --------------------------------------------------------------------------------- shared-dimension projection
def shared_dimension(feature_dim: int, dims: Sequence[int]) -> int:
    """The one dimension D every modality is brought to: ``feature_dim``, capped by the smallest modality."""
    return min(feature_dim, *dims)


def projection_to_dimension(features: torch.Tensor, present: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (d,), matrix (d, D)) so that (x − mean) @ matrix is the item's D-dim feature.

    A modality wider than D is centred and projected on its top-D principal components (fitted on the items that
    have it; each component's sign fixed so its largest entry is positive, for determinism); a modality of width D
    is kept as is. Either way the result is scaled so that present items have mean L2 norm 1, which puts text,
    image and audio on one scale against the collaborative vector in the fusion gate.
    """
    x = features[present].double()  # (n, d)
    d = x.shape[1]
    if d > dim:
        mean = x.mean(dim=0)
        centred = x - mean
        covariance = centred.T @ centred / max(x.shape[0] - 1, 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        components = eigenvectors[:, eigenvalues.argsort(descending=True)[:dim]]  # (d, D)
        sign = torch.sign(components.gather(0, components.abs().argmax(dim=0, keepdim=True)))
        matrix = components * sign
    else:
        mean = torch.zeros(d, dtype=torch.float64)
        matrix = torch.eye(d, dtype=torch.float64)
    projected = (x - mean) @ matrix
    scale = projected.norm(dim=1).mean() if projected.shape[0] else torch.tensor(1.0, dtype=torch.float64)
    return mean.float(), (matrix / scale.clamp(min=1e-12)).float()


# --------------------------------------------------------------------------------------------- the reviewer
def edge_scatter_mean(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """(E,) per-edge values → (size,) mean over the edges of each index; 0 where an index has no edge."""
    total = torch.zeros(size, dtype=values.dtype, device=values.device).index_add(0, index, values)
    count = torch.zeros(size, dtype=values.dtype, device=values.device).index_add(0, index, torch.ones_like(values))
    return total / count.clamp(min=1.0)


def edge_pattern(n_users: int, n_items: int, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """The deduplicated train edges as a sparse CSR (U, I) pattern, rows sorted by (user, item)."""
    key = torch.unique(users * n_items + items)
    indices = torch.stack([key // n_items, key % n_items])
    with warnings.catch_warnings():  # torch flags sparse CSR as beta; sampled_addmm on it is stable since 2.0
        warnings.simplefilter("ignore", UserWarning)
        coo = torch.sparse_coo_tensor(indices, torch.zeros(key.shape[0]), (n_users, n_items), check_invariants=True)
        return coo.coalesce().to_sparse_csr()


def review_scores(projected: torch.Tensor, interests: torch.Tensor, pattern: torch.Tensor,
                  edge_items: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """s_i = mean over the train edges (j, i) and interests k of σ(ẽ_i · p_j^k), only at the edges.

    projected: (I, D) reviewer projections ẽ of one modality; interests: (U, K, D); pattern: the (U, I) CSR edge
    pattern, ``edge_items`` its column indices in storage order. The dot products are a sampled matrix product
    (SDDMM) at the edges: O(E·K·D) work, no users × items matrix.
    """
    per_edge = torch.stack([
        torch.sparse.sampled_addmm(pattern, interests[:, k], projected.T, beta=0.0).values()
        for k in range(interests.shape[1])
    ])  # (K, E)
    return edge_scatter_mean(torch.sigmoid(per_edge).mean(dim=0), edge_items, projected.shape[0])  # (I,)


def quality_states(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """(2, I) scores → (I,) state codes: both ≥ η high-quality, exactly one disparity, none low-quality."""
    n_good = (scores >= threshold).sum(dim=0)
    return torch.where(n_good == 2, HIGH_QUALITY, torch.where(n_good == 1, DISPARITY, LOW_QUALITY))


# ------------------------------------------------------------------------------------- the rewriter (VQ-GAN)
class ResidualLinear(nn.Module):
    """Linear, then x + LayerNorm(x): the official rewriter's building block (no other non-linearity)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        nn.init.xavier_uniform_(self.linear.weight)
        self.norm = nn.LayerNorm(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        out: torch.Tensor = x + self.norm(x)
        return out


def residual_mlp(widths: Sequence[int]) -> nn.Sequential:
    return nn.Sequential(*[ResidualLinear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)])


class VectorQuantizer(nn.Module):
    """Chunked vector quantisation: (B, C·c) is cut into C chunks of c, each replaced by its nearest code.

    Loss: ‖sg[z] − e‖² (moves the codes) + β‖z − sg[e]‖² (commits the encoder); gradients pass the quantiser
    unchanged (straight-through estimator).
    """

    def __init__(self, codebook_size: int, code_dim: int, commitment: float) -> None:
        super().__init__()
        self.code_dim = code_dim
        self.commitment = commitment
        self.codebook = nn.Embedding(codebook_size, code_dim)
        nn.init.normal_(self.codebook.weight)  # unit entries, the scale of the LayerNorm-residual encoder's output

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C·c) → (B, C) code indices."""
        chunks = z.reshape(-1, self.code_dim)  # (B·C, c)
        distances = (
            chunks.pow(2).sum(dim=1, keepdim=True)
            - 2 * chunks @ self.codebook.weight.T
            + self.codebook.weight.pow(2).sum(dim=1)[None, :]
        )  # (B·C, codebook_size)
        return distances.argmin(dim=1).reshape(z.shape[0], -1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quantised = self.codebook(self.codes(z)).reshape(z.shape)  # (B, C·c)
        loss = F.mse_loss(quantised, z.detach()) + self.commitment * F.mse_loss(z, quantised.detach())
        return z + (quantised - z).detach(), loss


class ModalityGenerator(nn.Module):
    """[source feature ‖ direction prompt] → residual encoder → chunked VQ → residual decoder → target feature.

    Direction k rewrites FROM modality k (sorted order) INTO the other one. Features (mean norm 1) are multiplied
    by √D on the way in and divided on the way out, so that the network sees unit-scale entries, the scale its
    LayerNorms produce.
    """

    def __init__(self, config: R2MRConfig, dim: int) -> None:
        super().__init__()
        latent = config.n_codes * config.code_dim
        self.feature_scale = math.sqrt(dim)
        self.prompt = nn.Embedding(2, config.prompt_dim)
        self.encoder = residual_mlp([dim + config.prompt_dim, *config.encoder_channels, latent])
        self.quantizer = VectorQuantizer(config.codebook_size, config.code_dim, config.commitment)
        # the last layer is a plain Linear: the official x + LayerNorm(x) there fixes the output's per-entry scale
        # near 1 (norm ≈ √D), far from the features' (norm ≈ 1), and the rewrites came out as noise
        self.decoder = nn.Sequential(residual_mlp([latent, *config.decoder_channels]),
                                     nn.Linear(([latent, *config.decoder_channels])[-1], dim))  # fmt: skip

    def forward(self, source: torch.Tensor, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(torch.cat([source * self.feature_scale, self.prompt(direction)], dim=1))  # (B, C·c)
        quantised, code_loss = self.quantizer(z)
        out: torch.Tensor = self.decoder(quantised) / self.feature_scale  # (B, D)
        return out, code_loss


class Discriminator(nn.Module):
    def __init__(self, dim: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.feature_scale = math.sqrt(dim)  # as the generator's
        self.body = residual_mlp([dim, *channels])
        self.head = nn.Linear(channels[-1] if channels else dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.body(x * self.feature_scale)).squeeze(-1)  # (B,)
        return logits


class ModalityRewriter(nn.Module):
    """Generator + discriminator with their own optimisers (AdamW / Adam), trained in rounds on tensors it is given.

    Losses: generator L1(fake, target) + VQ loss + w·BCE(D(fake), real); discriminator BCE(D(real), real) +
    BCE(D(fake), fake). The official code back-propagates the discriminator's loss into the generator; here each
    player minimises its own loss (the standard GAN game).
    """

    def __init__(self, config: R2MRConfig, dim: int) -> None:
        super().__init__()
        self.config = config
        self.generator = ModalityGenerator(config, dim)
        self.discriminator = Discriminator(dim, config.discriminator_channels)
        self._optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer] | None = None

    def optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        if self._optimizers is None:
            betas = (self.config.gan_beta1, self.config.gan_beta2)
            self._optimizers = (
                torch.optim.AdamW(self.generator.parameters(), lr=self.config.generator_lr, betas=betas),
                torch.optim.Adam(self.discriminator.parameters(), lr=self.config.discriminator_lr, betas=betas),
            )
        return self._optimizers

    def fit(self, sources: torch.Tensor, directions: torch.Tensor, targets: torch.Tensor, *, epochs: int,
            generator: torch.Generator) -> float:  # fmt: skip
        """Train on (source (N, D), direction (N,), target (N, D)) for ``epochs``; returns the last epoch's mean L1."""
        opt_g, opt_d = self.optimizers()
        self.train()
        last_l1 = float("nan")
        n, batch = sources.shape[0], self.config.rewriter_batch_size
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(sources.device)
            total = 0.0
            for start in range(0, n, batch):
                rows = order[start : start + batch]
                src, direction, tgt = sources[rows], directions[rows], targets[rows]
                fake, code_loss = self.generator(src, direction)  # (b, D)
                real_logits, fake_logits = self.discriminator(tgt), self.discriminator(fake.detach())
                real_loss = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                d_loss = real_loss + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
                opt_d.zero_grad(set_to_none=True)
                torch.autograd.backward(d_loss)
                opt_d.step()
                l1 = (fake - tgt).abs().mean()
                fooled = self.discriminator(fake)
                g_loss = l1 + code_loss + self.config.adversarial_weight * F.binary_cross_entropy_with_logits(
                    fooled, torch.ones_like(fooled)
                )
                opt_g.zero_grad(set_to_none=True)
                g_loss.backward()
                opt_g.step()
                total += float(l1.detach()) * rows.shape[0]
            last_l1 = total / max(n, 1)
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        return last_l1

    @torch.no_grad()
    def rewrite(self, sources: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        self.eval()
        out: torch.Tensor = self.generator(sources, directions)[0]
        return out


# ------------------------------------------------------------------------------------------------ the model
class R2MR(Recommender):
    """Two modalities (sorted by name), reviewed, rewritten and gated, each propagated by LightGCN."""

    edge_pattern: torch.Tensor
    edge_items: torch.Tensor
    adjacency: torch.Tensor
    item_user_mean: torch.Tensor
    has_modality: torch.Tensor
    initial_features: torch.Tensor
    rewritten: torch.Tensor
    review: torch.Tensor
    first_review: torch.Tensor
    rounds_done: torch.Tensor
    round_stats: torch.Tensor

    def __init__(self, config: R2MRConfig, inputs: ModelInputs) -> None:
        super().__init__()
        names = sorted(inputs.modalities)
        if len(names) != 2:
            raise ValueError(f"R2MR reviews and rewrites between exactly two item modalities; this dataset has {names}")
        self.config = config
        self.modality_names = tuple(names)
        self.n_users, self.n_items = inputs.n_users, inputs.n_items
        dim = shared_dimension(config.feature_dim, [inputs.modalities[m].features.shape[1] for m in names])
        self.dim = dim

        # the graph: deduplicated train edges (a repeated interaction is one reviewer vote, one graph edge)
        pattern = edge_pattern(inputs.n_users, inputs.n_items, inputs.train_users, inputs.train_items)
        self.register_buffer("edge_pattern", pattern, persistent=False)  # (U, I) CSR
        self.register_buffer("edge_items", pattern.col_indices(), persistent=False)  # (E,) in storage order
        self.register_buffer("adjacency", normalized_bipartite_adjacency(
            inputs.n_users, inputs.n_items, inputs.train_users, inputs.train_items), persistent=False)  # fmt: skip
        self.register_buffer("item_user_mean", mean_aggregation(
            inputs.n_items, inputs.n_users, inputs.train_items, inputs.train_users), persistent=False)  # fmt: skip

        # features: each modality brought to D (fixed projection, kept for new items), then a trainable table
        has = torch.stack([inputs.modalities[m].present.bool() for m in names])  # (2, I)
        self.register_buffer("has_modality", has, persistent=False)
        initial = []
        for k, m in enumerate(names):
            mean, matrix = projection_to_dimension(inputs.modalities[m].features.float(), has[k], dim)
            self.register_buffer(f"projection_mean_{k}", mean)  # (d_m,)
            self.register_buffer(f"projection_matrix_{k}", matrix)  # (d_m, D)
            initial.append((inputs.modalities[m].features.float() - mean) @ matrix * has[k, :, None])  # (I, D)
        # the projected raw features: what a new item has; the trainable table starts from them
        self.register_buffer("initial_features", torch.stack(initial), persistent=False)  # (2, I, D)
        self.item_features = nn.ParameterDict(
            {m: nn.Parameter(initial[k].clone(), requires_grad=config.tune_features) for k, m in enumerate(names)}
        )

        # reviewer: DECOUPLE of the user ID embedding into K interests; one projection ẽ per modality
        self.user_id_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_users, dim)))
        self.decouple = nn.Linear(dim, config.n_interests * dim)
        self.review_projection = nn.ModuleList([nn.Linear(dim, dim) for _ in names])
        # backbone: per-modality user preference embeddings (official: xavier normal)
        self.user_preference = nn.Parameter(nn.init.xavier_normal_(torch.empty(2, inputs.n_users, dim)))
        self.rewriter = ModalityRewriter(config, dim)

        # review/rewrite state, in the checkpoint (the best epoch's features go with its flags)
        self.register_buffer("rewritten", torch.zeros(2, inputs.n_items, dtype=torch.bool))
        self.register_buffer("review", torch.full((2, inputs.n_items), -1.0))  # scores of the last review round
        self.register_buffer("first_review", torch.full((2, inputs.n_items), -1.0))
        self.register_buffer("rounds_done", torch.zeros((), dtype=torch.long))
        n_stats = len(ROUND_STAT_FIELDS) + 2 * len(ROUND_STAT_PER_MODALITY)
        self.register_buffer("round_stats", torch.full((max(config.max_rounds, 1), n_stats), float("nan")))

    # ------------------------------------------------------------------------------------------- pieces
    def present(self) -> torch.Tensor:
        """(2, I) bool: the item has the modality, originally or by a kept rewrite."""
        return self.has_modality | self.rewritten

    def features(self) -> list[torch.Tensor]:
        return [self.item_features[m] for m in self.modality_names]  # 2 × (I, D)

    def user_interests(self, user_ids: torch.Tensor) -> torch.Tensor:
        """DECOUPLE: (U, D) user ID embeddings (after dropout) → (U, K, D) interests."""
        interests: torch.Tensor = self.decouple(user_ids)
        return interests.reshape(user_ids.shape[0], self.config.n_interests, self.dim)

    def scores(self, features: Sequence[torch.Tensor], interests: torch.Tensor) -> torch.Tensor:
        """(2, I) reviewer scores s; 0 for a modality the item lacks; 0.5 everywhere present without a reviewer."""
        present = self.present().float()
        if not self.config.reviewer:
            return 0.5 * present
        rows = [
            review_scores(self.review_projection[k](features[k]), interests, self.edge_pattern, self.edge_items)
            for k in range(2)
        ]
        return torch.stack(rows) * present

    def fuse(self, features: Sequence[torch.Tensor], scores: torch.Tensor, collaborative: torch.Tensor) -> torch.Tensor:
        """The gate, per modality: present·(s + floor)·ē + (1 − s)·h → (2, I, D)."""
        gate = self.present().float() * (scores + self.config.score_floor)  # (2, I)
        return torch.stack([gate[k, :, None] * features[k] + (1 - scores[k, :, None]) * collaborative
                            for k in range(2)])  # fmt: skip

    def propagate(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LightGCN on both branches at once: L2-normalised inputs, layer outputs summed. → (U, 2D), (I, 2D)."""
        users = F.normalize(self.user_preference, dim=-1)  # (2, U, D)
        items = F.normalize(fused, dim=-1)  # (2, I, D)
        x = torch.cat([torch.cat([users[k], items[k]]) for k in range(2)], dim=1)  # (U+I, 2D)
        out = x
        for _ in range(self.config.n_layers):
            x = torch.sparse.mm(self.adjacency, x)
            out = out + x
        return out[: self.n_users], out[self.n_users :]

    def forward_parts(self, user_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(user vectors (U, 2D), item vectors (I, 2D), scores (2, I)); ``user_ids``: the (dropped-out) ID table."""
        if user_ids is None:
            user_ids = F.dropout(self.user_id_embedding, self.config.dropout, self.training)  # (U, D)
        features = self.features()
        scores = self.scores(features, self.user_interests(user_ids))  # (2, I)
        if not self.config.gate_gradient:
            scores = scores.detach()
        collaborative = torch.tanh(torch.sparse.mm(self.item_user_mean, user_ids))  # (I, D): mean of its users
        users, items = self.propagate(self.fuse(features, scores, collaborative))
        return users, items, scores

    # --------------------------------------------------------------------------------------- interface
    def loss(self, batch: PairwiseBatch) -> torch.Tensor:  # type: ignore[override]
        user_ids = F.dropout(self.user_id_embedding, self.config.dropout, self.training)  # (U, D)
        users, items, _ = self.forward_parts(user_ids)
        u, p, n = users[batch.users], items[batch.pos_items], items[batch.neg_items]  # (B, 2D) each
        loss = bpr_loss((u * p).sum(-1), (u * n).sum(-1)) + self.config.reg_weight * squared_l2_penalty(u, p, n)
        if self.config.reviewer and self.config.review_loss_weight:
            loss = loss + self.config.review_loss_weight * self.review_loss(batch, user_ids)
        return loss

    def review_loss(self, batch: PairwiseBatch, user_ids: torch.Tensor) -> torch.Tensor:
        """The reviewer as a classifier of the batch's edges: −log q(u, i⁺) − log(1 − q(u, i⁻)) with
        q = mean_k σ(ẽ · p^k), averaged over the modalities each item has. The item features are detached: the
        reviewer judges the content, it does not move it to fit its own verdict (which would make every score 1).
        """
        interests = self.user_interests(user_ids[batch.users])  # (B, K, D)
        present = self.present()
        total = torch.zeros((), device=interests.device)
        for k, feature in enumerate(self.features()):
            terms = []
            for items, positive in ((batch.pos_items, True), (batch.neg_items, False)):
                projected = self.review_projection[k](feature[items].detach())  # (B, D)
                q = torch.sigmoid(torch.einsum("bd,bkd->bk", projected, interests)).mean(dim=1)  # (B,)
                likelihood = q if positive else 1 - q
                terms.append(-torch.log(likelihood.clamp(min=1e-6)) * present[k, items].float())
            weight = (present[k, batch.pos_items].float().sum() + present[k, batch.neg_items].float().sum()).clamp(min=1)
            total = total + (terms[0].sum() + terms[1].sum()) / weight
        return total / 2

    def representations(self) -> Representations:
        users, items, _ = self.forward_parts()
        return Representations(users=users, items=items)

    @torch.no_grad()
    def quality(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (2, I), states (I,)) of the current model in eval mode (no dropout)."""
        was_training = self.training
        self.eval()
        scores = self.scores(self.features(), self.user_interests(self.user_id_embedding))
        self.train(was_training)
        return scores, quality_states(scores, self.config.threshold)

    def item_extras(self) -> dict[str, torch.Tensor]:
        """Per-item quality fields for the bundle's item metadata (the same fields the ONNX encoder outputs)."""
        scores, states = self.quality()
        extras = {f"quality_{m}": scores[k] for k, m in enumerate(self.modality_names)}
        extras["quality_state"] = states
        extras.update({f"rewritten_{m}": self.rewritten[k] for k, m in enumerate(self.modality_names)})
        return extras

    # ------------------------------------------------------------------------------ review/rewrite rounds
    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        """Before epochs 1 + r·rewrite_every (r ≥ 1, at most max_rounds): review, then rewrite disparity items."""
        if not self.config.reviewer or epoch <= 1 or (epoch - 1) % self.config.rewrite_every:
            return
        if int(self.rounds_done) >= self.config.max_rounds:
            return
        self.review_and_rewrite(epoch, generator)

    @torch.no_grad()
    def rescore(self, k: int, candidate_features: torch.Tensor) -> torch.Tensor:
        """(I,) reviewer scores of modality k if every item's feature were ``candidate_features`` (I, D)."""
        was_training = self.training
        self.eval()
        interests = self.user_interests(self.user_id_embedding)
        scores = review_scores(self.review_projection[k](candidate_features), interests, self.edge_pattern,
                               self.edge_items)  # fmt: skip
        self.train(was_training)
        return scores

    def review_and_rewrite(self, epoch: int, generator: torch.Generator) -> None:
        """One round: review every item; train the rewriter on high-quality items (both directions); rewrite the
        weak modality of each disparity item and keep it by ``keep_rule``. Records counts under both rules."""
        config = self.config
        scores, states = self.quality()
        round_index = int(self.rounds_done)
        if round_index == 0:
            self.first_review.copy_(scores)
        self.review.copy_(scores)
        stats = torch.full_like(self.round_stats[0], float("nan"))
        stats[0] = epoch
        for state in (HIGH_QUALITY, DISPARITY, LOW_QUALITY):
            stats[2 + state] = float((states == state).sum())
        if config.rewriter:
            features = [f.detach() for f in self.features()]
            high = torch.nonzero(states == HIGH_QUALITY).squeeze(1)
            if high.numel():
                sources = torch.cat([features[0][high], features[1][high]])
                targets = torch.cat([features[1][high], features[0][high]])
                directions = torch.cat([torch.zeros_like(high), torch.ones_like(high)])
                epochs = config.first_round_epochs if round_index == 0 else config.later_round_epochs
                stats[1] = self.rewriter.fit(sources, directions, targets, epochs=epochs, generator=generator)
            good = scores >= config.threshold  # (2, I)
            base = len(ROUND_STAT_FIELDS)
            for target in range(2):
                source = 1 - target
                candidates = torch.nonzero(good[source] & ~good[target]).squeeze(1)
                kept = torch.zeros(0, dtype=torch.long, device=candidates.device)
                improves = threshold = torch.zeros(0, dtype=torch.bool, device=candidates.device)
                if high.numel() and candidates.numel():
                    rewritten = self.rewriter.rewrite(features[source][candidates],
                                                      torch.full_like(candidates, source))  # fmt: skip
                    trial = features[target].clone()
                    trial[candidates] = rewritten
                    new_scores = self.rescore(target, trial)[candidates]
                    improves = new_scores > scores[target, candidates]
                    threshold = new_scores > config.threshold
                    keep = improves if config.keep_rule == "improves" else threshold
                    kept = candidates[keep]
                    self.item_features[self.modality_names[target]].data[kept] = rewritten[keep]
                    self.rewritten[target, kept] = True
                offset = base + target * len(ROUND_STAT_PER_MODALITY)
                stats[offset : offset + 4] = torch.tensor([candidates.numel(), int(improves.sum()),
                                                           int(threshold.sum()), kept.numel()], dtype=stats.dtype)  # fmt: skip
        self.round_stats[round_index] = stats
        self.rounds_done += 1

    # ---------------------------------------------------------------------------------- new items (ONNX)
    def content_encoder(self) -> ContentEncoder:
        return R2MRContentEncoder(self)


def content_ridge_map(x: torch.Tensor, y: torch.Tensor, *, seed: int = 0, holdout: float = 0.1) -> torch.Tensor:
    """argmin ‖xW − y‖² + λ‖W‖² (``models.ridge``), λ chosen by held-out MSE on a seeded ``holdout`` share of rows
    and refitted on all rows. x: (N, F) with a bias column; y: (N, T). Returns W (F, T) float32."""
    held = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed)) < holdout
    return fit_ridge(x, y, held, criterion="mse").weight.float()


class R2MRContentEncoder(ContentEncoder):
    """A new item's R2MR vector and quality, from its raw modality features alone (exported to ONNX).

    A new item has no users, so what the reviewer and the gate read from users is predicted from content, with
    ridge maps fitted on the trained items (closed form, when the encoder is built):
    - s^m = σ(a_m · [ē^m, 1]): a linear head on the projected feature predicting the reviewer's logit;
    - h = [ē^text·mask, mask, ē^image·mask, mask, 1] · B: the collaborative vector (mean of the item's users'
      embeddings, tanh) predicted from content.
    Disparity items are rewritten as in training (the generator, kept by the model's rule against the head's
    scores). The vector is the LightGCN layer-0 term of each branch, normalize(x^m), concatenated: an item without
    edges receives nothing from layers ≥ 1.
    Outputs: item_vector (N, 2D), quality_<m> (N,), quality_state (N,) int64, rewritten_<m> (N,) bool.
    """

    score_heads: torch.Tensor
    collaborative_map: torch.Tensor

    def __init__(self, model: R2MR) -> None:
        super().__init__()
        config = model.config
        self.config = config
        self.modality_names = model.modality_names
        self.extra_output_names = (*(f"quality_{m}" for m in self.modality_names), "quality_state",
                                   *(f"rewritten_{m}" for m in self.modality_names))  # fmt: skip
        self.extra_output_labels = {"quality_state": STATE_NAMES}
        trained_rewriter = bool(torch.isfinite(model.round_stats[:, 1]).any())
        self.rewrite_enabled = bool(config.reviewer and config.rewriter and trained_rewriter)
        self.generator = model.rewriter.generator
        with torch.no_grad():
            for k in range(2):
                self.register_buffer(f"mean_{k}", getattr(model, f"projection_mean_{k}").detach().cpu().clone())
                self.register_buffer(f"matrix_{k}", getattr(model, f"projection_matrix_{k}").detach().cpu().clone())
            was_training = model.training
            model.eval()
            scores, _ = model.quality()
            collaborative = torch.tanh(torch.sparse.mm(model.item_user_mean, model.user_id_embedding)).cpu()  # (I, D)
            model.train(was_training)
            has = model.has_modality.cpu()
            trained = torch.bincount(model.edge_items.cpu(), minlength=model.n_items) > 0  # (I,) items with users
            raw = [model.initial_features[k].cpu() for k in range(2)]  # (I, D): what a new item would have
            ones = torch.ones(model.n_items, 1)
            heads = []
            for k in range(2):
                rows = trained & has[k]
                target = torch.logit(scores[k].cpu().clamp(1e-4, 1 - 1e-4))[:, None]  # (I, 1)
                heads.append(content_ridge_map(torch.cat([raw[k], ones], dim=1)[rows], target[rows]))  # (D + 1, 1)
            self.register_buffer("score_heads", torch.cat(heads, dim=1))  # (D + 1, 2)
            content = torch.cat([raw[0], has[0, :, None].float(), raw[1], has[1, :, None].float(), ones], dim=1)
            self.register_buffer("collaborative_map", content_ridge_map(content[trained], collaborative[trained]))

    def project(self, k: int, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mean: torch.Tensor = getattr(self, f"mean_{k}")
        matrix: torch.Tensor = getattr(self, f"matrix_{k}")
        return (features - mean) @ matrix * mask  # (N, D)

    def head_scores(self, k: int, projected: torch.Tensor) -> torch.Tensor:
        weights: torch.Tensor = self.score_heads[:, k]  # (D + 1,)
        return torch.sigmoid(projected @ weights[:-1] + weights[-1])  # (N,)

    def forward(self, *features_and_masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        masks = [features_and_masks[2 * k + 1] for k in range(2)]  # (N, 1) each
        projected = [self.project(k, features_and_masks[2 * k], masks[k]) for k in range(2)]  # (N, D) each
        present = [masks[k].squeeze(1) > 0.5 for k in range(2)]  # (N,) bool
        if self.config.reviewer:
            scores = [self.head_scores(k, projected[k]) * masks[k].squeeze(1) for k in range(2)]
        else:
            scores = [0.5 * masks[k].squeeze(1) for k in range(2)]
        rewritten = [torch.zeros_like(present[k]) for k in range(2)]
        if self.rewrite_enabled:
            good = [scores[k] >= self.config.threshold for k in range(2)]
            new_features, new_scores = list(projected), list(scores)
            for target in range(2):
                source = 1 - target
                candidate = good[source] & ~good[target]  # (N,)
                direction = torch.full_like(candidate, source, dtype=torch.long)
                rewrite, _ = self.generator(projected[source], direction)  # (N, D)
                rewrite_score = self.head_scores(target, rewrite)
                if self.config.keep_rule == "improves":
                    better = rewrite_score > scores[target]
                else:
                    better = rewrite_score > self.config.threshold
                keep = candidate & better
                new_features[target] = torch.where(keep[:, None], rewrite, projected[target])
                new_scores[target] = torch.where(keep, rewrite_score, scores[target])
                rewritten[target] = keep
            projected, scores = new_features, new_scores
            present = [present[k] | rewritten[k] for k in range(2)]
        content = torch.cat([projected[0], masks[0], projected[1], masks[1], torch.ones_like(masks[0])], dim=1)
        collaborative = content @ self.collaborative_map  # (N, D)
        branches = []
        for k in range(2):
            gate = present[k].float() * (scores[k] + self.config.score_floor)
            fused = gate[:, None] * projected[k] + (1 - scores[k])[:, None] * collaborative
            branches.append(F.normalize(fused, dim=-1))
        vector = torch.cat(branches, dim=1)  # (N, 2D)
        state = quality_states(torch.stack(scores), self.config.threshold)  # (N,)
        return (vector, *scores, state, *rewritten)
