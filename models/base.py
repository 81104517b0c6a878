"""The one narrow interface every model implements, so one trainer and one evaluator serve them all.

A model is built from :class:`ModelInputs` (training interactions and item modalities as tensors: no file I/O),
returns a loss for a training batch, and returns user and item representations for full-ranking scoring
(score = user · item, unless the model overrides ``full_sort_scores``). Sequence models return no user table and
encode user histories instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

BatchKind = Literal["pairwise", "sequence", "none"]


@dataclass(frozen=True)
class ModalityInput:
    features: torch.Tensor  # (I, d) float32, zero rows where absent
    present: torch.Tensor  # (I,) bool


@dataclass(frozen=True)
class KnowledgeGraph:
    """Item-anchored knowledge-graph triples (head, relation, tail) as node rows: 0..I-1 are the items (an item
    linked to a KG entity IS that entity), I..I+n_entities-1 the other entities. Only MKGAT reads it."""

    n_entities: int  # entities that are not items
    n_relations: int
    heads: torch.Tensor  # (T,) int64 node rows
    relations: torch.Tensor  # (T,) int64 in [0, n_relations)
    tails: torch.Tensor  # (T,) int64 node rows


@dataclass(frozen=True)
class ModelInputs:
    n_users: int
    n_items: int
    train_users: torch.Tensor  # (E,) int64
    train_items: torch.Tensor  # (E,) int64
    modalities: Mapping[str, ModalityInput] = field(default_factory=dict)
    knowledge_graph: KnowledgeGraph | None = None  # given only to models that ask for it (ModelSpec)


def require_modalities(inputs: ModelInputs, model: str) -> None:
    """A content model's first check: the dataset must have at least one item modality (a clear error if not)."""
    if not inputs.modalities:
        raise ValueError(f"{model} needs at least one item modality; this dataset has none")


@dataclass(frozen=True)
class PairwiseBatch:
    """BPR triples: each user with one positive and one sampled negative item."""

    users: torch.Tensor  # (B,) int64
    pos_items: torch.Tensor  # (B,) int64
    neg_items: torch.Tensor  # (B,) int64


@dataclass(frozen=True)
class SequenceBatch:
    """Left-padded item histories (0 = padding, items shifted by one) and the next item to predict."""

    users: torch.Tensor  # (B,) int64
    histories: torch.Tensor  # (B, L) int64, item row + 1, 0 for padding
    targets: torch.Tensor  # (B,) int64 item rows


@dataclass(frozen=True)
class Representations:
    users: torch.Tensor | None  # (U, d), None for models that encode histories instead
    items: torch.Tensor  # (I, d)


class ContentEncoder(nn.Module):
    """Maps item content to the model's item vector, for items never seen in training (exported to ONNX).

    ``forward`` takes, for each name in ``modality_names`` in order, the features (N, d_m) and a presence mask
    (N, 1) with 1.0 where the item has that modality; it returns (N, dim) item vectors.
    """

    modality_names: tuple[str, ...]
    # Names of further outputs returned after the item vector, as a tuple (item_vector, *extras): per-item model
    # outputs the bundle lists under ``extra_outputs`` (QARM's semantic code). Empty: forward returns the vector.
    extra_output_names: tuple[str, ...] = ()
    # Extra outputs that are integer codes of named categories: field → labels, code c meaning labels[c] (R2MR's
    # quality state). The bundle carries the labels; the service answers with the label, not the code.
    extra_output_labels: Mapping[str, tuple[str, ...]] = {}


@dataclass(frozen=True)
class BundleSection:
    """A model-specific part of the exported bundle: named arrays and a JSON description (QARM's codebooks)."""

    name: str  # the manifest key; the arrays are written as ``<name>/<array>.npy``
    arrays: Mapping[str, torch.Tensor]
    description: Mapping[str, Any]


class Recommender(nn.Module):
    """Base class: subclasses set ``batch_kind`` and implement ``loss`` and ``representations``."""

    batch_kind: ClassVar[BatchKind] = "pairwise"

    def forward(self, batch: PairwiseBatch | SequenceBatch) -> torch.Tensor:
        """The training loss; ``forward`` so that DistributedDataParallel sees the call."""
        return self.loss(batch)

    def loss(self, batch: PairwiseBatch | SequenceBatch) -> torch.Tensor:
        raise NotImplementedError

    def representations(self) -> Representations:
        raise NotImplementedError

    def full_sort_scores(self, user_vectors: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, d) rows of ``representations().users`` (or encoded histories) and (I, d) item vectors → (B, I) the
        scores the evaluator ranks by: their inner product, which the bundle serves. Only a model whose score is not
        an inner product overrides it (MARIO's per-interaction attention), and says what its bundle serves instead.
        """
        return user_vectors @ items.T

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        """Called by the trainer before each training epoch (1-based) with a generator seeded by (seed, epoch).

        For per-epoch work such as re-sampling a pruned graph (FREEDOM) or a review/rewrite round (R2MR).
        The default does nothing.
        """

    def content_encoder(self) -> ContentEncoder | None:
        """The model's own map from content to item vectors, or None for ID models (export then fits one)."""
        return None

    def item_extras(self) -> Mapping[str, torch.Tensor]:
        """Per-item model outputs for the bundle's item metadata: field name → (I,) tensor. Default: none.

        A model whose content encoder has ``extra_output_names`` returns the same fields here for trained items.
        """
        return {}

    def bundle_sections(self) -> tuple[BundleSection, ...]:
        """Model-specific arrays the bundle carries beside the item vectors (default: none)."""
        return ()

    def encode_histories(self, histories: torch.Tensor, reps: Representations) -> torch.Tensor:
        """(B, L) padded histories → (B, d) user vectors; only sequence models implement it."""
        raise NotImplementedError(f"{type(self).__name__} has a user table and does not encode histories")

    def encode_items(self, item_vectors: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, L, d) item vectors of left-padded histories (rows of ``representations().items``, zeros at padding)
        and (B, L) bool presence → (B, d) user vectors: what a sequence model's exported user tower computes."""
        raise NotImplementedError(f"{type(self).__name__} does not encode histories from item vectors")

    def user_tower(self) -> UserTower | None:
        """The user tower the bundle carries (sequence models), or None for models with a user table."""
        return None


class UserTower(nn.Module):
    """A sequence model's user encoder for serving, exported as ``user_tower.onnx`` (docs/bundle-format.md).

    ``forward(item_vectors (B, L, d), mask (B, L))``: the item vectors of a user's ``max_length`` most recent items,
    most recent last, left-padded with zeros, and a float32 mask with 1.0 at items → (B, d) user vectors. The
    item vectors are the ones the index holds (new items: the content encoder's), so an ingested item can be part
    of a history as soon as it is recommendable.
    """

    def __init__(self, model: Recommender, *, max_length: int) -> None:
        super().__init__()
        self.model = model
        self.max_length = max_length

    def forward(self, item_vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_items(item_vectors, mask > 0.5)
