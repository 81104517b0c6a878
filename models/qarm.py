"""QARM (Kuaishou, arXiv 2411.11739): items as short semantic codes of recommendation-aligned content embeddings.

Two stages, read top to bottom:

1. **Alignment head** (:class:`AlignmentHead`): frozen encoder features of each modality → a small trainable head →
   one L2-normalised item embedding, trained elsewhere (``training/experiments/qarm_alignment.py``) with an in-batch contrastive
   loss over (trigger, target) pairs that a trained recommender finds similar. :class:`RawFeatureFusion` is the
   unaligned alternative with the same interface (the ablation).
2. **Residual codes** (:func:`residual_encode`): L levels of K centres (fitted by FAISS k-means in ``qarm_quantiser``);
   an embedding is coded greedily, level by level, by the nearest centre to what the previous levels left over.

:class:`QARM` is the recommender. An item's vector is the sum of
- its content part: learnable embeddings of its L codes (summed) plus a linear map of its content embedding, and
- its ID part: its ID embedding smoothed over the user–item graph as in LightGCN (``n_layers = 0``: plain ID
  embedding), for items with training interactions only.
Users are LightGCN-smoothed user embeddings. During training the ID part of a random share of items is hidden at
each step, so that users must rank those items by their codes alone: codes are all a new item has. A new item's
vector is therefore its content part alone, at the same scale as the trained items' — exactly what
:meth:`QARM.representations` gives an item without training interactions, and what the exported encoder computes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

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

CODE_OUTPUT = "semantic_code"  # name of the code output of the exported encoder and of the item response field


@dataclass(frozen=True)
class QARMConfig:
    embedding_size: int = 64
    n_layers: int = 2  # LightGCN smoothing of the ID part; the pipeline copies the validated LightGCN's value
    reg_weight: float = 1e-4  # MMRec's EmbLoss on the batch's ego embeddings and content parts, as LightGCN
    source: Literal["aligned", "raw"] = "aligned"  # what the codes quantise; "raw" is the unaligned ablation
    code_levels: int = 3  # L; the spec's secondary source uses 6 for ~10⁸ items, 3 leaves few empty centres at ~10³
    codebook_size: int = 32  # K; TIGER's 256 would leave most centres empty with ~1.5k items (see docs/qarm.md)
    aligned_size: int = 64  # width of the aligned embedding (what the codes quantise when source = "aligned")
    head_hidden: int = 256
    head_dropout: float = 0.1
    use_item_id: bool = True  # codes beside the item ID (QARM); False: codes (and content) instead of it
    use_content_vector: bool = True  # add a linear map of the content embedding itself, beside its codes
    id_dropout: float = 0.5  # share of items whose ID is hidden at each step (DropoutNet's rate): codes must rank alone


def masked_mean(parts: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """Mean of ``parts`` (each (N, h)) over the modalities an item has; masks (N, 1) are 1.0 where present.

    An absent modality adds nothing and does not count in the denominator; an item with none gets zeros.
    """
    total = torch.stack([p * m for p, m in zip(parts, masks, strict=True)]).sum(dim=0)  # (N, h)
    count = torch.stack(masks).sum(dim=0).clamp(min=1.0)  # (N, 1)
    return total / count


class AlignmentHead(nn.Module):
    """Per-modality towers on L2-normalised frozen features, a masked mean over present modalities, a shared MLP,
    L2 normalisation. ``forward(f_1, mask_1, f_2, mask_2, ...)`` in ``modality_names`` order → (N, out)."""

    def __init__(self, modality_dims: Mapping[str, int], *, hidden: int, out: int, dropout: float) -> None:
        super().__init__()
        self.modality_names = tuple(sorted(modality_dims))
        self.towers = nn.ModuleDict({name: nn.Linear(modality_dims[name], hidden) for name in self.modality_names})
        self.shared = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU(),
                                    nn.Linear(hidden, out))  # fmt: skip

    @property
    def out_size(self) -> int:
        last = self.shared[-1]
        assert isinstance(last, nn.Linear)
        return int(last.out_features)

    def forward(self, *features_and_masks: torch.Tensor) -> torch.Tensor:
        parts, masks = [], []
        for k, name in enumerate(self.modality_names):
            features, mask = features_and_masks[2 * k], features_and_masks[2 * k + 1]  # (N, d_m), (N, 1)
            parts.append(self.towers[name](F.normalize(features, dim=1)))  # (N, h)
            masks.append(mask)
        return F.normalize(self.shared(masked_mean(parts, masks)), dim=1)  # (N, out)


class RawFeatureFusion(nn.Module):
    """The unaligned embedding: each modality's L2-normalised features, concatenated, scaled by 1/√M.

    An absent modality is replaced by the mean normalised vector of the items that have it (the typical item), never
    by zeros, so its block does not pull the item towards centres with small blocks.
    """

    def __init__(self, modality_dims: Mapping[str, int], means: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.modality_names = tuple(sorted(modality_dims))
        self.out_size = sum(modality_dims.values())
        for name in self.modality_names:
            self.register_buffer(f"mean_{name}", means[name].reshape(1, -1).clone())  # (1, d_m)

    @staticmethod
    def modality_means(modalities: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Mean L2-normalised feature vector over the items that have each modality (zeros if none has it)."""
        out = {}
        for name, (features, present) in modalities.items():
            rows = F.normalize(features[present], dim=1)
            out[name] = rows.mean(dim=0) if rows.shape[0] else torch.zeros(features.shape[1])
        return out

    def forward(self, *features_and_masks: torch.Tensor) -> torch.Tensor:
        blocks = []
        for k, name in enumerate(self.modality_names):
            features, mask = features_and_masks[2 * k], features_and_masks[2 * k + 1]  # (N, d_m), (N, 1)
            mean: torch.Tensor = getattr(self, f"mean_{name}")
            blocks.append(mask * F.normalize(features, dim=1) + (1.0 - mask) * mean)
        return torch.cat(blocks, dim=1) / math.sqrt(len(self.modality_names))  # (N, Σ d_m)


def residual_encode(x: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual quantisation: level by level, the nearest centre (squared L2) to the remaining residual.

    x (N, d), codebooks (L, K, d) → codes (N, L) int64 and the reconstruction Σ_l codebooks[l, code_l] (N, d).
    Ties go to the lowest centre index.
    """
    residual = x
    codes = []
    for level in range(codebooks.shape[0]):
        centres = codebooks[level]  # (K, d)
        distances = (centres * centres).sum(dim=1)[None, :] - 2.0 * residual @ centres.T  # (N, K), ‖r‖² dropped
        code = distances.argmin(dim=1)  # (N,)
        residual = residual - centres[code]
        codes.append(code)
    return torch.stack(codes, dim=1), x - residual


class CodeContentVector(nn.Module):
    """What an item's content gives its ego vector: the sum of its per-level code embeddings, plus (optionally) a
    linear map of the content embedding itself. Shared by the recommender and its exported encoder."""

    def __init__(self, config: QARMConfig, width: int) -> None:
        super().__init__()
        self.levels, self.size = config.code_levels, config.codebook_size
        table = torch.empty(config.code_levels * config.codebook_size, config.embedding_size)
        self.code_embedding = nn.Parameter(nn.init.xavier_uniform_(table))  # (L·K, d), level l at rows l·K …
        self.projection = nn.Linear(width, config.embedding_size, bias=False) if config.use_content_vector else None

    def forward(self, codes: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.levels, device=codes.device) * self.size  # (L,)
        part: torch.Tensor = self.code_embedding[codes + offsets].sum(dim=1)  # (N, d)
        if self.projection is not None:
            part = part + self.projection(embeddings)  # (N, d_e) → (N, d)
        return part


def content_embedder(config: QARMConfig, inputs: ModelInputs) -> AlignmentHead | RawFeatureFusion:
    """The module that maps content to the space the codes quantise (an untrained head for ``aligned``)."""
    dims = {name: int(m.features.shape[1]) for name, m in inputs.modalities.items()}
    if config.source == "raw":
        means = RawFeatureFusion.modality_means({n: (m.features, m.present) for n, m in inputs.modalities.items()})
        return RawFeatureFusion(dims, means)
    return AlignmentHead(dims, hidden=config.head_hidden, out=config.aligned_size, dropout=config.head_dropout)


class QARM(Recommender):
    adjacency: torch.Tensor
    codebooks: torch.Tensor
    item_codes: torch.Tensor
    content_embeddings: torch.Tensor
    has_id: torch.Tensor

    def __init__(self, config: QARMConfig, inputs: ModelInputs) -> None:
        super().__init__()
        require_modalities(inputs, "QARM")
        self.config = config
        self.n_users, self.n_items = inputs.n_users, inputs.n_items
        self.modality_names = tuple(sorted(inputs.modalities))
        for name in self.modality_names:
            m = inputs.modalities[name]
            self.register_buffer(f"features_{name}", m.features.float() * m.present[:, None], persistent=False)
            self.register_buffer(f"mask_{name}", m.present.float()[:, None], persistent=False)
        # Fitted by the pipeline before training (install_quantiser); frozen here, stored with the checkpoint.
        self.embedder = content_embedder(config, inputs).requires_grad_(False)
        width = self.embedder.out_size
        self.register_buffer("codebooks", torch.zeros(config.code_levels, config.codebook_size, width))  # (L, K, d_e)
        self.register_buffer("item_codes", torch.zeros(inputs.n_items, config.code_levels, dtype=torch.long))
        self.register_buffer("content_embeddings", torch.zeros(inputs.n_items, width))  # (I, d_e)
        has_id = torch.bincount(inputs.train_items, minlength=inputs.n_items) > 0
        self.register_buffer("has_id", has_id, persistent=False)  # (I,) items with training interactions

        d = config.embedding_size
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_users, d)))
        self.item_embedding = (
            nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_items, d))) if config.use_item_id else None
        )
        self.content = CodeContentVector(config, width)
        if config.n_layers > 0:
            adjacency = normalized_bipartite_adjacency(inputs.n_users, inputs.n_items, inputs.train_users, inputs.train_items)  # fmt: skip
            self.register_buffer("adjacency", adjacency, persistent=False)

    # --------------------------------------------------------------------------------------------- the quantiser
    def content_inputs(self) -> list[torch.Tensor]:
        out = []
        for name in self.modality_names:
            out += [getattr(self, f"features_{name}"), getattr(self, f"mask_{name}")]
        return out

    def train(self, mode: bool = True) -> QARM:
        super().train(mode)
        self.embedder.eval()  # frozen: its dropout stays off while the recommender trains
        return self

    @torch.no_grad()
    def embed_content(self) -> torch.Tensor:
        """(I, d_e) content embeddings of every item, from the current embedder."""
        self.embedder.eval()
        embedded: torch.Tensor = self.embedder(*self.content_inputs())
        return embedded

    @torch.no_grad()
    def install_quantiser(self, codebooks: torch.Tensor, embedder_state: Mapping[str, torch.Tensor] | None = None) -> None:
        """Load the trained alignment head (if given) and the (L, K, d_e) codebooks; code every item."""
        if tuple(codebooks.shape) != tuple(self.codebooks.shape):
            raise ValueError(f"codebooks of shape {tuple(codebooks.shape)}, expected {tuple(self.codebooks.shape)}")
        if embedder_state is not None:
            self.embedder.load_state_dict(dict(embedder_state))
        self.codebooks.copy_(codebooks)
        self.content_embeddings.copy_(self.embed_content())
        self.item_codes.copy_(residual_encode(self.content_embeddings, self.codebooks)[0])

    # ------------------------------------------------------------------------------------------ the recommender
    def collaborative(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Users (U, d) and the items' ID part (I, d): LightGCN over the ID embeddings (None without item IDs)."""
        if self.item_embedding is None:
            return self.user_embedding, None
        if self.config.n_layers == 0:
            return self.user_embedding, self.item_embedding
        ego = torch.cat([self.user_embedding, self.item_embedding])  # (U+I, d)
        final = light_propagate(self.adjacency, ego, self.config.n_layers)
        return final[: self.n_users], final[self.n_users :]

    def item_vectors(self, id_part: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
        """(I, d): content part, plus the ID part where ``keep`` (I,) is True."""
        items: torch.Tensor = self.content(self.item_codes, self.content_embeddings)  # (I, d)
        if id_part is not None:
            items = items + id_part * keep[:, None].to(items.dtype)
        return items

    def loss(self, batch: PairwiseBatch) -> torch.Tensor:  # type: ignore[override]
        users, id_part = self.collaborative()
        keep = self.has_id
        if self.config.id_dropout > 0:
            keep = keep & (torch.rand(self.n_items, device=keep.device) >= self.config.id_dropout)
        items = self.item_vectors(id_part, keep)
        u, p, n = users[batch.users], items[batch.pos_items], items[batch.neg_items]  # (B, d) each
        ranking = bpr_loss((u * p).sum(-1), (u * n).sum(-1))
        ego = [self.user_embedding[batch.users]]
        if self.item_embedding is not None:
            ego += [self.item_embedding[batch.pos_items], self.item_embedding[batch.neg_items]]
        content = self.content(self.item_codes[batch.pos_items], self.content_embeddings[batch.pos_items])
        content_neg = self.content(self.item_codes[batch.neg_items], self.content_embeddings[batch.neg_items])
        return ranking + self.config.reg_weight * embedding_norm_penalty(*ego, content, content_neg)

    def representations(self) -> Representations:
        users, id_part = self.collaborative()
        return Representations(users=users, items=self.item_vectors(id_part, self.has_id))

    def content_encoder(self) -> ContentEncoder:
        return QARMContentEncoder(self)

    def item_extras(self) -> Mapping[str, torch.Tensor]:
        return {CODE_OUTPUT: self.item_codes}  # (I, L): what the exported encoder returns for the same content

    def bundle_sections(self) -> tuple[BundleSection, ...]:
        return (
            BundleSection(
                name="semantic_codes",
                arrays={"codebooks": self.codebooks, "item_codes": self.item_codes},
                description={
                    "field": CODE_OUTPUT,
                    "levels": self.config.code_levels,
                    "codebook_size": self.config.codebook_size,
                    "space": self.config.source,
                    "dim": int(self.codebooks.shape[2]),
                    "encoding": "greedy residual: level by level the nearest centre (squared L2), ties to the lowest index",
                },
            ),
        )


class QARMContentEncoder(ContentEncoder):
    """Features → content embedding → residual codes → the item vector of an item without an ID part.

    Returns (item_vector (N, d), semantic_code (N, L) int64).
    """

    extra_output_names = (CODE_OUTPUT,)
    codebooks: torch.Tensor

    def __init__(self, model: QARM) -> None:
        super().__init__()
        self.modality_names = model.modality_names
        self.embedder = model.embedder
        self.content = model.content
        self.register_buffer("codebooks", model.codebooks.detach().clone())

    def forward(self, *features_and_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.embedder(*features_and_masks)  # (N, d_e)
        codes, _ = residual_encode(embeddings, self.codebooks)  # (N, L)
        vectors: torch.Tensor = self.content(codes, embeddings)  # (N, d)
        return vectors, codes
