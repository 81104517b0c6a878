"""Regenerate ``docs/results.md`` from run directories and the committed run ledger.

One table per dataset, one row per model variant. Where a model was run at several grid points, the grid point
with the best mean VALIDATION Recall@20 is reported (its test numbers; test never chooses anything). Where that
grid point was run with several seeds, the row shows mean ± standard deviation over seeds.

Run directories live under ``$MMREC_HOME/runs`` (not in git). So that the tables survive a fresh checkout, every
run read is also recorded in the **run ledger** ``docs/results-runs.jsonl`` (one JSON object per run: its
configuration, seed and every validation and test metric), and the tables are rendered from the ledger; a run
directory present again replaces its ledger line. Rows whose run directories were lost before the ledger existed
are kept from ``docs/results-recovered.json`` (the table cells as last generated, marked † in the tables) until
runs of the same dataset and row label are recorded.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from training.runs import has_results, read_config, read_metrics, run_directories

COLUMNS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
SEQUENTIAL_COLUMNS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20", "mrr@10", "mrr@20", "hit@10", "hit@20")
SELECT = "recall@20"


@dataclass(frozen=True)
class RunRecord:
    dataset: str
    model: str
    variant: str
    config_key: str
    seed: int
    valid: dict[str, float]
    test: dict[str, float]
    best_epoch: int
    wall_seconds: float
    seconds_per_epoch: float
    sequential: bool
    path: Path


def _train_defaults() -> dict[str, Any]:
    from models.config import config_to_dict
    from training.fit.trainer import TrainConfig

    return config_to_dict(TrainConfig())


def ledger_entry(run_dir: Path, runs_root: Path) -> dict[str, Any] | None:
    """The ledger line of one run directory (None while it has no metrics.json or config.json yet, and for a run
    trained on deliberately damaged content: those are the corruption benchmark's, docs/modality-quality.md)."""
    if not has_results(run_dir):
        return None
    metrics, config = read_metrics(run_dir), read_config(run_dir)
    if config.get("corruption"):
        return None
    return {
        "run": run_dir.relative_to(runs_root).as_posix(),
        "dataset": metrics["dataset"],
        "model": metrics["model"],
        "variant": metrics.get("tag", "") or "",
        "seed": int(metrics["seed"]),
        "model_config": config["model_config"],
        "train_config": {k: v for k, v in config["train_config"].items() if k not in ("progress", "device")},
        "split": config["dataset"]["split"],
        "valid": metrics["valid"],
        "test": metrics["test"],
        "best_epoch": int(metrics["best_epoch"]),
        "wall_seconds": float(metrics["wall_seconds"]),
        "seconds_per_epoch": float(metrics.get("seconds_per_epoch", 0.0)),
    }


def initialised_from(init_from: str) -> str:
    """A fine-tuning run's starting point as a grid-point value: the source run's model and variant, without its
    time stamp and seed (so seed s fine-tuned from seed s's pre-training run is one grid point over seeds)."""
    path = PurePosixPath(init_from)
    variant = re.sub(r"^\d{8}T\d{6}Z-s-?\d+-?", "", path.name)
    return f"{path.parent.name}:{variant or 'untagged'}"


def record_of(entry: dict[str, Any], path: Path) -> RunRecord:
    # a run written before a trainer setting existed ran with that setting's default: same grid point
    train = {**_train_defaults(), **entry["train_config"]}
    train = {k: v for k, v in train.items() if k not in ("seed", "progress", "device")}
    if train.get("init_from"):
        train["init_from"] = initialised_from(str(train["init_from"]))
    return RunRecord(
        dataset=entry["dataset"],
        model=entry["model"],
        variant=entry["variant"],
        config_key=json.dumps([entry["model_config"], train], sort_keys=True),
        seed=entry["seed"],
        valid=entry["valid"],
        test=entry["test"],
        best_epoch=entry["best_epoch"],
        wall_seconds=entry["wall_seconds"],
        seconds_per_epoch=entry["seconds_per_epoch"],
        sequential="seq" in entry["split"] or "loo" in entry["split"],
        path=path,
    )


def scan_runs(runs_root: Path) -> dict[str, dict[str, Any]]:
    """Ledger lines of every finished run under ``runs_root``, by run name (``dataset/model/run``)."""
    entries = {}
    for run_dir in run_directories(runs_root):
        entry = ledger_entry(run_dir, runs_root)
        if entry is not None:
            entries[entry["run"]] = entry
    return entries


def read_runs(runs_root: Path) -> list[RunRecord]:
    return [record_of(e, runs_root / name) for name, e in scan_runs(runs_root).items()]


def read_ledger(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    entries = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON object ({exc.msg})") from exc
            entries[entry["run"]] = entry
    return entries


def update_ledger(path: Path, runs_root: Path) -> list[RunRecord]:
    """Record every run under ``runs_root`` in the ledger (a run present again replaces its line); all records."""
    entries = {**read_ledger(path), **scan_runs(runs_root)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(entries[name], sort_keys=True) + "\n" for name in sorted(entries)))
    return [record_of(e, runs_root / name) for name, e in sorted(entries.items())]


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    if any(math.isnan(v) for v in values):  # a metric some runs lack (statistics.stdev fails on nan)
        return "nan"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def select_rows(records: Iterable[RunRecord]) -> dict[str, list[tuple[str, list[RunRecord], int]]]:
    """dataset → [(row label, runs of the chosen grid point, number of grid points tried)]."""
    grouped: dict[tuple[str, str, str], dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        grouped[(r.dataset, r.model, r.variant)][r.config_key].append(r)
    tables: dict[str, list[tuple[str, list[RunRecord], int]]] = defaultdict(list)
    for (dataset, model, variant), by_config in sorted(grouped.items()):
        best_runs = max(by_config.values(), key=lambda runs: statistics.mean(r.valid.get(SELECT, 0.0) for r in runs))
        label = model + (f" ({variant})" if variant else "")
        tables[dataset].append((label, sorted(best_runs, key=lambda r: r.seed), len(by_config)))
    return tables


@dataclass(frozen=True)
class RecoveredTable:
    """Rows of one dataset's table kept from before the run ledger: label → the row's cells after the label."""

    sequential: bool
    rows: dict[str, list[str]]


def read_recovered(path: Path | None) -> dict[str, RecoveredTable]:
    if path is None or not path.exists():
        return {}
    raw = json.loads(path.read_text())
    return {dataset: RecoveredTable(sequential=bool(t["sequential"]), rows={r[0]: r[1:] for r in t["rows"]})
            for dataset, t in raw["datasets"].items()}  # fmt: skip


RECOVERED_MARK = " †"


def render(records: list[RunRecord], notes: dict[str, str] | None = None,
           recovered: dict[str, RecoveredTable] | None = None) -> str:  # fmt: skip
    notes, recovered = notes or {}, recovered or {}
    lines = [
        "# Results",
        "",
        "Generated by `mmrec results` from the run ledger `docs/results-runs.jsonl` (every run recorded from",
        "`$MMREC_HOME/runs`); do not edit by hand (notes live in `docs/results-notes.json`). Full ranking over all items,",
        "training items masked (validation items too at test time). Each row is the grid point with the best mean",
        "**validation** Recall@20; the numbers are **test** metrics at that run's best validation epoch. Rows with ± are",
        "mean ± std over the seeds listed. New items (every model on the same held-out items, one protocol):",
        "[cold-start.md](cold-start.md).",
        "",
    ]
    if any(t.rows for t in recovered.values()):
        lines += [
            f"Rows marked{RECOVERED_MARK} come from runs made before the ledger existed, whose run directories are gone: their",
            "cells are kept as last generated (`docs/results-recovered.json`) and a row is replaced once runs with its",
            "dataset and label are recorded.",
            "",
        ]
    tables = select_rows(records)
    for dataset in sorted(set(tables) | set(recovered)):
        rows = tables.get(dataset, [])
        kept = recovered.get(dataset, RecoveredTable(sequential=False, rows={}))
        sequential = any(r.sequential for _, runs, _ in rows for r in runs) or kept.sequential
        columns = SEQUENTIAL_COLUMNS if sequential else COLUMNS
        lines += [f"## {dataset}", ""]
        header = ["Model", *[c.replace("recall", "Recall").replace("ndcg", "NDCG").replace("mrr", "MRR")
                             .replace("hit", "Hit") for c in columns],
                  "valid Recall@20", "best epoch", "wall time", "s/epoch", "seed", "grid points"]  # fmt: skip
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        body: dict[str, list[str]] = {}
        for label, runs, n_grid in rows:
            cells = [label, *[_cell([r.test.get(c, float("nan")) for r in runs]) for c in columns]]
            cells.append(_cell([r.valid.get(SELECT, float("nan")) for r in runs]))
            cells.append("/".join(str(r.best_epoch) for r in runs))
            cells.append(f"{statistics.mean(r.wall_seconds for r in runs):.0f} s")
            cells.append(f"{statistics.mean(r.seconds_per_epoch for r in runs):.2f}")
            cells.append(",".join(str(r.seed) for r in runs))
            cells.append(str(n_grid))
            body[label] = cells
        for label, cells in kept.rows.items():
            if label not in body:
                if len(cells) != len(header) - 1:
                    raise ValueError(f"recovered row {dataset}/{label}: {len(cells) + 1} cells, the table has {len(header)}")
                body[label] = [label + RECOVERED_MARK, *cells]
        lines += ["| " + " | ".join(body[label]) + " |" for label in sorted(body)]
        if dataset in notes:
            lines += ["", notes[dataset]]
        lines.append("")
    return "\n".join(lines)


def write_results(runs_root: Path, out: Path, notes_path: Path | None = None, *, ledger_path: Path | None = None,
                  recovered_path: Path | None = None) -> str:  # fmt: skip
    """Record the runs under ``runs_root`` in the ledger (when given) and write the tables to ``out``."""
    notes: dict[str, Any] = {}
    if notes_path is not None and notes_path.exists():
        notes = json.loads(notes_path.read_text())
    records = read_runs(runs_root) if ledger_path is None else update_ledger(ledger_path, runs_root)
    text = render(records, {k: v if isinstance(v, str) else "\n".join(v) for k, v in notes.items()},
                  read_recovered(recovered_path))  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text
