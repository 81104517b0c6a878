"""Which item-to-item similarity should ``GET /v1/items/{id}/similar`` use? Measured on ml100k-posters (issue 14).

Candidates, for a query item ``i`` and every other item ``j`` (``v``: the model's item vectors; an item held out of
training gets the bundle's item-encoder vector from its content, as an ingested item does: the model's own encoder
or the ridge map, as ``encoded`` below; ``c``: the content space, below):

- ``inner_product``: ``v_i · v_j`` (what the service did: favours high-norm, popular items);
- ``cosine``: ``cos(v_i, v_j)``;
- ``content``: ``c_i · c_j`` where ``c`` is the text and image features, each L2-normalised, concatenated and
  normalised again (an item with one modality is compared on that one);
- ``encoded``: ``cos(e_i, e_j)``, ``e`` the bundle's item encoder's output from content alone (the model's own
  content encoder where it has one, R2MR's; the ridge map for an ID model), so trained items are compared as if
  they were ingested;
- ``blend``: ``α · cos(v_i, v_j) + (1 − α) · sim_content(i, j)`` with either content space, ``α`` chosen on
  validation;
- popularity corrections between the inner product and the cosine: the norm exponent
  ``v_i/|v_i| · v_j / |v_j|^a`` (``a = 0``: the inner product's ranking, ``a = 1``: the cosine) for ``a`` in
  ``NORM_EXPONENTS``, and the popularity shrinkage ``cos(v_i, v_j) + b · log(1 + n_j)`` (``n_j`` the item's
  TRAINING interactions, the bundle's popularity; 0 for an item held out of training) for ``b`` in
  ``POPULARITY_WEIGHTS``.

Figures for the top-10 neighbours of each query item:
- genre agreement: share of neighbours sharing at least one MovieLens genre with the query (items.csv flags,
  "unknown" left out; items without a genre are not queried);
- co-like rate: share of (query, neighbour) pairs liked by at least one same user in held-out interactions (the
  test split; with items held out of training, their interactions too), over query items with a held-out user;
  ``co-like share``: the mean share of the query's held-out users who also like the neighbour in held-out data;
- mean neighbour popularity (interactions in the whole dataset) against the catalogue's mean.

``α`` and the content space are chosen on the VALIDATION split (the co-like rate with validation interactions as
the held-out ones); the test split and the cold items only report. The popularity correction is chosen on the same
validation figures by a rule declared before any test figure was read (:func:`select_correction`): among the
candidates of both families whose genre agreement is at least the inner product's and whose neighbours' mean
popularity is at most ``POPULARITY_CAP`` times the catalogue's, the highest co-like rate.

The cold experiment holds out 10% of the items entirely (``training.experiments.cold_protocol.make_cold_split``,
the one cold-start protocol, seed 2024), trains on the rest, gives the cold items vectors from their content alone,
and queries each cold item against the whole catalogue (warm and cold items), as after ingesting them. The
content-to-vector map is the bundle's item encoder: the model's own (``Recommender.content_encoder``, built from the
model trained without the cold items) or, for an ID model, the ridge map fitted on the warm items.

    .venv/bin/python -m training.experiments.item_similarity --dataset ml100k-posters --vectors /tmp/vectors.npz

trains both models with the presets (early stopping or the epoch cap; ``--vectors`` keeps their item vectors for a
re-run without training), prints the tables and writes ``docs/similarity-and-blending/similarity-<dataset>.json`` (or ``--out``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import scipy.sparse as sp
import typer

from training.data.dataset import TEST, TRAIN, VALID, InteractionDataset
from training.fit.trainer import Callback

if TYPE_CHECKING:
    from models.base import ContentEncoder, Recommender

K = 10
ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
CONTENT_SPACES = ("content", "encoded")
NORM_EXPONENTS = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # a in v_i/|v_i| · v_j/|v_j|^a
POPULARITY_WEIGHTS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1)  # b in cos(v_i, v_j) + b·log(1 + n_j)
POPULARITY_CAP = 2.0  # a correction is admissible only if its neighbours are at most this times as popular as average
EPS = 1e-12


def corrections() -> dict[str, tuple[str, float]]:
    """The popularity corrections measured, by name: (method of :meth:`Spaces.scorer`, its parameter), in order of
    preference on equal validation co-likes (the norm family first, as it needs nothing but the vectors: the larger
    exponent first; then the smaller popularity weight)."""
    out = {f"norm_exponent={a:g}": ("norm-exponent", a) for a in sorted(NORM_EXPONENTS, reverse=True)}
    out.update({f"popularity_weight={b:g}": ("popularity-shrinkage", b) for b in sorted(POPULARITY_WEIGHTS)})
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norms > EPS, x / np.maximum(norms, EPS), 0.0)


def content_space(dataset: InteractionDataset) -> np.ndarray:
    """(n_items, Σ d_m): every modality's features L2-normalised (zero where absent), concatenated, normalised."""
    parts = [unit_rows(m.features * m.present[:, None]) for _, m in sorted(dataset.modalities.items())]
    return unit_rows(np.concatenate(parts, axis=1))


def top_neighbours(scores: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """(Q, k) best items per query row of ``scores`` (Q, N), the query item itself excluded, ties by row."""
    scores = np.array(scores, dtype=np.float64)
    scores[np.arange(len(queries)), queries] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def ml100k_genres(data_root: Path, item_ids: list[str]) -> list[frozenset[str]]:
    """MovieLens genre flags of each item (items.csv, first row of a repeated movie_id), without "unknown"."""
    rows: dict[str, dict[str, str]] = {}
    with (data_root / "ml100k-posters" / "items.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        genre_columns = fields[fields.index("title") + 1 : fields.index("year")]
        for row in reader:
            rows.setdefault(row["movie_id"], row)
    return [frozenset(g for g in genre_columns if g != "genre_unknown" and rows.get(i, {}).get(g) == "1") for i in item_ids]


@dataclass(frozen=True)
class Judge:
    """What the figures of a neighbour list are measured against."""

    genres: list[frozenset[str]]
    heldout: sp.csc_matrix  # (n_users, n_items) binary: the held-out interactions
    popularity: np.ndarray  # (n_items,) interactions in the whole dataset

    @property
    def catalogue_popularity(self) -> float:
        return float(self.popularity.mean())

    def figures(self, queries: np.ndarray, neighbours: np.ndarray) -> dict[str, float]:
        genre_rows = [q for q in range(len(queries)) if self.genres[queries[q]]]
        agree = [np.mean([bool(self.genres[queries[q]] & self.genres[j]) for j in neighbours[q]]) for q in genre_rows]
        users_of = [self.heldout.indices[self.heldout.indptr[i] : self.heldout.indptr[i + 1]] for i in range(self.heldout.shape[1])]
        any_user: list[float] = []
        share: list[float] = []
        for q, item in enumerate(queries):
            mine = users_of[item]
            if mine.size == 0:
                continue
            common = np.array([np.intersect1d(mine, users_of[j], assume_unique=True).size for j in neighbours[q]])
            any_user.append(float((common > 0).mean()))
            share.append(float((common / mine.size).mean()))
        return {
            "genre_agreement@10": float(np.mean(agree)),
            "co_like_rate@10": float(np.mean(any_user)),
            "co_like_share@10": float(np.mean(share)),
            "neighbour_popularity": float(self.popularity[neighbours].mean()),
            "query_items": len(queries),
            "co_like_query_items": len(any_user),
        }


def heldout_matrix(dataset: InteractionDataset, splits: tuple[int, ...]) -> sp.csc_matrix:
    keep = np.isin(dataset.split, splits)
    m = sp.csc_matrix((np.ones(int(keep.sum()), np.float32), (dataset.user[keep], dataset.item[keep])),
                      shape=(dataset.n_users, dataset.n_items))  # fmt: skip
    m.sum_duplicates()
    m.sort_indices()
    return m


@dataclass(frozen=True)
class Spaces:
    """The vectors every candidate is computed from (rows = items of the dataset)."""

    vectors: np.ndarray  # (n_items, d) the model's item vectors; cold rows: the encoder's vectors
    encoded: np.ndarray  # (n_items, d) the item encoder's output from content alone, every row
    content: np.ndarray  # (n_items, Σ d_m) unit rows
    popularity: np.ndarray  # (n_items,) training interactions of each item (0 for an item held out of training)

    def scorer(self, method: str, alpha: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
        """scores (Q, n_items) of the query rows under ``method``: "blend-content"/"blend-encoded" weigh the cosine
        by ``alpha``, "norm-exponent" divides by ``|v_j|^alpha``, "popularity-shrinkage" adds
        ``alpha · log(1 + n_j)`` to the cosine."""
        cf = unit_rows(self.vectors)
        enc = unit_rows(self.encoded)
        if method == "norm-exponent":
            norms = np.linalg.norm(self.vectors.astype(np.float64), axis=1)
            scaled = self.vectors.astype(np.float64) / np.where(norms > EPS, norms, 1.0)[:, None] ** alpha
            return lambda q: cf[q] @ scaled.T
        if method == "popularity-shrinkage":
            return lambda q: cf[q] @ cf.T + alpha * np.log1p(self.popularity)[None, :]
        if method == "inner_product":
            return lambda q: self.vectors[q].astype(np.float64) @ self.vectors.T.astype(np.float64)
        if method == "cosine":
            return lambda q: cf[q] @ cf.T
        if method == "content":
            return lambda q: self.content[q] @ self.content.T
        if method == "encoded":
            return lambda q: enc[q] @ enc.T
        if method == "blend-content":
            return lambda q: alpha * (cf[q] @ cf.T) + (1 - alpha) * (self.content[q] @ self.content.T)
        if method == "blend-encoded":
            return lambda q: alpha * (cf[q] @ cf.T) + (1 - alpha) * (enc[q] @ enc.T)
        raise ValueError(f"unknown method {method!r}")


def encoder_output(encoder: ContentEncoder, dataset: InteractionDataset) -> np.ndarray:
    """(n_items, d) the item encoder's item vectors from every item's content, its inputs in the encoder's modality
    order as the bundle's ONNX graph takes them (``training.export.onnx_export.export_item_encoder``)."""
    import torch

    from training.export.ridge import content_inputs

    by_name = {name: (features, mask) for name, features, mask in content_inputs(dataset)}
    tensors: list[torch.Tensor] = []
    for name in encoder.modality_names:
        features, mask = by_name[name]
        tensors += [torch.from_numpy(features), torch.from_numpy(mask)]
    encoder = encoder.cpu().eval()  # a native encoder shares layers with a model trained on the GPU; inputs are CPU
    with torch.no_grad():
        output = encoder(*tensors)
    vector = output[0] if encoder.extra_output_names else output  # (item_vector, *extras) when it has extras
    return np.asarray(vector.float().numpy(), dtype=np.float32)


def native_encoded(model: Recommender, dataset: InteractionDataset) -> np.ndarray | None:
    """The model's own content encoder's output for every item (what its bundle serves for a new item), or None
    for an ID model (its bundle's encoder is the ridge map) or a dataset without content."""
    encoder = model.content_encoder() if dataset.modalities else None
    return None if encoder is None else encoder_output(encoder, dataset)


def ridge_encoded(dataset: InteractionDataset, item_vectors: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """The bundle's cold-start map for an ID model (``training.export.fit_ridge_map``), fitted on ``fit_rows``
    only, applied to every item's content: (n_items, d)."""
    from training.export.ridge import fit_ridge_map

    view = dataclasses.replace(
        dataset, item_ids=[dataset.item_ids[i] for i in fit_rows], item_text=[dataset.item_text[i] for i in fit_rows],
        item_image=[dataset.item_image[i] for i in fit_rows],
        modalities={n: dataclasses.replace(m, features=m.features[fit_rows], present=m.present[fit_rows])
                    for n, m in dataset.modalities.items()},
        user=np.zeros(0, np.int64), item=np.zeros(0, np.int64), timestamp=np.zeros(0, np.int64),
        split=np.zeros(0, np.int8),
    )  # fmt: skip
    encoder, _ = fit_ridge_map(view, item_vectors[fit_rows], holdout=0.1)
    return encoder_output(encoder, dataset)


def evaluate_methods(spaces: Spaces, queries: np.ndarray, judge: Judge, *, alphas: Mapping[str, float]) -> dict[str, Any]:
    """Figures of every candidate: the four spaces, the chosen blends and every popularity correction."""
    methods: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        name: spaces.scorer(name) for name in ("inner_product", "cosine", "content", "encoded")
    }
    for space, alpha in alphas.items():
        methods[f"blend-{space}"] = spaces.scorer(f"blend-{space}", alpha)
    for name, (method, parameter) in corrections().items():
        methods[name] = spaces.scorer(method, parameter)
    return {name: judge.figures(queries, top_neighbours(score(queries), queries)) for name, score in methods.items()}


def choose_correction(baseline: Mapping[str, float], grid: Mapping[str, Mapping[str, float]],
                      popularity_cap: float) -> tuple[list[str], str | None]:
    """(admissible names, the chosen one or None): admissible = genre agreement at least ``baseline``'s and
    neighbour popularity at most ``popularity_cap``; chosen = the highest co-like rate among them, the first in
    ``grid``'s order on equal rates."""
    admissible = [name for name, f in grid.items() if f["genre_agreement@10"] >= baseline["genre_agreement@10"]
                  and f["neighbour_popularity"] <= popularity_cap]  # fmt: skip
    order = list(grid)
    chosen = max(admissible, key=lambda name: (grid[name]["co_like_rate@10"], -order.index(name)), default=None)
    return admissible, chosen


def select_correction(spaces: Spaces, queries: np.ndarray, judge: Judge) -> dict[str, Any]:
    """The declared rule, on validation: among the corrections whose genre agreement is at least the inner
    product's and whose neighbours' mean popularity is at most ``POPULARITY_CAP`` × the catalogue's, the one with
    the highest co-like rate (equal rates: the first in :func:`corrections`' order). None if none is admissible."""
    baseline = judge.figures(queries, top_neighbours(spaces.scorer("inner_product")(queries), queries))
    grid = {name: judge.figures(queries, top_neighbours(spaces.scorer(method, parameter)(queries), queries))
            for name, (method, parameter) in corrections().items()}  # fmt: skip
    admissible, chosen = choose_correction(baseline, grid, POPULARITY_CAP * judge.catalogue_popularity)
    return {"rule": f"highest co_like_rate@10 on validation among corrections with genre_agreement@10 >= the inner "
                    f"product's and neighbour_popularity <= {POPULARITY_CAP:g} x catalogue", "inner_product": baseline,
            "grid": grid, "admissible": admissible, "chosen": chosen}  # fmt: skip


def goal(report: Mapping[str, Any]) -> dict[str, Any]:
    """Whether the chosen correction beats the inner product on test genre agreement AND co-like rate, for trained
    AND ingested items, with neighbours at most ``POPULARITY_CAP`` × as popular as the catalogue's average item."""
    chosen = report["correction"]["chosen"]
    cap = POPULARITY_CAP * report["catalogue_popularity"]
    parts: dict[str, dict[str, bool]] = {}
    for part in ("trained", "ingested"):
        figures = report[part]["figures"]
        mine, inner = (figures[chosen] if chosen else None), figures["inner_product"]
        parts[part] = {
            "genre_agreement_above_inner_product": bool(mine and mine["genre_agreement@10"] > inner["genre_agreement@10"]),
            "co_like_rate_above_inner_product": bool(mine and mine["co_like_rate@10"] > inner["co_like_rate@10"]),
            "neighbour_popularity_within_cap": bool(mine and mine["neighbour_popularity"] <= cap),
        }
    return {"chosen": chosen, "parts": parts, "met": all(all(p.values()) for p in parts.values())}


def select_alpha(spaces: Spaces, queries: np.ndarray, judge: Judge) -> dict[str, Any]:
    """For each content space, the α with the best validation co-like rate (ties: the larger α)."""
    grid: dict[str, dict[str, dict[str, float]]] = {}
    chosen: dict[str, float] = {}
    for space in CONTENT_SPACES:
        grid[space] = {str(a): judge.figures(queries, top_neighbours(spaces.scorer(f"blend-{space}", a)(queries), queries))
                       for a in ALPHAS}  # fmt: skip
        chosen[space] = max(ALPHAS, key=lambda a: (grid[space][str(a)]["co_like_rate@10"], a))
    return {"metric": "co_like_rate@10 on validation interactions", "grid": grid, "chosen": chosen}


@dataclass
class EpochCount(Callback):
    """The epochs a run trained (its last epoch)."""

    epochs: int = 0

    def on_epoch_end(self, trainer: Any, epoch: int, loss: float) -> None:
        self.epochs = epoch


def train_vectors(dataset: InteractionDataset, directory: Path, model: str, *, preset_dataset: str,
                  train_settings: dict[str, str], seed: int,
                  runs_root: Path | None) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:  # fmt: skip
    """Train ``model`` with the presets of ``preset_dataset`` (early stopping or the epoch cap): its item vectors,
    its own content encoder's output for every item (:func:`native_encoded`; None for an ID model) and how the run
    went (epochs, stop reason, wall time)."""
    import torch

    from models.config import build_config
    from training.config import preset
    from training.fit.trainer import TrainConfig, train

    model_layer, train_layer = preset(preset_dataset, model)
    config = build_config(TrainConfig, train_layer, {"progress": False, "seed": seed, **train_settings})
    count = EpochCount()
    started = time.perf_counter()
    result = train(dataset, model, dataset_dir=directory, model_config=model_layer, train_config=config,
                   runs_root=runs_root, callbacks=[count])  # fmt: skip
    seconds = time.perf_counter() - started
    with torch.no_grad():
        result.model.eval()
        items = result.model.representations().items.float().cpu().numpy()
    info = {"run_dir": str(result.run_dir) if result.run_dir else None, "best_epoch": result.best_epoch,
            "epochs_run": count.epochs, "epoch_cap": config.epochs, "patience": config.patience,
            "eval_every": config.eval_every, "stopped_by": result.stopped_by,
            "valid_recall@20": result.valid.get("recall@20"), "test_recall@20": result.test.get("recall@20"),
            "train_seconds": round(seconds, 1), "seconds_per_epoch": round(seconds / max(count.epochs, 1), 2)}  # fmt: skip
    return items, native_encoded(result.model, dataset), info


@dataclass(frozen=True)
class ModelVectors:
    """Item vectors of the model on the usual split and of the model trained without the cold items, and each
    model's own content encoder's output for every item (None for an ID model: its bundle fits the ridge map)."""

    trained: np.ndarray
    trained_info: dict[str, Any]
    cold: np.ndarray
    cold_info: dict[str, Any]
    trained_encoded: np.ndarray | None = None
    cold_encoded: np.ndarray | None = None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {"trained": self.trained, "cold": self.cold,
                                  "info": np.array(json.dumps({"trained": self.trained_info, "cold": self.cold_info}))}  # fmt: skip
        arrays.update((name, array) for name, array in (("trained_encoded", self.trained_encoded),
                                                        ("cold_encoded", self.cold_encoded)) if array is not None)  # fmt: skip
        with path.open("wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> ModelVectors:
        with np.load(path) as f:
            info = json.loads(str(f["info"]))
            optional = {name: f[name] for name in ("trained_encoded", "cold_encoded") if name in f.files}
            return cls(trained=f["trained"], trained_info=info["trained"], cold=f["cold"], cold_info=info["cold"],
                       **optional)  # fmt: skip


def model_vectors(dataset: InteractionDataset, cold_dataset: InteractionDataset, directory: Path, model: str, *,
                  train_settings: dict[str, str], seed: int, run: Path | None, runs_root: Path | None,
                  vectors_file: Path | None) -> ModelVectors:  # fmt: skip
    """Both models' item vectors: read from ``vectors_file`` if it exists; else trained (the usual-split one loaded
    from ``run`` if given) and written to ``vectors_file`` if given."""
    import torch

    from training.runs import load_run

    if vectors_file is not None and vectors_file.exists():
        return ModelVectors.load(vectors_file)
    if run is not None:
        loaded = load_run(run)
        with torch.no_grad():
            loaded.model.eval()
            trained = loaded.model.representations().items.float().cpu().numpy()
        trained_encoded = native_encoded(loaded.model, loaded.dataset)  # the content it trained on, as its bundle
        trained_info: dict[str, Any] = {"run_dir": str(run), "best_epoch": loaded.metrics.get("best_epoch")}
    else:
        trained, trained_encoded, trained_info = train_vectors(
            dataset, directory, model, preset_dataset=dataset.name, train_settings=train_settings, seed=seed,
            runs_root=runs_root)  # fmt: skip
    cold, cold_encoded, cold_info = train_vectors(cold_dataset, directory, model, preset_dataset=dataset.name,
                                                  train_settings=train_settings, seed=seed, runs_root=None)  # fmt: skip
    vectors = ModelVectors(trained=trained, trained_info=trained_info, cold=cold, cold_info=cold_info,
                           trained_encoded=trained_encoded, cold_encoded=cold_encoded)  # fmt: skip
    if vectors_file is not None:
        vectors.save(vectors_file)
    return vectors


def training_popularity(dataset: InteractionDataset) -> np.ndarray:
    """(n_items,) training interactions of each item: the bundle's popularity."""
    return np.bincount(dataset.item[dataset.split == TRAIN], minlength=dataset.n_items).astype(np.float64)


def run_similarity(directory: Path, genres_of: Callable[[list[str]], list[frozenset[str]]], model: str, *,
                   train_settings: dict[str, str], seed: int, cold_share: float, run: Path | None,
                   runs_root: Path | None, vectors_file: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Train (or load ``run`` / ``vectors_file``), choose α and the popularity correction on validation, measure
    every candidate on trained and on cold items. ``genres_of(item_ids)`` gives each item's genres."""
    from training.experiments.cold_protocol import COLD, make_cold_split

    dataset = InteractionDataset.load(directory)
    if not dataset.modalities:
        raise ValueError(f"{dataset.name} has no content modalities")
    genres = genres_of(dataset.item_ids)
    popularity = np.bincount(dataset.item, minlength=dataset.n_items).astype(np.float64)
    content = content_space(dataset)
    all_rows = np.arange(dataset.n_items)
    held_out = make_cold_split(dataset, share=cold_share, seed=seed)  # the one cold-start protocol
    cold_dataset, cold = held_out.dataset, held_out.cold
    vectors = model_vectors(dataset, cold_dataset, directory, model, train_settings=train_settings, seed=seed, run=run,
                            runs_root=runs_root, vectors_file=vectors_file)  # fmt: skip

    # trained items: the model on the usual split; its bundle's encoder (the model's own, or the ridge map fitted on
    # every item, as the exporter fits it)
    trained_encoded = (vectors.trained_encoded if vectors.trained_encoded is not None
                       else ridge_encoded(dataset, vectors.trained, all_rows))  # fmt: skip
    spaces = Spaces(vectors=vectors.trained, encoded=trained_encoded, content=content,
                    popularity=training_popularity(dataset))  # fmt: skip
    queries = all_rows[np.bincount(dataset.item[dataset.split == TRAIN], minlength=dataset.n_items) > 0]
    valid_judge = Judge(genres, heldout_matrix(dataset, (VALID,)), popularity)
    selection = select_alpha(spaces, queries, valid_judge)
    correction = select_correction(spaces, queries, valid_judge)
    trained = evaluate_methods(spaces, queries, Judge(genres, heldout_matrix(dataset, (TEST,)), popularity),
                               alphas=selection["chosen"])  # fmt: skip

    # items held out of training, ingested from content only
    warm = np.setdiff1d(all_rows, cold)
    # the model trained without them: its own encoder (fitted on the items it trained on), or the ridge map on the warm
    encoded = vectors.cold_encoded if vectors.cold_encoded is not None else ridge_encoded(dataset, vectors.cold, warm)
    served = vectors.cold.copy()
    served[cold] = encoded[cold]  # what the service holds for an ingested item
    cold_spaces = Spaces(vectors=served, encoded=encoded, content=content, popularity=training_popularity(cold_dataset))
    cold_judge = Judge(genres, heldout_matrix(cold_dataset, (TEST, COLD)), popularity)
    ingested = evaluate_methods(cold_spaces, cold, cold_judge, alphas=selection["chosen"])
    report = {
        "dataset": dataset.name, "model": model, "seed": seed, "k": K,
        "catalogue_popularity": float(popularity.mean()),
        "item_encoder": "ridge-map" if vectors.cold_encoded is None else "native",
        "trained": {"model": vectors.trained_info, "figures": trained},
        "selection": selection, "correction": correction,
        "ingested": {"model": vectors.cold_info, "cold_share": cold_share, "cold_items": int(cold.size), "figures": ingested},
    }  # fmt: skip
    return {**report, "goal": goal(report)}


def label(report: Mapping[str, Any], name: str) -> str:
    """A candidate's name in the tables."""
    if name.startswith("blend-"):
        return f"{name} (α={report['selection']['chosen'][name.removeprefix('blend-')]})"
    method, _, value = name.partition("=")
    text = {"norm_exponent": f"norm exponent a={value}", "popularity_weight": f"cos + {value}·log(1+n)"}.get(method, name)
    return f"**{text} (chosen)**" if name == report["correction"]["chosen"] else text


def figures_table(report: Mapping[str, Any], figures: Mapping[str, Mapping[str, float]], extra: str = "",
                  marks: Mapping[str, str] | None = None) -> str:  # fmt: skip
    """Markdown rows of ``figures`` (name → figures), an optional last column ``extra`` filled from ``marks``."""
    head = (f"| similarity | genre agreement@10 | co-like rate@10 | co-like share@10 | neighbour popularity "
            f"(catalogue {report['catalogue_popularity']:.1f}) |")  # fmt: skip
    lines = [head + (f" {extra} |" if extra else ""), "|---|---|---|---|---|" + ("---|" if extra else "")]
    for name, f in figures.items():
        row = (f"| {label(report, name)} | {f['genre_agreement@10']:.3f} | {f['co_like_rate@10']:.3f} | "
               f"{f['co_like_share@10']:.4f} | {f['neighbour_popularity']:.1f} |")  # fmt: skip
        lines.append(row + (f" {(marks or {}).get(name, '')} |" if extra else ""))
    return "\n".join(lines)


def table(report: Mapping[str, Any], part: str) -> str:
    """``part``: "trained" or "ingested" (test figures), or "validation" (the correction's choice)."""
    if part != "validation":
        return figures_table(report, report[part]["figures"])
    correction = report["correction"]
    figures = {"inner_product": correction["inner_product"], **correction["grid"]}
    marks = {name: "yes" if name in correction["admissible"] else "no" for name in correction["grid"]}
    return figures_table(report, figures, extra="admissible", marks=marks)


def main(
    dataset: Annotated[str, typer.Option(help="Prepared dataset with MovieLens genres (ml100k-posters).")] = "ml100k-posters",
    model: Annotated[str, typer.Option(help="Model trained for the item vectors.")] = "lightgcn",
    run: Annotated[Path | None, typer.Option(help="A finished run on the usual split, instead of training one.")] = None,
    train_set: Annotated[list[str], typer.Option("--train", help="Trainer setting KEY=VALUE (default: the presets).")] = [],  # noqa: B006
    seed: Annotated[int, typer.Option(help="Seed of training and of the cold-item draw.")] = 2024,
    cold_share: Annotated[float, typer.Option(help="Share of items held out of training.")] = 0.1,
    vectors: Annotated[Path | None, typer.Option(help="npz of both models' item vectors: read if it exists, else "
                                                      "written after training.")] = None,  # fmt: skip
    out: Annotated[Path | None, typer.Option(help="JSON report (default docs/similarity-and-blending/similarity-<dataset>.json).")] = None,
    tables_only: Annotated[bool, typer.Option(help="Print the tables of the existing JSON report; measure nothing.")] = False,
) -> None:
    from training.cli import parse_assignments
    from training.settings import PROJECT_ROOT, default_paths

    paths = default_paths()
    path = out or PROJECT_ROOT / "docs" / "similarity-and-blending" / f"similarity-{dataset}.json"
    if tables_only:
        report = json.loads(path.read_text())
    else:
        report = run_similarity(paths.datasets / dataset, lambda ids: ml100k_genres(paths.data_root, ids), model,
                                train_settings=parse_assignments(train_set), seed=seed, cold_share=cold_share, run=run,
                                runs_root=paths.runs, vectors_file=vectors)  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(f"blend α chosen on validation: {report['selection']['chosen']}")
    typer.echo(f"popularity correction on validation ({report['correction']['rule']}):\n" + table(report, "validation"))
    typer.echo("trained items (test)\n" + table(report, "trained"))
    typer.echo(f"ingested items ({report['ingested']['cold_items']} held out of training)\n" + table(report, "ingested"))
    typer.echo(f"goal: {json.dumps(report['goal'])}")
    if not tables_only:
        typer.echo(f"wrote {path}")


if __name__ == "__main__":
    typer.run(main)
