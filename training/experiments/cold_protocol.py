"""Item cold start: ONE protocol for every model (R2MR, QARM, VBPR, the ID baselines).

The protocol. A seeded share of the items that have interactions is held out (``make_cold_split``: ``share`` and
``seed`` choose the same items for every model). Every interaction of a held-out item moves to split ``COLD``: out of
train, valid AND test, so cold items shape neither training nor model selection and the warm test stays warm. Each
model is trained on the rest by the project's trainer and selected on the warm validation split. Each cold item then
gets a vector from its content alone, as the service makes one for a newly ingested item: the model's own content
encoder (``content_encoder()``: R2MR's, VBPR's content part, QARM's codes), or, for an ID model (LightGCN, BPR-MF), the
bundle's ridge map from content to its trained item vectors (``training.export.ridge``, fitted on the items with
training interactions). Every user who interacted with a cold item ranks **the cold items only** — the standard item
cold-start protocol (DropoutNet, CLCRec, ALDI: cold candidates, nothing masked since no user saw a cold item in
training); the user's relevant items are the cold items they interacted with. The ranking is the project's
``FullRankingEvaluator`` on an item view holding only the cold items, metrics at ``COLD_TOPK`` averaged per user.
Nothing is chosen on the cold items.

The runs and the table behind docs/cold-start.md: ``training.experiments.cold_start`` (``mmrec cold-start``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.base import Recommender
from models.fixed_vectors import FixedVectors
from training.data.dataset import TEST, TRAIN, InteractionDataset
from training.export.ridge import content_inputs, fit_ridge_map
from training.fit.evaluator import FullRankingEvaluator

COLD = 3  # split code of a cold item's interactions: in no split the trainer or its evaluators read
COLD_TOPK = (10, 20, 50)
RIDGE_HOLDOUT = 0.1  # share of trained items held out to choose the ridge strength (as the bundle export does)


@dataclass(frozen=True)
class ColdSplit:
    dataset: InteractionDataset  # every interaction of a cold item in split COLD
    cold: np.ndarray  # (C,) sorted item rows
    share: float
    seed: int


def cold_dataset_name(name: str, *, share: float, seed: int) -> str:
    return f"{name}-cold{round(share * 100)}s{seed}"


def make_cold_split(dataset: InteractionDataset, *, share: float, seed: int) -> ColdSplit:
    """Hold out ``share`` of the items with interactions (drawn with ``seed``): their interactions move to COLD.

    The cold rows are listed in the dataset's report (``cold_start.items``), so a saved copy carries them.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"cold share must be in (0, 1), got {share}")
    candidates = np.unique(dataset.item)
    n_cold = max(1, round(share * candidates.size))
    cold = np.sort(np.random.default_rng(seed).choice(candidates, size=n_cold, replace=False))
    split = dataset.split.copy()
    split[np.isin(dataset.item, cold)] = COLD
    report = {**dict(dataset.report), "cold_start": {"from": dataset.name, "share": share, "seed": seed,
                                                    "items": cold.tolist()}}  # fmt: skip
    cold_dataset = dataclasses.replace(
        dataset, name=cold_dataset_name(dataset.name, share=share, seed=seed),
        split_name=f"{dataset.split_name}+cold{round(share * 100)}-seed{seed}", split=split, report=report)  # fmt: skip
    return ColdSplit(dataset=cold_dataset, cold=cold, share=share, seed=seed)


def read_cold_split(dataset: InteractionDataset) -> ColdSplit | None:
    """The cold split a saved dataset made by :func:`make_cold_split` holds (None for any other dataset)."""
    described = dataset.report.get("cold_start")
    if not described:
        return None
    cold = np.asarray(described["items"], dtype=np.int64)
    if not (dataset.split[np.isin(dataset.item, cold)] == COLD).all():
        raise ValueError(f"{dataset.name}: its cold items have interactions outside split {COLD}")
    return ColdSplit(dataset=dataset, cold=cold, share=float(described["share"]), seed=int(described["seed"]))


def ensure_cold_dataset(datasets_root: Path, base_dir: Path, *, share: float, seed: int) -> Path:
    """The cold split of the prepared dataset in ``base_dir`` as a prepared dataset of its own (written on first
    use), for runs that must be exported or found again by dataset name."""
    base = InteractionDataset.load(base_dir)
    directory = datasets_root / cold_dataset_name(base.name, share=share, seed=seed)
    if not (directory / "dataset.json").exists():
        make_cold_split(base, share=share, seed=seed).dataset.save(directory)
    return directory


def item_subset(dataset: InteractionDataset, rows: np.ndarray) -> InteractionDataset:
    """``dataset`` restricted to the item rows ``rows`` (renumbered 0.. in that order) and their interactions."""
    position = np.full(dataset.n_items, -1, dtype=np.int64)
    position[rows] = np.arange(rows.size)
    keep = position[dataset.item] >= 0
    modalities = {name: dataclasses.replace(m, features=m.features[rows], present=m.present[rows])
                  for name, m in dataset.modalities.items()}  # fmt: skip
    return dataclasses.replace(
        dataset, item_ids=[dataset.item_ids[i] for i in rows], item_text=[dataset.item_text[i] for i in rows],
        item_image=[dataset.item_image[i] for i in rows], modalities=modalities, user=dataset.user[keep],
        item=position[dataset.item[keep]], timestamp=dataset.timestamp[keep], split=dataset.split[keep])  # fmt: skip


def cold_view(split: ColdSplit) -> InteractionDataset:
    """The evaluation view: the cold items only, their interactions as the test split, every user kept."""
    view = item_subset(split.dataset, split.cold)
    return dataclasses.replace(view, name=f"{split.dataset.name}:cold-items",
                               split=np.full(view.split.shape, TEST, dtype=np.int8))  # fmt: skip


@torch.no_grad()
def cold_item_vectors(model: Recommender, split: ColdSplit) -> tuple[torch.Tensor, str]:
    """(the cold items' vectors (C, d) from content alone, "native" or "ridge-map")."""
    model.eval()
    encoder = model.content_encoder()
    method = "native"
    if encoder is None:  # an ID model: the bundle's ridge map from content to its trained item vectors
        _, train_items = split.dataset.edges(TRAIN)
        trained = np.flatnonzero(np.bincount(train_items, minlength=split.dataset.n_items) > 0)
        vectors = model.representations().items.detach().float().cpu().numpy()
        encoder, _ = fit_ridge_map(item_subset(split.dataset, trained), vectors[trained], holdout=RIDGE_HOLDOUT)
        method = "ridge-map"
    encoder = encoder.cpu().eval()
    inputs = [torch.from_numpy(array[split.cold]) for _, features, mask in content_inputs(split.dataset)
              for array in (features, mask)]  # fmt: skip
    outputs = encoder(*inputs)
    vectors = outputs[0] if isinstance(outputs, tuple) else outputs
    return vectors.float(), method


def cold_topk(split: ColdSplit, topk: tuple[int, ...]) -> tuple[int, ...]:
    """The cutoffs that fit the number of cold items (all of them when none does)."""
    return tuple(k for k in topk if k <= split.cold.size) or (int(split.cold.size),)


def evaluate_cold(users: torch.Tensor, cold_vectors: torch.Tensor, split: ColdSplit, *,
                  topk: tuple[int, ...] = COLD_TOPK) -> dict[str, Any]:  # fmt: skip
    """Rank the cold items (``cold_vectors``, (C, d), rows in ``split.cold`` order) for every user who interacted
    with one, scoring user vectors ``users`` (U, d) by dot product; the project's evaluator over the cold items."""
    evaluator = FullRankingEvaluator(cold_view(split), split=TEST, topk=cold_topk(split, topk))
    result = evaluator.evaluate(FixedVectors(users.detach().float().cpu(), cold_vectors.detach().float().cpu()))
    return {"n_cold_items": int(split.cold.size), "n_users": result.n_users, "metrics": result.metrics}


@torch.no_grad()
def evaluate_cold_model(model: Recommender, split: ColdSplit, *, topk: tuple[int, ...] = COLD_TOPK) -> dict[str, Any]:
    """The protocol for a trained model: its user vectors against its content-only vectors of the cold items."""
    model.eval()
    users = model.representations().users
    if users is None:
        raise ValueError("cold-start evaluation needs a model with a user table")
    vectors, method = cold_item_vectors(model, split)
    return {"encoder": method, **evaluate_cold(users, vectors, split, topk=topk)}


def content_similarity(dataset: InteractionDataset, embeddings: dict[str, tuple[np.ndarray, np.ndarray]]) -> FixedVectors:
    """Content-only similarity: score(u, i) = mean over the modalities item i has of cos(profile_u,m, f_i,m), with
    profile_u,m the mean normalised vector of u's TRAINING items that have modality m. An absent modality is left
    out of the mean (not scored as zero). ``embeddings``: name → (vectors (I, d), present (I,))."""
    train = dataset.matrix(TRAIN)
    users, items = [], []
    present = np.stack([p for _, p in embeddings.values()], axis=1).astype(np.float64)  # (I, M)
    n_present = np.maximum(present.sum(axis=1, keepdims=True), 1.0)
    for k, (vectors, has) in enumerate(embeddings.values()):
        x = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12) * has[:, None]
        counts = np.maximum(np.asarray(train @ has.astype(np.float64)).reshape(-1, 1), 1.0)
        users.append(np.asarray(train @ x) / counts)  # (U, d_m)
        items.append(x * present[:, k : k + 1] / n_present)  # (I, d_m)
    return FixedVectors(torch.from_numpy(np.concatenate(users, axis=1)).float(),
                        torch.from_numpy(np.concatenate(items, axis=1)).float())  # fmt: skip


def evaluate_cold_content_similarity(split: ColdSplit, embeddings: dict[str, tuple[np.ndarray, np.ndarray]], *,
                                     topk: tuple[int, ...] = COLD_TOPK) -> dict[str, Any]:  # fmt: skip
    """The protocol for the content-similarity baseline (no training: users' profiles from their training items)."""
    scorer = content_similarity(split.dataset, embeddings)
    return {"encoder": "content", **evaluate_cold(scorer.users, scorer.items[torch.from_numpy(split.cold)], split,
                                                  topk=topk)}  # fmt: skip


def random_expectation(split: ColdSplit, topk: tuple[int, ...] = COLD_TOPK) -> dict[str, float]:
    """Expected Recall@k of a random order of the cold items: k / C for every user."""
    return {f"recall@{k}": k / split.cold.size for k in cold_topk(split, topk)}
