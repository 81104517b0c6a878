"""Detecting damaged item content: R2MR's reviewer against two detectors that need no R2MR training.

Each detector gives every (item, modality) a score, higher = more likely damaged:

- **reviewer** (R2MR): 1 − s^m, at the FIRST review round (``R2MR.first_review``, scores before the model has
  trained on its own verdicts for long) and for the final model (``R2MR.quality()`` at the best epoch). R2MR scores
  a modality the item lacks 0, so a missing modality scores 1 (unless a kept rewrite filled it in: then its score is
  the rewrite's). Both review R2MR's trainable feature table ē, which BPR and kept rewrites move away from the item's
  content during training; as a diagnostic, the final reviewer also scores the content as given (the fixed
  projection of the item's features, ``R2MR.initial_features``);
- **(a) user-profile cosine**: 1 − cos(x̂_i, p_i), p_i = Σ over the item's training users u, Σ over u's OTHER
  training items j that have the modality, of x̂_j (one term per deduplicated training edge (u, j), j ≠ i);
- **(b) cross-modal kNN**: the mean cosine distance 1 − cos(x̂_i, x̂_j) between the item's feature and the features
  of its k = 10 nearest items j ≠ i found by cosine in the OTHER modality's space, among the items that have both.
  It flags the item, not which of its modalities is wrong: a wrong text finds the wrong neighbours, and the item's
  clean image is then far from their images too (tested).

x̂ is the modality's feature as the models saw it (after the corruption), centred by the modality's mean over the
items that have it and L2-normalised. Centring matters for features with a large common component (EfficientNet
image features are non-negative: every raw cosine is high); it makes the simple detectors stronger, not weaker.

**What is scored** (:func:`detection_auroc`). Per modality m: the items with at least one training user that have
BOTH modalities in the dataset's original content; positives are those whose m was damaged. The simple detectors
have no feature to score where m is missing after the corruption: they give it the largest possible score (a
missing modality is flagged, as the reviewer's 0 flags it), so for kind ``missing`` every detector flags every
damaged item from the mask alone: that AUROC measures nothing but the mask, and is reported as such. Where a simple
detector is undefined for an item of the population (its other modality is missing, or none of its users has
another item with m) it gets the median of its scores there: neutral, and counted in the report. "pooled" is one
AUROC over the (item, modality) pairs of both modalities.

AUROC (:func:`auroc`) is the Mann–Whitney statistic with ties counted 1/2: the probability that a random damaged
pair scores above a random clean one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

from training.data.corruption import CorruptedContent
from training.data.dataset import TRAIN, InteractionDataset
from training.data.user_profile import normalised_features, user_profile_cosine

KNN_K = 10
USER_PROFILE = "user-profile cosine (a)"
CROSS_MODAL_KNN = "cross-modal kNN (b)"
REVIEWER_FIRST = "reviewer, first review"
REVIEWER_FINAL = "reviewer, final model"
REVIEWER_RAW = "final reviewer on the content as given"  # a diagnostic: the trained table vs the item's own content


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + ½ P(tie), from average ranks; nan without both classes."""
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores, method="average")
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def training_graph(dataset: InteractionDataset) -> sp.csr_matrix:
    """The binary (U, I) matrix of the deduplicated training edges."""
    return dataset.matrix(TRAIN)


def user_profile_disagreement(dataset: InteractionDataset, modality: str) -> np.ndarray:
    """Detector (a): (I,) 1 − c^m (``training.data.user_profile``), nan where the item lacks the modality or p_i = 0."""
    disagreement: np.ndarray = 1.0 - user_profile_cosine(dataset, modality)
    return disagreement


def cross_modal_knn_distance(dataset: InteractionDataset, modality: str, other: str, *, k: int = KNN_K) -> np.ndarray:
    """Detector (b): (I,) mean cosine distance in ``modality`` to the k nearest items in ``other``'s space (items with
    both, the item itself excluded); nan where the item lacks either."""
    x, has = normalised_features(dataset, modality)
    y, has_other = normalised_features(dataset, other)
    both = np.flatnonzero(has & has_other)
    out = np.full(dataset.n_items, np.nan)
    if both.size < 2:
        return out
    k = min(k, both.size - 1)
    similarity = y[both] @ y[both].T  # (B, B)
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argpartition(-similarity, k - 1, axis=1)[:, :k]  # (B, k) positions in `both`
    distance = 1.0 - np.einsum("bd,bkd->bk", x[both], x[both][neighbours])
    out[both] = distance.mean(axis=1)
    return out


def simple_detector_scores(corrupted: CorruptedContent) -> dict[str, dict[str, np.ndarray]]:
    """detector → modality → (I,) scores of the two simple detectors on the content the models saw."""
    data = corrupted.dataset
    names = sorted(data.modalities)
    if len(names) != 2:
        raise ValueError(f"the detectors compare two modalities; {data.name} has {names}")
    return {USER_PROFILE: {m: user_profile_disagreement(data, m) for m in names},
            CROSS_MODAL_KNN: {m: cross_modal_knn_distance(data, m, names[1 - k]) for k, m in enumerate(names)}}  # fmt: skip


def reviewer_detector_scores(first: np.ndarray, final: np.ndarray, names: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
    """The reviewer's 1 − s from (2, I) scores of the first review round and of the final model (modalities in
    ``names`` order, R2MR's sorted order). A run whose first round never ran (-1 scores) has no first-review row."""
    out = {REVIEWER_FINAL: {m: 1.0 - final[k] for k, m in enumerate(names)}}
    if bool((first >= 0).all()):
        out[REVIEWER_FIRST] = {m: 1.0 - first[k] for k, m in enumerate(names)}
    return out


def group_means(values: Mapping[str, Mapping[str, np.ndarray]], clean: InteractionDataset,
                corrupted: CorruptedContent) -> dict[str, dict[str, dict[str, float | None]]]:  # fmt: skip
    """name → modality → mean of (I,) ``values`` over the damaged and over the clean items of the scored population
    (for the reviewer's diagnostics: how far its table moved, how much was rewritten)."""
    scored = population(clean)
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for name, by_modality in values.items():
        out[name] = {}
        for m, array in by_modality.items():
            hit = corrupted.damaged_mask(m)
            out[name][m] = {"damaged": finite_mean(np.asarray(array, dtype=np.float64)[scored & hit]),
                            "clean": finite_mean(np.asarray(array, dtype=np.float64)[scored & ~hit])}  # fmt: skip
    return out


def population(clean: InteractionDataset) -> np.ndarray:
    """(I,) bool: the items scored: at least one training user, both modalities in the original content."""
    has_users = np.asarray(training_graph(clean).sum(axis=0)).ravel() > 0
    both = np.stack([m.present for m in clean.modalities.values()]).all(axis=0)
    scored: np.ndarray = has_users & both
    return scored


def detection_auroc(clean: InteractionDataset, corrupted: CorruptedContent,
                    detectors: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:  # fmt: skip
    """AUROC of every detector at flagging the damaged modality, per modality and pooled (see the module doc)."""
    scored = population(clean)
    names = sorted(clean.modalities)
    labels = {m: corrupted.damaged_mask(m)[scored] for m in names}
    result: dict[str, Any] = {"n_scored": int(scored.sum()), "n_damaged": {m: int(labels[m].sum()) for m in names},
                              "auroc": {}, "neutral": {}, "mean_score": {}}  # fmt: skip
    for detector, by_modality in detectors.items():
        per_modality: dict[str, float] = {}
        neutral: dict[str, int] = {}
        pooled_scores, pooled_labels = [], []
        for m in names:
            scores = np.asarray(by_modality[m], dtype=np.float64)[scored].copy()
            missing_now = ~corrupted.dataset.modalities[m].present[scored]
            scores[missing_now & np.isnan(scores)] = np.inf  # no feature left: flagged (the reviewer's s = 0)
            undefined = np.isnan(scores)
            neutral[m] = int(undefined.sum())
            if undefined.any():
                scores[undefined] = np.median(scores[~undefined]) if (~undefined).any() else 0.0
            per_modality[m] = auroc(scores, labels[m])
            pooled_scores.append(scores)
            pooled_labels.append(labels[m])
        all_scores, all_labels = np.concatenate(pooled_scores), np.concatenate(pooled_labels)
        per_modality["pooled"] = auroc(all_scores, all_labels)
        result["auroc"][detector] = per_modality
        result["neutral"][detector] = neutral
        result["mean_score"][detector] = {"damaged": finite_mean(all_scores[all_labels]),
                                          "clean": finite_mean(all_scores[~all_labels])}  # fmt: skip
    return result


def finite_mean(values: np.ndarray) -> float | None:
    """The mean of the finite values (a missing modality's infinite score left out); None if there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None
