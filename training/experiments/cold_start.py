"""Cold-start evaluation of a model's content encoder on items held out of training entirely.

A seeded share of the items that have interactions is made *cold*: every interaction of a cold item is taken out of
train, valid and test (split code ``COLD``), so cold items influence neither training nor model selection. The model
is trained on the rest with the usual trainer (selected on the warm validation split), then every cold item gets a
vector from the model's content encoder (its modality features only: what the service does for a new item), and
each user who interacted with a cold item is scored against the cold items only. Metrics are averaged over those
users (Recall/NDCG/... @K, nothing masked: no user saw a cold item in training).

    .venv/bin/mmrec cold-start --dataset ml100k-posters --model r2mr --model vbpr

writes ``docs/r2mr/cold-start-<dataset>.json`` (or ``--out``; models already in it for the same cold split are kept,
so models needing different trainer settings can be run one by one) and prints it. Nothing here is chosen on the cold
items: each model's configuration is its preset, its encoder is what ``content_encoder()`` defines (a ridge map for
ID models, as in the bundle).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from models.base import Recommender
from training.data.dataset import InteractionDataset
from training.export.ridge import content_inputs, fit_ridge_map
from training.fit.metrics import per_user_metrics

COLD = 3  # split code of a cold item's interactions: in no split the trainer or the evaluators read
COLD_TOPK = (10, 20, 50)


def cold_split(dataset: InteractionDataset, *, share: float, seed: int) -> tuple[InteractionDataset, np.ndarray]:
    """(the dataset with every interaction of the cold items moved to split COLD, the sorted cold item rows)."""
    items_with_interactions = np.unique(dataset.item)
    rng = np.random.default_rng(seed)
    n_cold = max(1, round(share * items_with_interactions.size))
    cold = np.sort(rng.choice(items_with_interactions, size=n_cold, replace=False))
    split = dataset.split.copy()
    split[np.isin(dataset.item, cold)] = COLD
    return dataclasses.replace(dataset, name=f"{dataset.name}-cold", split=split), cold


@torch.no_grad()
def cold_item_vectors(model: Recommender, dataset: InteractionDataset, cold: np.ndarray) -> tuple[torch.Tensor, str]:
    """(vectors (n_cold, d) from content alone, how they were made)."""
    model.eval()
    encoder = model.content_encoder()
    method = "native"
    if encoder is None:  # an ID model: the bundle's ridge map from content to trained item vectors
        reps = model.representations()
        warm = np.setdiff1d(np.arange(dataset.n_items), cold)
        warm_view = dataclasses.replace(dataset, item_ids=[dataset.item_ids[i] for i in warm],
                                        item_text=[dataset.item_text[i] for i in warm],
                                        item_image=[dataset.item_image[i] for i in warm],
                                        modalities={n: dataclasses.replace(m, features=m.features[warm],
                                                                            present=m.present[warm])
                                                    for n, m in dataset.modalities.items()},
                                        user=np.zeros(0, np.int64), item=np.zeros(0, np.int64),
                                        timestamp=np.zeros(0, np.int64), split=np.zeros(0, np.int8))  # fmt: skip
        encoder, _ = fit_ridge_map(warm_view, reps.items.detach().cpu().numpy()[warm], holdout=0.1)
        method = "ridge-map"
    encoder.eval()
    tensors: list[torch.Tensor] = []
    for _, features, mask in content_inputs(dataset):
        tensors += [torch.from_numpy(features[cold]), torch.from_numpy(mask[cold])]
    outputs = encoder(*tensors)
    vectors = outputs[0] if isinstance(outputs, tuple) else outputs
    return vectors.float(), method


@torch.no_grad()
def evaluate_cold(model: Recommender, dataset: InteractionDataset, cold: np.ndarray,
                  topk: tuple[int, ...] = COLD_TOPK) -> dict[str, Any]:  # fmt: skip
    """Rank the cold items (content encoder vectors) for every user who interacted with one (any split)."""
    model.eval()
    reps = model.representations()
    if reps.users is None:
        raise ValueError("cold-start evaluation needs a model with a user table")
    vectors, method = cold_item_vectors(model, dataset, cold)
    position = {int(item): row for row, item in enumerate(cold)}
    keep = np.isin(dataset.item, cold)
    pairs = np.unique(np.stack([dataset.user[keep], dataset.item[keep]], axis=1), axis=0)
    users = np.unique(pairs[:, 0])
    truth = np.zeros((users.size, cold.size), dtype=bool)
    truth[np.searchsorted(users, pairs[:, 0]), [position[int(i)] for i in pairs[:, 1]]] = True
    scores = reps.users.detach().cpu()[torch.from_numpy(users)] @ vectors.T  # (n_users, n_cold)
    k_max = min(max(topk), cold.size)
    top = scores.topk(k_max, dim=1).indices.numpy()
    hits = np.take_along_axis(truth, top, axis=1)
    per_user = per_user_metrics(hits, truth.sum(axis=1), tuple(k for k in topk if k <= k_max))
    return {"encoder": method, "n_cold_items": int(cold.size), "n_users": int(users.size),
            "metrics": {name: float(values.mean()) for name, values in per_user.items()}}  # fmt: skip


def run_cold_start(directory: Path, model_names: list[str], *, share: float, seed: int,
                   train_settings: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    from training.config import Overrides, compose
    from training.fit.trainer import train

    dataset = InteractionDataset.load(directory)
    cold_dataset, cold = cold_split(dataset, share=share, seed=seed)
    report: dict[str, Any] = {"dataset": dataset.name, "share": share, "split_seed": seed, "models": {}}
    for name in model_names:
        run = compose(dataset.name, name, Overrides(train={"progress": False, **train_settings}))
        started = time.perf_counter()
        result = train(cold_dataset, name, dataset_dir=directory, model_config=run.model_config,
                       train_config=run.train, runs_root=None)  # fmt: skip
        report["models"][name] = {
            "warm_valid_recall@20": result.valid.get("recall@20"),
            "warm_test_recall@20": result.test.get("recall@20"),
            "best_epoch": result.best_epoch,
            "train_seconds": round(time.perf_counter() - started, 1),
            "train_settings": train_settings,
            "cold": evaluate_cold(result.model, dataset, cold),
        }
    return report


def main(
    dataset: Annotated[str, typer.Option(help="Prepared dataset name (under $MMREC_HOME/datasets).")],
    model: Annotated[list[str], typer.Option(help="Model to train and evaluate (repeatable).")],
    share: Annotated[float, typer.Option(help="Share of items made cold.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the cold-item draw.")] = 2024,
    train_set: Annotated[list[str], typer.Option("--train", help="Trainer setting KEY=VALUE.")] = [],  # noqa: B006
    out: Annotated[Path | None, typer.Option(help="JSON report (default docs/r2mr/cold-start-<dataset>.json).")] = None,
) -> None:
    from training.config import parse_assignments
    from training.settings import PROJECT_ROOT, default_paths

    report = run_cold_start(default_paths().datasets / dataset, model, share=share, seed=seed,
                            train_settings=parse_assignments(train_set, option="--train"))  # fmt: skip
    path = out or PROJECT_ROOT / "docs" / "r2mr" / f"cold-start-{dataset}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():  # models evaluated before on the same cold split (other trainer settings) stay in the report
        previous = json.loads(path.read_text())
        if (previous.get("share"), previous.get("split_seed")) == (share, seed):
            report["models"] = {**previous.get("models", {}), **report["models"]}
    path.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(json.dumps(report, indent=2))


if __name__ == "__main__":
    typer.run(main)
