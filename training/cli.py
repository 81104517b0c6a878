"""`mmrec`: prepare datasets, train and tune models, regenerate the results table, export bundles, run the demo."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from models import MODELS
from training.dataset import InteractionDataset
from training.prepare import SplitKind, prepare_named, pretrained_encoders
from training.settings import PROJECT_ROOT, Paths, default_paths
from training.sources import SOURCES
from training.trainer import TrainConfig, train

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
log = logging.getLogger("mmrec")


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def dataset_dir(paths: Paths, name: str, *, encode: bool = True) -> Path:
    """The prepared dataset ``name`` (``<source>`` or ``<source>-seq``), preparing it first if needed."""
    directory = paths.datasets / name
    if not (directory / "dataset.json").exists():
        source, split = (name.removesuffix("-seq"), "loo") if name.endswith("-seq") else (name, "default")
        typer.echo(f"preparing {name} (split: {split}) ...")
        encoders = pretrained_encoders(paths) if encode else None
        prepare_named(source, paths, split=split, encoders=encoders)  # type: ignore[arg-type]
    return directory


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def prepare(
    dataset: Annotated[str, typer.Argument(help=f"One of {sorted(SOURCES)}, or a folder in MMRec format.")],
    split: Annotated[str, typer.Option(help="default (the source's own split, else random 8:1:1), given, random, loo")] = "default",
    seed: Annotated[int, typer.Option(help="Seed of the random split.")] = 2024,
    encode: Annotated[bool, typer.Option(help="Encode item text (MiniLM) and images (EfficientNet-Lite0).")] = True,
) -> None:
    """Read a raw dataset, store its split and encode its item content into a prepared dataset."""
    paths = default_paths()
    if split not in ("default", "given", "random", "loo"):
        raise typer.BadParameter(f"--split {split!r}: expected default, given, random or loo")
    split_kind: SplitKind = split  # type: ignore[assignment]
    encoders = pretrained_encoders(paths) if encode else None
    directory = prepare_named(dataset, paths, split=split_kind, seed=seed, encoders=encoders)
    meta = json.loads((directory / "dataset.json").read_text())
    typer.echo(f"prepared {meta['name']} in {directory}")
    typer.echo(json.dumps({k: meta[k] for k in ("n_users", "n_items", "n_interactions", "split", "split_sizes",
                                                "modalities", "report")}, indent=2))  # fmt: skip


def _train_config(values: dict[str, str], base: dict[str, Any]) -> TrainConfig:
    from models.config import build_config

    return build_config(TrainConfig, base, values)


@app.command("train")
def train_command(
    dataset: Annotated[str, typer.Option(help="Prepared dataset name (prepared on first use).")],
    model: Annotated[str, typer.Option(help=f"One of {sorted(MODELS)}.")],
    set_: Annotated[list[str], typer.Option("--set", help="Model setting KEY=VALUE (repeatable).")] = [],  # noqa: B006
    train_set: Annotated[list[str], typer.Option("--train", help="Trainer setting KEY=VALUE, e.g. epochs=200.")] = [],  # noqa: B006
    seed: Annotated[int, typer.Option(help="Seed of initialisation and sampling.")] = 2024,
    tag: Annotated[str, typer.Option(help="Variant label (ablations); runs with a tag get their own row.")] = "",
) -> None:
    """Train one model; writes a run directory with config, metrics, learning curve and checkpoint."""
    from training.presets import preset

    paths = default_paths()
    directory = dataset_dir(paths, dataset)
    data = InteractionDataset.load(directory)
    model_layer, train_layer = preset(data.name, model)
    config = _train_config({**parse_assignments(train_set), "seed": str(seed)}, train_layer)
    result = train(data, model, dataset_dir=directory, model_config={**model_layer, **parse_assignments(set_)},
                   train_config=config, runs_root=paths.runs, tag=tag)  # fmt: skip
    typer.echo(json.dumps({"run_dir": str(result.run_dir), "best_epoch": result.best_epoch,
                           "valid": {k: round(v, 4) for k, v in result.valid.items() if "@20" in k},
                           "test": {k: round(v, 4) for k, v in result.test.items() if "@20" in k or "@10" in k}},
                          indent=2))  # fmt: skip


@app.command()
def tune(
    dataset: Annotated[str, typer.Option(help="Prepared dataset name.")],
    model: Annotated[str, typer.Option(help=f"One of {sorted(MODELS)}.")],
    grid: Annotated[list[str], typer.Option(help="KEY=V1,V2,... (repeatable); the grid is their product.")],
    train_set: Annotated[list[str], typer.Option("--train", help="Trainer setting KEY=VALUE.")] = [],  # noqa: B006
    seed: Annotated[int, typer.Option(help="Seed.")] = 2024,
) -> None:
    """Train every grid point; report the one with the best VALIDATION Recall@20 (test is never looked at)."""
    from training.presets import preset

    paths = default_paths()
    directory = dataset_dir(paths, dataset)
    data = InteractionDataset.load(directory)
    model_layer, train_layer = preset(data.name, model)
    axes = {k: v.split(",") for k, v in parse_assignments(grid).items()}
    config = _train_config({**parse_assignments(train_set), "seed": str(seed)}, train_layer)
    results = []
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values, strict=True))
        result = train(data, model, dataset_dir=directory, model_config={**model_layer, **point},
                       train_config=config, runs_root=paths.runs)  # fmt: skip
        results.append((result.valid[config.select_metric], point, result.run_dir))
        typer.echo(f"{point}: valid {config.select_metric} {result.valid[config.select_metric]:.4f} ({result.run_dir})")
    best = max(results, key=lambda r: r[0])
    typer.echo(f"best on validation: {best[1]} valid {config.select_metric} {best[0]:.4f} ({best[2]})")


@app.command()
def results(
    out: Annotated[Path, typer.Option(help="Markdown file to write.")] = PROJECT_ROOT / "docs" / "results.md",
    runs: Annotated[Path | None, typer.Option(help="Runs root (default: $MMREC_HOME/runs).")] = None,
) -> None:
    """Regenerate the results tables (one per dataset) from the run directories."""
    from training.results import write_results

    text = write_results(runs or default_paths().runs, out, PROJECT_ROOT / "docs" / "results-notes.json")
    typer.echo(text)


if __name__ == "__main__":
    app()
