"""Replay: does blending a known user's recent events into their vector rank held-out items better? (issue 14)

The service ranks a known user by their trained vector ``u``; with recorded events it ranks by

    q = u / |u| + w · m / |m|,   m = mean of the events' item vectors

(``service/blending.py``; ``w`` is the service setting ``recent_events_weight``). Both parts are unit length, so
``w`` means the same for every bundle kind whatever its vector norms: 0 is the static vector, large ``w`` ranks by
the events alone (the unknown-user "history" strategy). The raw form ``q = u + w · m`` is measured next to it.

Protocol, on one trained model (LightGCN by default; the user vectors are trained on the train split only):
- choosing ``w`` (validation only): for every user with at least two validation items, a seeded random half of
  them is fed as events and the other half is ranked (training items and the fed events masked); ``w`` is the grid
  value with the best Recall@20 there;
- the replay (test): every user's validation items are fed as events, the test items are ranked (training and
  validation items masked, as the evaluator does), static (``w = 0``) against blended (the chosen ``w``).

    .venv/bin/python -m training.experiments.recent_events --dataset ml100k-posters --train epochs=60
    .venv/bin/python -m training.experiments.recent_events --dataset lfm2k --run RUN_DIR

prints the tables and writes ``docs/similarity-and-blending/blending-<dataset>.json`` (or ``--out``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import scipy.sparse as sp
import typer

from training.dataset import TEST, TRAIN, VALID, InteractionDataset
from training.metrics import per_user_metrics

Form = Literal["normalised", "raw"]
FORMS: tuple[Form, ...] = ("normalised", "raw")
WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
TOPK = (10, 20)
EPS = 1e-12


def blended_queries(user_vectors: np.ndarray, item_vectors: np.ndarray, events: Sequence[np.ndarray], weight: float,
                    *, form: Form = "normalised") -> np.ndarray:  # fmt: skip
    """(U, d) queries: each user's vector blended with the mean vector of their event items (rows ``events[u]``;
    a user without events keeps their vector)."""
    queries = np.asarray(user_vectors, dtype=np.float64).copy()
    if weight == 0.0:
        return queries
    for u, rows in enumerate(events):
        if rows.size == 0:
            continue
        mean = item_vectors[rows].astype(np.float64).mean(axis=0)
        if form == "normalised":
            queries[u] = queries[u] / (np.linalg.norm(queries[u]) + EPS) + weight * mean / (np.linalg.norm(mean) + EPS)
        else:
            queries[u] = queries[u] + weight * mean
    return queries


def ranking_metrics(queries: np.ndarray, item_vectors: np.ndarray, truth: sp.csr_matrix, exclude: sp.csr_matrix,
                    users: np.ndarray, topk: tuple[int, ...] = TOPK) -> dict[str, float]:  # fmt: skip
    """Full ranking of every item for ``users`` (rows of ``queries``, ``truth`` and ``exclude``), excluded items
    masked; metrics averaged over the users (Recall, NDCG, ... @k as the evaluator computes them)."""
    scores = queries[users] @ item_vectors.T.astype(np.float64)  # (B, I)
    masked = exclude[users].tocoo()
    scores[masked.row, masked.col] = -np.inf
    k_max = max(topk)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k_max]
    relevant = truth[users]
    hits = np.take_along_axis(relevant.toarray() > 0, top, axis=1)
    per_user = per_user_metrics(hits, np.diff(relevant.indptr), topk)
    return {name: float(values.mean()) for name, values in per_user.items() if name.split("@")[0] in ("recall", "ndcg")}


@dataclass(frozen=True)
class ReplaySplits:
    """What each arm of the replay feeds and ranks, as (n_users, n_items) binary matrices."""

    select_events: sp.csr_matrix  # half of each user's validation items (users with at least two)
    select_truth: sp.csr_matrix  # the other half
    test_events: sp.csr_matrix  # every validation item
    test_truth: sp.csr_matrix
    train: sp.csr_matrix


def replay_splits(dataset: InteractionDataset, *, seed: int) -> ReplaySplits:
    valid = dataset.matrix(VALID).tocsr()
    rng = np.random.default_rng(seed)
    fed_rows: list[int] = []
    fed_cols: list[int] = []
    for u in range(dataset.n_users):
        items = valid.indices[valid.indptr[u] : valid.indptr[u + 1]]
        if items.size >= 2:
            fed = rng.choice(items, size=items.size // 2, replace=False)
            fed_rows += [u] * fed.size
            fed_cols += fed.tolist()
    fed_matrix = sp.csr_matrix((np.ones(len(fed_rows), np.float32), (fed_rows, fed_cols)), shape=valid.shape)
    held = (valid - fed_matrix.multiply(valid)).tocsr()
    held.eliminate_zeros()
    held_users = np.flatnonzero(np.diff(fed_matrix.indptr) > 0)
    keep = sp.diags(np.isin(np.arange(dataset.n_users), held_users).astype(np.float32))
    return ReplaySplits(
        select_events=fed_matrix,
        select_truth=(keep @ held).tocsr(),
        test_events=valid,
        test_truth=dataset.matrix(TEST).tocsr(),
        train=dataset.matrix(TRAIN).tocsr(),
    )


def rows_per_user(matrix: sp.csr_matrix) -> list[np.ndarray]:
    return [matrix.indices[matrix.indptr[u] : matrix.indptr[u + 1]].astype(np.int64) for u in range(matrix.shape[0])]


def replay(user_vectors: np.ndarray, item_vectors: np.ndarray, dataset: InteractionDataset, *, seed: int = 2024,
           weights: Sequence[float] = WEIGHTS) -> dict[str, Any]:  # fmt: skip
    """The selection grid on validation, then the test replay at the chosen weight of each form."""
    splits = replay_splits(dataset, seed=seed)
    select_users = np.flatnonzero(np.diff(splits.select_truth.indptr) > 0)
    test_users = np.flatnonzero(np.diff(splits.test_truth.indptr) > 0)
    if select_users.size == 0 or test_users.size == 0:
        raise ValueError(f"{dataset.name}: no user has two validation items (to choose the weight) or a test item")
    select_events = rows_per_user(splits.select_events)
    test_events = rows_per_user(splits.test_events)
    select_exclude = (splits.train + splits.select_events).tocsr()
    test_exclude = (splits.train + splits.test_events).tocsr()
    grid: dict[str, dict[str, dict[str, float]]] = {}
    test: dict[str, dict[str, Any]] = {}
    chosen: dict[str, float] = {}
    for form in FORMS:
        grid[form] = {}
        for weight in weights:
            queries = blended_queries(user_vectors, item_vectors, select_events, weight, form=form)
            grid[form][str(weight)] = ranking_metrics(queries, item_vectors, splits.select_truth, select_exclude, select_users)
        chosen[form] = max(weights, key=lambda w: (grid[form][str(w)]["recall@20"], -w))
        queries = blended_queries(user_vectors, item_vectors, test_events, chosen[form], form=form)
        test[form] = {"weight": chosen[form], **ranking_metrics(queries, item_vectors, splits.test_truth, test_exclude, test_users)}
    static = ranking_metrics(np.asarray(user_vectors, np.float64), item_vectors, splits.test_truth, test_exclude, test_users)
    return {
        "selection": {"users": int(select_users.size), "events_per_user": float(np.diff(splits.select_events.indptr)[select_users].mean()),
                      "metric": "recall@20", "grid": grid, "chosen": chosen},  # fmt: skip
        "test": {"users": int(test_users.size), "events_per_user": float(np.diff(splits.test_events.indptr)[test_users].mean()),
                 "static": static, **test},  # fmt: skip
    }


def trained_vectors(dataset_name: str, model: str, *, run: Path | None, train_settings: dict[str, str],
                    seed: int) -> tuple[InteractionDataset, np.ndarray, np.ndarray, dict[str, Any]]:  # fmt: skip
    """(dataset, user vectors, item vectors, what was trained): from ``run`` or from a fresh run saved under
    ``$MMREC_HOME/runs`` (the trainer's preset for the dataset, then ``train_settings``)."""
    import torch

    from models.config import build_config
    from training.presets import preset
    from training.runs import load_run
    from training.settings import default_paths
    from training.trainer import TrainConfig, train

    if run is not None:
        loaded = load_run(run)
        dataset, recommender, info = loaded.dataset, loaded.model, {"run_dir": str(run), "best_epoch": loaded.metrics.get("best_epoch"),
                                                                    "train_config": loaded.config.get("train_config")}  # fmt: skip
    else:
        paths = default_paths()
        directory = paths.datasets / dataset_name
        dataset = InteractionDataset.load(directory)
        model_layer, train_layer = preset(dataset.name, model)
        config = build_config(TrainConfig, train_layer, {"progress": False, "seed": seed, **train_settings})
        started = time.perf_counter()
        result = train(dataset, model, dataset_dir=directory, model_config=model_layer, train_config=config,
                       runs_root=paths.runs)  # fmt: skip
        recommender = result.model
        info = {"run_dir": str(result.run_dir), "best_epoch": result.best_epoch, "train_settings": train_settings,
                "train_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    with torch.no_grad():
        recommender.eval()
        reps = recommender.representations()
    if reps.users is None:
        raise ValueError(f"{model}: blending needs a model with a user table (sequence models read events already)")
    return dataset, reps.users.float().cpu().numpy(), reps.items.float().cpu().numpy(), info


def table(report: dict[str, Any]) -> str:
    test = report["test"]
    lines = [f"{report['dataset']} ({report['model']}, {test['users']} test users, "
             f"{test['events_per_user']:.1f} events each)", "| query | weight | Recall@20 | NDCG@20 |", "|---|---|---|---|",
             f"| static user vector | 0 | {test['static']['recall@20']:.4f} | {test['static']['ndcg@20']:.4f} |"]  # fmt: skip
    for form in FORMS:
        lines.append(f"| blended ({form}) | {test[form]['weight']} | {test[form]['recall@20']:.4f} | {test[form]['ndcg@20']:.4f} |")
    return "\n".join(lines)


def main(
    dataset: Annotated[str, typer.Option(help="Prepared dataset name (under $MMREC_HOME/datasets).")],
    model: Annotated[str, typer.Option(help="Model with a user table, trained unless --run is given.")] = "lightgcn",
    run: Annotated[Path | None, typer.Option(help="A finished run directory to use instead of training.")] = None,
    train_set: Annotated[list[str], typer.Option("--train", help="Trainer setting KEY=VALUE, e.g. epochs=60.")] = [],  # noqa: B006
    seed: Annotated[int, typer.Option(help="Seed of training and of the validation halves.")] = 2024,
    out: Annotated[Path | None, typer.Option(help="JSON report (default docs/similarity-and-blending/blending-<dataset>.json).")] = None,
) -> None:
    from training.cli import parse_assignments
    from training.settings import PROJECT_ROOT

    data, users, items, info = trained_vectors(dataset, model, run=run, train_settings=parse_assignments(train_set), seed=seed)
    report = {"dataset": data.name, "model": model, "trained": info, "seed": seed, **replay(users, items, data, seed=seed)}
    path = out or PROJECT_ROOT / "docs" / "similarity-and-blending" / f"blending-{data.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(json.dumps({"selection": report["selection"]["chosen"], "grid_normalised": {
        w: round(m["recall@20"], 4) for w, m in report["selection"]["grid"]["normalised"].items()}}, indent=2))  # fmt: skip
    typer.echo(table(report))
    typer.echo(f"wrote {path}")


if __name__ == "__main__":
    typer.run(main)
