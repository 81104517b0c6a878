"""Replay: does blending a known user's recent events into their query rank held-out items better? (issue 14)

The service ranks a known user by their trained vector ``u``. With recorded events (item rows ``e``), three ways of
blending them in are measured, each with a weight ``w`` (0: the static vector):

- ``normalised``: the query ``u/|u| + w · m/|m|``, ``m`` the mean of the events' item vectors (unit parts: ``w``
  means the same whatever a bundle's vector norms);
- ``raw``: the query ``u + w · m``;
- ``cosine``: the score ``v_j · u/|u| + w · mean_e cos(v_e, v_j)``: the events' part by cosine, item-kNN style.

Protocol, on one trained model (LightGCN by default; the user vectors are trained on the train split only):
- choosing ``w`` (validation only): for every user with at least two validation items, a seeded random half of
  them is fed as events and the other half is ranked (training items and the fed events masked); ``w`` is the grid
  value with the best Recall@20 there;
- the replay (test): every user's validation items are fed as events, the test items are ranked (training and
  validation items masked, as the evaluator does), static (``w = 0``) against blended (the chosen ``w``).

    .venv/bin/python -m training.experiments.recent_events replay --dataset ml100k-posters --train epochs=40
    .venv/bin/python -m training.experiments.recent_events replay --dataset lfm2k --run RUN_DIR
    .venv/bin/python -m training.experiments.recent_events choose docs/similarity-and-blending/blending-{ml100k-posters,lfm2k}.json

``replay`` prints the tables and writes ``docs/similarity-and-blending/blending-<dataset>.json`` (or ``--out``);
``choose`` picks the service default across datasets (``choose_default``) into ``recent-events-weight.json``.
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

from training.data.dataset import TEST, TRAIN, VALID, InteractionDataset
from training.fit.metrics import per_user_metrics

Form = Literal["normalised", "raw", "cosine"]
FORMS: tuple[Form, ...] = ("normalised", "raw", "cosine")
WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
TOPK = (10, 20)
EPS = 1e-12


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.asarray(x / np.maximum(norms, EPS))


def blended_scores(user_vectors: np.ndarray, item_vectors: np.ndarray, events: Sequence[np.ndarray], weight: float,
                   *, form: Form = "normalised") -> np.ndarray:  # fmt: skip
    """(U, I) scores of every item for every user, their events (item rows ``events[u]``) blended in:

    - ``normalised``: ``v_j · (u/|u| + w m/|m|)``, ``m`` the mean of the event items' vectors;
    - ``raw``: ``v_j · (u + w m)``;
    - ``cosine``: ``v_j · u/|u| + w · mean_e cos(v_e, v_j)``: the events' part scored by cosine (item-kNN style).

    A user without events (or ``w = 0``) is scored by their vector as it is."""
    users = np.asarray(user_vectors, dtype=np.float64)
    items = np.asarray(item_vectors, dtype=np.float64)
    scores = users @ items.T
    if weight == 0.0:
        return scores
    unit_items = _unit(items)
    for u, rows in enumerate(events):
        if rows.size == 0:
            continue
        if form == "normalised":
            scores[u] = items @ (_unit(users[u]) + weight * _unit(items[rows].mean(axis=0)))
        elif form == "raw":
            scores[u] = items @ (users[u] + weight * items[rows].mean(axis=0))
        else:
            scores[u] = items @ _unit(users[u]) + weight * (unit_items @ unit_items[rows].mean(axis=0))
    return scores


def ranking_metrics(scores: np.ndarray, truth: sp.csr_matrix, exclude: sp.csr_matrix, users: np.ndarray,
                    topk: tuple[int, ...] = TOPK) -> dict[str, float]:  # fmt: skip
    """Full ranking of every item for ``users`` (rows of ``scores`` (U, I), ``truth`` and ``exclude``), excluded
    items masked; Recall and NDCG @k averaged over the users, as the evaluator computes them."""
    scores = np.array(scores[users], dtype=np.float64)  # (B, I)
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
    test_grid: dict[str, dict[str, dict[str, float]]] = {}
    test: dict[str, dict[str, Any]] = {}
    chosen: dict[str, float] = {}
    for form in FORMS:
        grid[form], test_grid[form] = {}, {}
        for weight in weights:
            scores = blended_scores(user_vectors, item_vectors, select_events, weight, form=form)
            grid[form][str(weight)] = ranking_metrics(scores, splits.select_truth, select_exclude, select_users)
            # reported for every weight (the joint default of `choose` is read here), never used to choose
            scores = blended_scores(user_vectors, item_vectors, test_events, weight, form=form)
            test_grid[form][str(weight)] = ranking_metrics(scores, splits.test_truth, test_exclude, test_users)
        chosen[form] = max(weights, key=lambda w: (grid[form][str(w)]["recall@20"], -w))
        test[form] = {"weight": chosen[form], **test_grid[form][str(chosen[form])]}
    static = ranking_metrics(blended_scores(user_vectors, item_vectors, test_events, 0.0), splits.test_truth,
                             test_exclude, test_users)  # fmt: skip
    return {
        "selection": {"users": int(select_users.size), "events_per_user": float(np.diff(splits.select_events.indptr)[select_users].mean()),
                      "metric": "recall@20", "grid": grid, "chosen": chosen},  # fmt: skip
        "test": {"users": int(test_users.size), "events_per_user": float(np.diff(splits.test_events.indptr)[test_users].mean()),
                 "static": static, **test, "grid": test_grid},  # fmt: skip
    }


def choose_default(reports: Sequence[dict[str, Any]], form: Form) -> dict[str, Any]:
    """One weight for every bundle: the grid weight with the best mean relative gain in VALIDATION Recall@20 over
    the static vector across the datasets' reports; then each dataset's test figures at that weight."""
    def gain(report: dict[str, Any], weight: str) -> float:
        grid = report["selection"]["grid"][form]
        return float(grid[weight]["recall@20"] / grid["0.0"]["recall@20"] - 1.0)

    weights = list(reports[0]["selection"]["grid"][form])
    best = max(weights, key=lambda w: (float(np.mean([gain(r, w) for r in reports])), -float(w)))
    return {
        "form": form, "weight": float(best), "criterion": "mean relative gain in validation recall@20",
        "validation_gain": {r["dataset"]: gain(r, best) for r in reports},
        "test": {r["dataset"]: {"static": r["test"]["static"], "blended": r["test"]["grid"][form][best]} for r in reports},
    }


def trained_vectors(dataset_name: str, model: str, *, run: Path | None, train_settings: dict[str, str],
                    seed: int) -> tuple[InteractionDataset, np.ndarray, np.ndarray, dict[str, Any]]:  # fmt: skip
    """(dataset, user vectors, item vectors, what was trained): from ``run`` or from a fresh run saved under
    ``$MMREC_HOME/runs`` (the trainer's preset for the dataset, then ``train_settings``)."""
    import torch

    from models.config import build_config
    from training.config import preset
    from training.fit.trainer import TrainConfig, train
    from training.runs import load_run
    from training.settings import default_paths

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


app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.command("replay")
def replay_command(
    dataset: Annotated[str, typer.Option(help="Prepared dataset name (under $MMREC_HOME/datasets).")],
    model: Annotated[str, typer.Option(help="Model with a user table, trained unless --run is given.")] = "lightgcn",
    run: Annotated[Path | None, typer.Option(help="A finished run directory to use instead of training.")] = None,
    train_set: Annotated[list[str], typer.Option("--train", help="Trainer setting KEY=VALUE, e.g. epochs=60.")] = [],  # noqa: B006
    seed: Annotated[int, typer.Option(help="Seed of training and of the validation halves.")] = 2024,
    out: Annotated[Path | None, typer.Option(help="JSON report (default docs/similarity-and-blending/blending-<dataset>.json).")] = None,
) -> None:
    """Train (or load --run), choose each form's weight on validation, replay the test split."""
    from training.cli import parse_assignments
    from training.settings import PROJECT_ROOT

    data, users, items, info = trained_vectors(dataset, model, run=run, train_settings=parse_assignments(train_set), seed=seed)
    report = {"dataset": data.name, "model": model, "trained": info, "seed": seed, **replay(users, items, data, seed=seed)}
    path = out or PROJECT_ROOT / "docs" / "similarity-and-blending" / f"blending-{data.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo("validation Recall@20 by weight (the selection grid):")
    for form, grid in report["selection"]["grid"].items():
        typer.echo(f"  {form:>10}: " + "  ".join(f"{w}={m['recall@20']:.4f}" for w, m in grid.items()))
    typer.echo(table(report))
    typer.echo(f"wrote {path}")


@app.command("choose")
def choose_command(
    reports: Annotated[list[Path], typer.Argument(help="Replay reports (JSON) of the datasets the default must serve.")],
    form: Annotated[str, typer.Option(help=f"One of {', '.join(FORMS)}.")] = "cosine",
    out: Annotated[Path | None, typer.Option(help="JSON of the choice (default docs/similarity-and-blending/recent-events-weight.json).")] = None,
) -> None:
    """The service default: one weight across datasets, chosen on validation (see choose_default)."""
    from training.settings import PROJECT_ROOT

    if form not in FORMS:
        raise typer.BadParameter(f"--form {form!r}: expected one of {', '.join(FORMS)}")
    choice = choose_default([json.loads(p.read_text()) for p in reports], form)
    path = out or PROJECT_ROOT / "docs" / "similarity-and-blending" / "recent-events-weight.json"
    path.write_text(json.dumps(choice, indent=2) + "\n")
    typer.echo(f"{form}: weight {choice['weight']} (validation gain " +
               ", ".join(f"{d} {g:+.2%}" for d, g in choice["validation_gain"].items()) + ")")  # fmt: skip
    typer.echo("| dataset | static Recall@20 | static NDCG@20 | blended Recall@20 | blended NDCG@20 |\n|---|---|---|---|---|")
    for name, t in choice["test"].items():
        typer.echo(f"| {name} | {t['static']['recall@20']:.4f} | {t['static']['ndcg@20']:.4f} | "
                   f"{t['blended']['recall@20']:.4f} | {t['blended']['ndcg@20']:.4f} |")  # fmt: skip
    typer.echo(f"wrote {path}")


if __name__ == "__main__":
    app()
