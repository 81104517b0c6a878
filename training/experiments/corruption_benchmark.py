"""The corruption benchmark (``mmrec corrupt``, docs/modality-quality.md): datasets × kinds × fractions × models ×
seeds, each cell one training run on item content damaged by ``training/data/corruption.py``.

The protocol is the clean rows' (docs/results.md): each model's preset (``training/presets.toml``), selection on
validation Recall@20, test metrics at the best validation epoch; R2MR with scripts/run-r2mr.sh's epoch caps. The
corruption seed of a cell is its training seed: seed s damages the same items for every model, and the seeds vary
the draw as well as the initialisation. p = 0 is the clean run, shared by the three kinds; LightGCN reads no
content, so its one clean run per seed is its row at every kind and p (the floor content must not push below).

Resumable: a cell whose composed configuration (model, tag, model and trainer settings, corruption) matches a
finished run directory under the runs root, or a run already recorded in the ledger
``docs/modality-quality/<dataset>.json``, is not trained again. The ledger keeps each run's metrics and its
reviewer detection results, so the report survives the run directories; it is rewritten after every run, merged
with what other processes recorded meanwhile (``--jobs N`` workers, or disjoint slices run side by side).
"""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.config import build_config, config_to_dict
from training import LOG_FORMAT
from training.config import (
    CorruptionConfig,
    Overrides,
    RunConfig,
    TrainConfig,
    compose,
    model_config_class,
    reads_content,
)
from training.data.corruption import CorruptedContent, corrupt_content
from training.data.dataset import InteractionDataset
from training.experiments.damage_detectors import (
    REVIEWER_RAW,
    detection_auroc,
    group_means,
    reviewer_detector_scores,
    simple_detector_scores,
)
from training.runs import has_results, read_config, read_metrics

DATASETS = ("ml100k-posters", "lfm2k")
KINDS = ("missing", "swapped", "noise")
FRACTIONS = (0.0, 0.2, 0.4)
SEEDS = (2024, 1, 2)
LEDGER_FORMAT = 1


@dataclass(frozen=True)
class BenchmarkModel:
    """A row of the benchmark: a registered model, its variant tag (ablations) and the settings that make it."""

    label: str
    model: str
    tag: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)


MODELS = (
    BenchmarkModel("r2mr", "r2mr"),
    BenchmarkModel("r2mr-no-reviewer", "r2mr", "no-reviewer", {"reviewer": False}),
    BenchmarkModel("r2mr-no-rewriter", "r2mr", "no-rewriter", {"rewriter": False}),
    BenchmarkModel("freedom", "freedom"),
    BenchmarkModel("lattice", "lattice"),
    BenchmarkModel("vbpr", "vbpr"),
    BenchmarkModel("lightgcn", "lightgcn"),
)
MODEL_BY_LABEL = {m.label: m for m in MODELS}

# The clean rows' caps that are not presets: scripts/run-r2mr.sh trains R2MR to 80 epochs on ml100k-posters and 200
# on lfm2k, with a 30-minute wall-clock safety cap that is reported if it fires (metrics.json stopped_by).
PROTOCOL_TRAIN: dict[tuple[str, str], dict[str, Any]] = {
    ("ml100k-posters", "r2mr"): {"epochs": 80, "max_minutes": 30.0},
    ("lfm2k", "r2mr"): {"epochs": 200, "max_minutes": 30.0},
}
IGNORED_TRAIN_KEYS = ("progress", "device")  # change nothing a run computes


@dataclass(frozen=True)
class Cell:
    """One grid cell: a model on content damaged by ``kind`` at ``fraction``, with training (and corruption) seed."""

    dataset: str
    model: BenchmarkModel
    kind: str
    fraction: float
    seed: int

    @property
    def description(self) -> str:
        """The cell in one line: "<dataset> <model label> <kind> p=<fraction> seed <seed>"."""
        return f"{self.dataset} {self.model.label} {self.kind} p={self.fraction:g} seed {self.seed}"

    def corruption(self) -> CorruptionConfig:
        if self.fraction == 0.0 or not reads_content(self.model.model):
            return CorruptionConfig()
        return CorruptionConfig(kind=self.kind, fraction=self.fraction, seed=self.seed)

    def compose(self, train_overrides: Mapping[str, Any] = {}) -> RunConfig:  # noqa: B006 (read only)
        train = {**PROTOCOL_TRAIN.get((self.dataset, self.model.model), {}), **train_overrides,
                 "seed": self.seed, "progress": False}  # fmt: skip
        corruption = config_to_dict(self.corruption()) if self.corruption().active else {}
        return compose(self.dataset, self.model.model, Overrides(model=dict(self.model.settings), train=train,
                                                                 corruption=corruption))  # fmt: skip


def run_key(dataset: str, model: str, tag: str, model_config: Mapping[str, Any], train_config: Mapping[str, Any],
            corruption: Mapping[str, Any] | None) -> str:  # fmt: skip
    """What makes two runs the same run: settings missing from an older run are their defaults (as in results.py);
    the seed is part of the trainer settings."""
    model_settings = {**config_to_dict(model_config_class(model)()), **model_config}
    train = {k: v for k, v in {**config_to_dict(TrainConfig()), **train_config}.items() if k not in IGNORED_TRAIN_KEYS}
    damage = config_to_dict(build_config(CorruptionConfig, corruption)) if corruption else None
    value = {"dataset": dataset, "model": model, "tag": tag, "model_config": model_settings, "train_config": train,
             "corruption": damage}  # fmt: skip
    return json.dumps(json.loads(json.dumps(value)), sort_keys=True)


def cell_key(cell: Cell, train_overrides: Mapping[str, Any] = {}) -> str:  # noqa: B006 (read only)
    run = cell.compose(train_overrides)
    corruption = config_to_dict(run.corruption) if run.corruption.active else None
    return run_key(cell.dataset, cell.model.model, cell.model.tag, run.model_settings(), config_to_dict(run.train),
                   corruption)  # fmt: skip


def key_of_run(run_dir: Path) -> str:
    config = read_config(run_dir)
    return run_key(config["dataset"]["name"], config["model"], config.get("tag", "") or "", config["model_config"],
                   config["train_config"], config.get("corruption"))  # fmt: skip


def grid(datasets: Sequence[str], kinds: Sequence[str], fractions: Sequence[float], models: Sequence[str],
         seeds: Sequence[int]) -> list[Cell]:  # fmt: skip
    """The cells in training order: seed by seed (every model of the first seed first), then dataset, kind, fraction
    and model as given."""
    return [Cell(dataset, MODEL_BY_LABEL[label], kind, fraction, seed) for seed in seeds for dataset in datasets
            for kind in kinds for fraction in fractions for label in models]  # fmt: skip


# ------------------------------------------------------------------------------------------------- the ledger
def ledger_path(docs_dir: Path, dataset: str) -> Path:
    return docs_dir / "modality-quality" / f"{dataset}.json"


def read_ledger(path: Path, dataset: str) -> dict[str, Any]:
    if not path.exists():
        return {"format": LEDGER_FORMAT, "dataset": dataset, "runs": {}, "detectors": {}}
    ledger: dict[str, Any] = json.loads(path.read_text())
    if ledger.get("format") != LEDGER_FORMAT:
        raise ValueError(f"{path}: ledger format {ledger.get('format')!r}, this code reads {LEDGER_FORMAT}")
    return ledger


# The sections of a ledger that several benchmark processes add entries to (one run or one cell's detectors each).
MERGED_SECTIONS = ("runs", "detectors")


def write_ledger(path: Path, ledger: dict[str, Any]) -> None:
    """Write ``ledger``, keeping what other processes recorded since this one read the file.

    Under an exclusive lock (``.<ledger name>.lock`` beside it) the file is read again: its runs and detectors are
    kept as they are there, and those only ``ledger`` holds are added (in place: the caller's copy then holds the
    others' too). An entry is written once for good (a run's metrics and detection), so what is on disk wins: a copy
    of a run that this process found on disk (without its training time) never replaces the entry of the process
    that trained it. The result replaces the file atomically, so benchmark processes running side by side lose none
    of each other's runs and a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            on_disk = read_ledger(path, ledger["dataset"])
            for section in MERGED_SECTIONS:
                ledger[section] = {**ledger.get(section, {}), **on_disk.get(section, {})}
        staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        staged.write_text(json.dumps(ledger, indent=1, sort_keys=True) + "\n")
        os.replace(staged, path)
    finally:
        os.close(lock)  # releases the lock


def ledger_entry(run_dir: Path, runs_root: Path, cell: Cell, key: str, train_seconds: float | None) -> dict[str, Any]:
    metrics = read_metrics(run_dir)
    return {"run": run_dir.relative_to(runs_root).as_posix(), "key": key, "label": cell.model.label,
            "seed": cell.seed, "corruption": config_to_dict(cell.corruption()), "valid": metrics["valid"],
            "test": metrics["test"], "best_epoch": metrics["best_epoch"], "epochs_run": metrics.get("epochs_run"),
            "stopped_by": metrics.get("stopped_by", ""), "wall_seconds": metrics["wall_seconds"],
            "train_seconds": train_seconds}  # fmt: skip


def finished_runs(runs_root: Path, dataset: str, model: str) -> dict[str, Path]:
    """key → run directory of every finished run of ``model`` on ``dataset`` under ``runs_root`` (the latest wins)."""
    found: dict[str, Path] = {}
    for run_dir in sorted(runs_root.glob(f"{dataset}/{model}/*")):
        if has_results(run_dir):
            found[key_of_run(run_dir)] = run_dir
    return found


# -------------------------------------------------------------------------------------------------- detectors
def reviewer_detection(model: Any, clean: InteractionDataset, corrupted: CorruptedContent) -> dict[str, Any] | None:
    """AUROC of an R2MR model's reviewer (first review, final model, and the final reviewer on the content as
    given), with diagnostics of the damaged vs the clean items; None for a run without a reviewer."""
    import torch
    import torch.nn.functional as F

    from models.r2mr import R2MR

    if not isinstance(model, R2MR) or not model.config.reviewer:
        return None
    names = model.modality_names
    scores, _ = model.quality()
    given = torch.stack([model.rescore(k, model.initial_features[k]) for k in range(2)]) * model.has_modality.float()
    detectors = reviewer_detector_scores(model.first_review.cpu().numpy(), scores.cpu().numpy(), names)
    detectors[REVIEWER_RAW] = {m: 1.0 - given[k].cpu().numpy() for k, m in enumerate(names)}
    result = detection_auroc(clean, corrupted, detectors)
    with torch.no_grad():
        drift = [F.cosine_similarity(model.item_features[m], model.initial_features[k], dim=1) for k, m in enumerate(names)]
    first = model.first_review.cpu().numpy()
    diagnostics = {
        "score s, final model": {m: scores[k].cpu().numpy() for k, m in enumerate(names)},
        "cosine of the trained table to the content as given": {m: drift[k].cpu().numpy() for k, m in enumerate(names)},
        "share rewritten": {m: model.rewritten[k].float().cpu().numpy() for k, m in enumerate(names)},
    }
    if bool((first >= 0).all()):  # the best epoch came after the first round
        diagnostics["score s, first review"] = {m: first[k] for k, m in enumerate(names)}
        diagnostics["share below η at the first review"] = {
            m: (first[k] < model.config.threshold).astype(float) for k, m in enumerate(names)}  # fmt: skip
    result["diagnostics"] = group_means(diagnostics, clean, corrupted)
    return result


def simple_detection(clean: InteractionDataset, corrupted: CorruptedContent) -> dict[str, Any]:
    return detection_auroc(clean, corrupted, simple_detector_scores(corrupted))


def detector_key(kind: str, fraction: float, seed: int) -> str:
    return f"{kind}/{fraction:g}/{seed}"


def record_simple_detectors(ledger: dict[str, Any], clean: InteractionDataset, cells: Iterable[Cell]) -> None:
    """The simple detectors of every corrupted (kind, fraction, seed) among ``cells`` (they train nothing)."""
    for corruption in sorted({(c.kind, c.fraction, c.seed) for c in cells if c.fraction > 0}):
        key = detector_key(*corruption)
        if key not in ledger["detectors"]:
            config = CorruptionConfig(kind=corruption[0], fraction=corruption[1], seed=corruption[2])
            ledger["detectors"][key] = simple_detection(clean, corrupt_content(clean, config))


# ----------------------------------------------------------------------------------------------- running it
@dataclass(frozen=True)
class Outcome:
    cell: Cell
    run: str
    trained: bool
    train_seconds: float | None


def unique_cells(cells: Sequence[Cell], train_overrides: Mapping[str, Any]) -> list[tuple[Cell, str]]:
    """(cell, key) with each run once: p = 0 is shared by the kinds, LightGCN by every kind and p."""
    seen: set[str] = set()
    out = []
    for cell in cells:
        key = cell_key(cell, train_overrides)
        if key not in seen:
            seen.add(key)
            out.append((cell, key))
    return out


def run_cells(cells: Sequence[Cell], *, datasets_root: Path, runs_root: Path, docs_dir: Path,
              train_overrides: Mapping[str, Any] = {}, echo: Callable[[str], None] = print,
              after_each: Callable[[], object] = lambda: None, jobs: int = 1,
              worker: Callable[..., dict[str, Any]] | None = None) -> list[Outcome]:  # noqa: B006 (read only)  # fmt: skip
    """Train every cell that has no run yet, record every cell's run in its dataset's ledger, and call
    ``after_each`` after each cell trained (the report is rewritten there; a pass that only finds runs calls it
    never: the caller writes the report once at the end).

    ``jobs`` = 1 trains the cells in order in this process. ``jobs`` > 1 first records every cell that has a run,
    then trains the others ``jobs`` at a time, each in its own process (``train_in_worker``; torch threads: the
    usable cores shared out, at most OMP_NUM_THREADS), recording each run as it finishes. A cell is handed to a
    worker only when one is free, so after a failure no further cell starts: the running ones finish and are
    recorded, then the first failure is raised. An error in this process (or Ctrl-C) starts no further cell.
    ``worker`` (tests) replaces ``train_in_worker``: a module-level function, as a spawned process imports it."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    outcomes: list[Outcome] = []
    to_train: list[tuple[Cell, str]] = []
    ledgers: dict[str, dict[str, Any]] = {}

    def trained(cell: Cell, entry: dict[str, Any]) -> Outcome:
        ledgers[cell.dataset]["runs"][entry["run"]] = entry
        return Outcome(cell, entry["run"], trained=True, train_seconds=entry["train_seconds"])

    def record(outcome: Outcome) -> None:
        write_ledger(ledger_path(docs_dir, outcome.cell.dataset), ledgers[outcome.cell.dataset])
        outcomes.append(outcome)
        echo(describe_outcome(outcome, ledgers[outcome.cell.dataset]["runs"][outcome.run]))
        if outcome.trained:
            after_each()

    for dataset in dict.fromkeys(c.dataset for c in cells):
        clean = InteractionDataset.load(datasets_root / dataset)
        path = ledger_path(docs_dir, dataset)
        ledger = ledgers[dataset] = read_ledger(path, dataset)
        ledger["modalities"] = sorted(clean.modalities)
        record_simple_detectors(ledger, clean, [c for c in cells if c.dataset == dataset])
        write_ledger(path, ledger)
        for cell, key in unique_cells([c for c in cells if c.dataset == dataset], train_overrides):
            outcome = reuse_cell(cell, key, clean, ledger, runs_root=runs_root)
            if outcome is None and jobs == 1:
                outcome = trained(cell, train_cell(cell, key, clean, datasets_root=datasets_root, runs_root=runs_root,
                                                   train_overrides=train_overrides))  # fmt: skip
            if outcome is None:
                to_train.append((cell, key))
            else:
                record(outcome)
    if not to_train:
        return outcomes
    workers = min(jobs, len(to_train))
    failures: list[BaseException] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=set_up_worker, initargs=(worker_threads(workers), logging.getLogger().level)) as pool:  # fmt: skip
        queued = iter(to_train)
        running: dict[Future[dict[str, Any]], Cell] = {}
        try:
            while True:
                while not failures and len(running) < workers and (nxt := next(queued, None)) is not None:
                    running[pool.submit(worker or train_in_worker, nxt[0], nxt[1], datasets_root=datasets_root,
                                        runs_root=runs_root, train_overrides=dict(train_overrides))] = nxt[0]  # fmt: skip
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    cell = running.pop(future)
                    try:
                        entry = future.result()
                    except Exception as error:  # noqa: BLE001 (no cell starts after it; the running ones finish)
                        failures.append(error)
                        continue
                    record(trained(cell, entry))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # an error here (or Ctrl-C) starts no further cell
            raise
    if failures:
        raise failures[0]
    return outcomes


def worker_threads(workers: int) -> int:
    """Torch threads of each of ``workers`` processes: the usable cores shared out, at most OMP_NUM_THREADS if set."""
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(limit)) if limit.isdigit() and int(limit) > 0 else threads


def reuse_cell(cell: Cell, key: str, clean: InteractionDataset, ledger: dict[str, Any], *,
               runs_root: Path) -> Outcome | None:  # fmt: skip
    """The cell's run recorded in the ledger, or found finished in the runs root (then added to the ledger with the
    reviewer's AUROC); None if it has none."""
    recorded = next((name for name, entry in ledger["runs"].items() if entry["key"] == key), None)
    if recorded is not None:
        return Outcome(cell, recorded, trained=False, train_seconds=ledger["runs"][recorded]["train_seconds"])
    existing = finished_runs(runs_root, cell.dataset, cell.model.model).get(key)
    if existing is None:
        return None
    entry = ledger_entry(existing, runs_root, cell, key, None)
    entry["detection"] = loaded_reviewer_detection(existing, clean)
    ledger["runs"][entry["run"]] = entry
    return Outcome(cell, entry["run"], trained=False, train_seconds=None)


def train_cell(cell: Cell, key: str, clean: InteractionDataset, *, datasets_root: Path, runs_root: Path,
               train_overrides: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Train the cell; its ledger entry, carrying the training time and the reviewer's AUROC."""
    from training.fit.trainer import train

    run = cell.compose(train_overrides)
    corrupted = corrupt_content(clean, run.corruption)
    started = time.perf_counter()
    result = train(clean, cell.model.model, dataset_dir=datasets_root / cell.dataset, model_config=run.model_config,
                   train_config=run.train, runs_root=runs_root, tag=cell.model.tag, corruption=run.corruption)  # fmt: skip
    seconds = time.perf_counter() - started
    assert result.run_dir is not None
    entry = ledger_entry(result.run_dir, runs_root, cell, key, seconds)
    entry["detection"] = reviewer_detection(result.model.cpu(), clean, corrupted) if run.corruption.active else None
    return entry


def set_up_worker(threads: int, log_level: int) -> None:
    """A worker's initializer: torch computes with ``threads`` threads; log records at the CLI's level."""
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=log_level, format=LOG_FORMAT)


def train_in_worker(cell: Cell, key: str, *, datasets_root: Path, runs_root: Path,
                    train_overrides: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """``train_cell`` in a worker process (the clean dataset loaded there). A failure comes back as a RuntimeError
    naming the cell and carrying the traceback: any exception reaches the parent, and a cell whose exception could
    not be unpickled there would break the pool and kill the cells running beside it."""
    try:
        clean = InteractionDataset.load(datasets_root / cell.dataset)
        return train_cell(cell, key, clean, datasets_root=datasets_root, runs_root=runs_root,
                          train_overrides=train_overrides)  # fmt: skip
    except Exception as error:
        raise RuntimeError(f"{cell.description}: {type(error).__name__}: {error}\n{traceback.format_exc()}") from None


def loaded_reviewer_detection(run_dir: Path, clean: InteractionDataset) -> dict[str, Any] | None:
    """The reviewer's AUROC of a finished run found on disk (None: clean, or no reviewer)."""
    config = read_config(run_dir)
    if not config.get("corruption") or config["model"] != "r2mr" or not config["model_config"].get("reviewer", True):
        return None
    from training.runs import load_run

    loaded = load_run(run_dir)
    corrupted = corrupt_content(clean, build_config(CorruptionConfig, config["corruption"]))
    return reviewer_detection(loaded.model, clean, corrupted)


def describe_outcome(outcome: Outcome, entry: Mapping[str, Any]) -> str:
    cell = outcome.cell
    damage = entry["corruption"]
    what = "clean" if damage["kind"] == "none" else f"{damage['kind']} p={damage['fraction']:g}"
    how = (f"trained in {outcome.train_seconds:.0f} s" if outcome.trained else "reused")
    return (f"{cell.dataset} {cell.model.label} {what} seed {cell.seed}: test recall@20 "
            f"{entry['test'].get('recall@20', np.nan):.4f}, best epoch {entry['best_epoch']} of {entry['epochs_run']} "
            f"({entry['stopped_by']}), {how} [{entry['run']}]")  # fmt: skip
