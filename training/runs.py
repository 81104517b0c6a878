"""Run directories: what one training run leaves behind, and how a model is rebuilt from it.

    runs/<dataset>/<model>/<UTC time>-s<seed>[-<tag>]/
        config.json     model name and config, training config, dataset name/split/directory
        metrics.json    per-evaluation history, best epoch, valid and test metrics at the best epoch, wall time
        curve.png       training loss and validation Recall@20 per epoch
        checkpoint.pt   the best model's state_dict WITH its config (the model is rebuilt from it)
        <kind>_report.json  reports written into the run by an experiment (QARM: qarm_report.json)
        corruption.json the item content this run was trained on was damaged on purpose (a corruption benchmark):
                        how (kind, fraction, seed) and which (item id, modality) pairs; absent for clean runs

This module is the only code that knows these names: the trainer writes a run with :func:`write_run`, readers
use :func:`read_metrics`, :func:`read_config`, :func:`run_directories`, :func:`load_run`. Torch is imported only
by the functions that save or load a checkpoint, so reading results (tables, reports) needs no torch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.data.dataset import InteractionDataset

if TYPE_CHECKING:
    from models.base import ModelInputs, Recommender

CHECKPOINT_FORMAT = 1
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
CURVE_FILE = "curve.png"
CORRUPTION_FILE = "corruption.json"
CORRUPTION_FORMAT = 1


def new_run_directory(root: Path, dataset: str, model: str, seed: int, tag: str = "") -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"{stamp}-s{seed}" + (f"-{tag}" if tag else "")
    path = root / dataset / model / name
    suffix = 1
    while path.exists():
        suffix += 1
        path = root / dataset / model / f"{name}-{suffix}"
    path.mkdir(parents=True)
    return path


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True))


def write_run(
    run_dir: Path,
    *,
    config: dict[str, Any],
    metrics: dict[str, Any],
    model_name: str,
    model_config: dict[str, Any],
    state: dict[str, Any],
    dataset_dir: Path,
    train_config: dict[str, Any],
    select_metric: str,
) -> None:
    """Write a finished run's files into ``run_dir``: config, metrics, checkpoint and learning curve."""
    write_json(run_dir / CONFIG_FILE, config)
    write_json(run_dir / METRICS_FILE, metrics)
    save_checkpoint(run_dir / CHECKPOINT_FILE, model_name=model_name, model_config=model_config, state=state,
                    dataset_dir=dataset_dir, train_config=train_config)  # fmt: skip
    plot_learning_curve(run_dir / CURVE_FILE, metrics["history"], select_metric)


@dataclass(frozen=True)
class CorruptionRecord:
    """What a corruption benchmark did to a run's item content: ``damaged`` holds (item id, modality) pairs, the
    item ids as the dataset spells them (the ids the service serves)."""

    dataset: str
    kind: str  # "missing" | "swapped" | "noise"
    fraction: float  # share of the items that got one modality damaged
    seed: int
    damaged: tuple[tuple[str, str], ...]

    def damaged_by_modality(self) -> dict[str, set[str]]:
        by_modality: dict[str, set[str]] = {}
        for item, modality in self.damaged:
            by_modality.setdefault(modality, set()).add(item)
        return by_modality


def write_corruption(run_dir: Path, record: CorruptionRecord) -> Path:
    path = run_dir / CORRUPTION_FILE
    write_json(path, {"format": CORRUPTION_FORMAT, "dataset": record.dataset, "kind": record.kind,
                      "fraction": record.fraction, "seed": record.seed,
                      "damaged": [{"item": item, "modality": modality} for item, modality in record.damaged]})  # fmt: skip
    return path


def read_corruption(run_dir: Path) -> CorruptionRecord | None:
    """The run's corruption record, or None for a run trained on the dataset's content as it is."""
    path = run_dir / CORRUPTION_FILE
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    if raw.get("format") != CORRUPTION_FORMAT:
        raise ValueError(f"{path}: corruption record format {raw.get('format')!r}, this code reads {CORRUPTION_FORMAT}")
    damaged = tuple((str(entry["item"]), str(entry["modality"])) for entry in raw["damaged"])
    return CorruptionRecord(dataset=raw["dataset"], kind=raw["kind"], fraction=float(raw["fraction"]),
                            seed=int(raw["seed"]), damaged=damaged)  # fmt: skip


def has_results(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run's config and metrics (both are written when training ends)."""
    return (run_dir / METRICS_FILE).exists() and (run_dir / CONFIG_FILE).exists()


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT_FILE).exists()


def read_metrics(run_dir: Path) -> dict[str, Any]:
    value: dict[str, Any] = json.loads((run_dir / METRICS_FILE).read_text())
    return value


def read_config(run_dir: Path) -> dict[str, Any]:
    value: dict[str, Any] = json.loads((run_dir / CONFIG_FILE).read_text())
    return value


def run_directories(runs_root: Path, dataset: str = "*", model: str = "*") -> list[Path]:
    """Run directories under ``runs_root`` that have metrics (of ``dataset`` / ``model``, or all), sorted by path."""
    return [path.parent for path in sorted(runs_root.glob(f"{dataset}/{model}/*/{METRICS_FILE}"))]


def report_file(run_dir: Path, kind: str) -> Path:
    """Where an experiment keeps its report on a run (``<kind>_report.json``)."""
    return run_dir / f"{kind}_report.json"


def write_report(run_dir: Path, kind: str, report: dict[str, Any]) -> Path:
    path = report_file(run_dir, kind)
    write_json(path, report)
    return path


def reported_runs(runs_root: Path, model: str, kind: str) -> list[Path]:
    """Run directories of ``model`` (any dataset) that carry a ``kind`` report, sorted by path."""
    return [path.parent for path in sorted(runs_root.glob(f"*/{model}/*/{kind}_report.json"))]


def read_report(run_dir: Path, kind: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(report_file(run_dir, kind).read_text())
    return value


def save_checkpoint(path: Path, *, model_name: str, model_config: dict[str, Any], state: dict[str, Any],
                    dataset_dir: Path, train_config: dict[str, Any]) -> None:  # fmt: skip
    import torch

    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "model": model_name,
            "model_config": model_config,
            "train_config": train_config,
            "dataset_dir": str(dataset_dir),
            "state_dict": state,
        },
        path,
    )


def read_checkpoint(run_dir: Path, *, reader: str = "") -> dict[str, Any]:
    """The run's checkpoint (on the CPU), checked to exist and to be of CHECKPOINT_FORMAT; ``reader`` prefixes the
    error messages (``"init_from: "``)."""
    import torch

    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{reader}{run_dir} has no {CHECKPOINT_FILE}: is it a finished training run?")
    checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{reader}{path}: checkpoint format {checkpoint.get('format')}, expected {CHECKPOINT_FORMAT}")
    return checkpoint


@dataclass(frozen=True)
class LoadedRun:
    model: Recommender
    model_name: str
    dataset: InteractionDataset  # with the item content the model was built from (damaged, for a corrupted run)
    inputs: ModelInputs
    config: dict[str, Any]
    metrics: dict[str, Any]
    directory: Path


def load_run(run_dir: Path, *, dataset_dir: Path | None = None) -> LoadedRun:
    """Rebuild the best model of a run from its checkpoint (config included) and its prepared dataset; a corrupted
    run's item content is damaged again from its config.json and checked against its corruption.json."""
    from models import build_model, model_spec
    from training.data.inputs import model_inputs

    checkpoint = read_checkpoint(run_dir)
    dataset = corrupted_as_trained(run_dir, InteractionDataset.load(dataset_dir or Path(checkpoint["dataset_dir"])))
    inputs = model_inputs(dataset, knowledge_graph=model_spec(checkpoint["model"]).needs_knowledge_graph)
    model = build_model(checkpoint["model"], inputs, checkpoint["model_config"])
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return LoadedRun(
        model=model,
        model_name=checkpoint["model"],
        dataset=dataset,
        inputs=inputs,
        config=read_config(run_dir),
        metrics=read_metrics(run_dir),
        directory=run_dir,
    )


def corrupted_as_trained(run_dir: Path, dataset: InteractionDataset) -> InteractionDataset:
    """``dataset`` with the item content the run was trained on: its config's ``corruption`` applied again (the draw
    is a function of the dataset and the config), which must damage the pairs its corruption.json records."""
    settings = read_config(run_dir).get("corruption")
    if not settings:
        return dataset
    from models.config import build_config
    from training.config import CorruptionConfig
    from training.data.corruption import corrupt_content

    corrupted = corrupt_content(dataset, build_config(CorruptionConfig, settings))
    recorded = read_corruption(run_dir)
    if recorded is None or recorded.damaged != corrupted.record().damaged:
        raise ValueError(f"{run_dir}: its config's corruption {settings} does not damage the items its "
                         f"{CORRUPTION_FILE} records (another dataset, or changed corruption code?)")  # fmt: skip
    return corrupted.dataset


def initialise_from_run(model: Recommender, run_dir: Path, *, model_name: str) -> list[str]:
    """Load the weights of an earlier run of the same model into ``model`` (pre-training → fine-tuning).

    Parameters the earlier run did not have (the fine-tuning stage's ID embeddings) keep their fresh
    initialisation and are returned by name; a parameter the model does not have, or of another shape, fails.
    """
    checkpoint = read_checkpoint(run_dir, reader="init_from: ")
    if checkpoint.get("model") != model_name:
        raise ValueError(f"init_from: {run_dir} is a run of {checkpoint.get('model')!r}, not of {model_name!r}")
    result = model.load_state_dict(checkpoint["state_dict"], strict=False)
    if result.unexpected_keys:
        raise ValueError(f"init_from: {run_dir} has parameters this model lacks: {result.unexpected_keys}")
    return list(result.missing_keys)


def plot_learning_curve(path: Path, history: list[dict[str, Any]], select_metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, loss_axis = plt.subplots(figsize=(7, 4))
    epochs = [h["epoch"] for h in history if h.get("loss") is not None]
    loss_axis.plot(epochs, [h["loss"] for h in history if h.get("loss") is not None], color="tab:blue")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    metric_axis = loss_axis.twinx()
    evaluated = [h for h in history if select_metric in h.get("valid", {})]
    metric_axis.plot([h["epoch"] for h in evaluated], [h["valid"][select_metric] for h in evaluated], color="tab:red")
    metric_axis.set_ylabel(f"valid {select_metric}", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
