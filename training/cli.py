"""`mmrec`: prepare datasets, train and tune models, regenerate the results table, export bundles, run the demo."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Annotated

import typer

import bundle_format as bf
from models import MODELS
from training.data.dataset import InteractionDataset
from training.data.prepare import SplitKind, prepare_named, pretrained_encoders
from training.data.sources import SOURCES
from training.export.item_index import IndexConfig
from training.fit.trainer import train
from training.settings import PROJECT_ROOT, Paths, default_paths

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


def seeded_train_settings(train_set: list[str], seed: int) -> dict[str, str]:
    """The ``--train KEY=VALUE`` settings with ``--seed``; ``--train seed=N`` is refused, not silently overridden."""
    values = parse_assignments(train_set)
    if "seed" in values:
        raise typer.BadParameter(f"give the seed as --seed {values['seed']}, not --train seed=...", param_hint="--train")
    return {**values, "seed": str(seed)}


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
    from training.config import preset, train_config

    settings = seeded_train_settings(train_set, seed)
    paths = default_paths()
    directory = dataset_dir(paths, dataset)
    data = InteractionDataset.load(directory)
    model_layer, train_layer = preset(data.name, model)
    config = train_config(train_layer, settings)
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
    from training.config import preset, train_config

    settings = seeded_train_settings(train_set, seed)
    paths = default_paths()
    directory = dataset_dir(paths, dataset)
    data = InteractionDataset.load(directory)
    model_layer, train_layer = preset(data.name, model)
    axes = {k: v.split(",") for k, v in parse_assignments(grid).items()}
    config = train_config(train_layer, settings)
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
    """Record the run directories in the run ledger (docs/results-runs.jsonl), then regenerate the results tables."""
    from training.experiments.results import write_results

    docs = PROJECT_ROOT / "docs"
    text = write_results(runs or default_paths().runs, out, docs / "results-notes.json",
                         ledger_path=docs / "results-runs.jsonl", recovered_path=docs / "results-recovered.json")  # fmt: skip
    typer.echo(text)


@app.command("qarm")
def qarm_command(
    dataset: Annotated[str, typer.Option(help="Prepared dataset with content modalities (e.g. ml100k-posters, lfm2k).")],
    cold_share: Annotated[float, typer.Option(help="Share of items held out of training entirely (0: warm split).")] = 0.0,
    cold_seed: Annotated[int, typer.Option(help="Seed of the cold-item draw.")] = 2024,
    set_: Annotated[list[str], typer.Option("--set", help="QARM setting KEY=VALUE, e.g. source=raw, codebook_size=32.")] = [],  # noqa: B006
    train_set: Annotated[list[str], typer.Option("--train", help="Trainer setting KEY=VALUE (also for a LightGCN trained here).")] = [],  # noqa: B006
    align: Annotated[list[str], typer.Option("--align", help="Alignment setting KEY=VALUE, e.g. temperature=0.1.")] = [],  # noqa: B006
    seed: Annotated[int, typer.Option(help="Seed of the recommender's initialisation and sampling.")] = 2024,
    tag: Annotated[str, typer.Option(help="Variant label for docs/results.md (e.g. unaligned).")] = "",
) -> None:
    """QARM end to end (docs/qarm.md): mine pairs from LightGCN, align, residual k-means codes, train the code-based
    recommender; with --cold-share, evaluate on items held out of training. Writes qarm_report.json in the run."""
    from models.config import build_config
    from training.config import preset, train_config
    from training.experiments.qarm_alignment import AlignmentTrainConfig
    from training.experiments.qarm_pipeline import QARM_REPORT, PipelineConfig, run_qarm
    from training.runs import report_file

    settings = seeded_train_settings(train_set, seed)
    paths = default_paths()
    directory = paths.datasets / dataset
    if not (directory / "dataset.json").exists():
        raise typer.BadParameter(f"{dataset!r} is not a prepared dataset under {paths.datasets}; run `mmrec prepare`")
    model_layer, train_layer = preset(dataset, "qarm")
    config = train_config(train_layer, settings)
    _, lightgcn_train_layer = preset(dataset, "lightgcn")
    outcome = run_qarm(
        directory, runs_root=paths.runs, datasets_root=paths.datasets,
        model_config={**model_layer, **parse_assignments(set_)}, train_config=config,
        align_config=build_config(AlignmentTrainConfig, parse_assignments(align)),
        pipeline_config=PipelineConfig(cold_share=cold_share, cold_seed=cold_seed),
        lightgcn_train_config=train_config(lightgcn_train_layer, settings),
        tag=tag, echo=typer.echo,
    )  # fmt: skip
    typer.echo(f"report: {report_file(outcome.run_dir, QARM_REPORT) if outcome.run_dir else '(no run directory)'}")


@app.command("qarm-report")
def qarm_report_command(
    out: Annotated[Path, typer.Option(help="Markdown file to write.")] = PROJECT_ROOT / "docs" / "qarm-results.md",
    runs: Annotated[Path | None, typer.Option(help="Runs root (default: $MMREC_HOME/runs).")] = None,
) -> None:
    """Regenerate the QARM tables (warm, cold start, alignment, quantiser) from the runs' qarm_report.json."""
    from training.experiments.reports import render_qarm_report

    text = render_qarm_report(runs or default_paths().runs)
    out.write_text(text)
    typer.echo(text)


@app.command("export")
def export_command(
    run_dir: Annotated[Path, typer.Argument(help="A training run directory (has checkpoint.pt).")],
    out: Annotated[Path, typer.Option(help="Bundle directory to write (replaced if it exists).")],
    modality_encoders: Annotated[bool, typer.Option(help="Include the ONNX text/image encoders (for raw-content ingestion).")] = True,
    exact_up_to: Annotated[int, typer.Option(help="Items up to which the index is exact (flat inner product); above it, approximate.")] = IndexConfig.approximate_threshold,
    approximate: Annotated[str, typer.Option(help="Approximate index above the threshold: ivf or hnsw.")] = IndexConfig.approximate,
    target_recall: Annotated[float, typer.Option(help="recall@20 against exact search that the approximate index's nprobe / efSearch must reach.")] = IndexConfig.target_recall_at_20,
) -> None:
    """Export a run as a bundle: manifest, FAISS index, arrays and ONNX graphs (docs/bundle-format.md)."""
    from training.export.bundle import ExportConfig, export_run

    if approximate not in ("ivf", "hnsw"):
        raise typer.BadParameter(f"--approximate must be ivf or hnsw, got {approximate!r}")
    index = IndexConfig(approximate_threshold=exact_up_to, approximate="ivf" if approximate == "ivf" else "hnsw",
                        target_recall_at_20=target_recall)  # fmt: skip
    bundle = export_run(run_dir, out, config=ExportConfig(include_modality_encoders=modality_encoders, index=index))
    manifest = json.loads((bundle / bf.MANIFEST).read_text())
    typer.echo(f"bundle {manifest['bundle_version']} written to {bundle}")


def _default_demo_dataset(paths: Paths) -> str:
    return "ml100k-posters" if (paths.data_root / "ml100k-posters").is_dir() else "ml100k"


@app.command()
def pipeline(
    dataset: Annotated[str | None, typer.Option(help="Dataset (default: ml100k-posters if the shared data is there, else ml100k from the recbole wheel).")] = None,
    model: Annotated[str, typer.Option(help="Model to train.")] = "lightgcn",
    bundle_out: Annotated[Path | None, typer.Option(help="Bundle directory (default: $MMREC_HOME/bundles/<dataset>-<model>).")] = None,
    max_minutes: Annotated[float, typer.Option(help="Training time budget in minutes (0: none).")] = 10.0,
) -> None:
    """Prepare the dataset, train the model (selected on validation), export the bundle. Prints the bundle path."""
    from training.config import preset, train_config
    from training.export.bundle import export_run

    paths = default_paths()
    name = dataset or _default_demo_dataset(paths)
    directory = dataset_dir(paths, name)
    data = InteractionDataset.load(directory)
    model_layer, train_layer = preset(data.name, model)
    config = train_config(train_layer, {"max_minutes": str(max_minutes)})
    result = train(data, model, dataset_dir=directory, model_config=model_layer, train_config=config,
                   runs_root=paths.runs, tag="")  # fmt: skip
    assert result.run_dir is not None
    typer.echo(f"trained {model} on {name}: best epoch {result.best_epoch}, "
               f"valid recall@20 {result.valid['recall@20']:.4f}, test recall@20 {result.test['recall@20']:.4f}")  # fmt: skip
    bundle = export_run(result.run_dir, bundle_out or paths.bundles / f"{name}-{model}")
    typer.echo(f"bundle: {bundle}")


@app.command()
def demo(
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8000,
    model: Annotated[str, typer.Option(help="Model to train.")] = "lightgcn",
    max_minutes: Annotated[float, typer.Option(help="Training time budget in minutes.")] = 10.0,
) -> None:
    """The main job: prepare the default data, train, export, then serve the bundle over REST.

    Serves with the embedded in-process cache unless REDIS_URL (or MMREC_REDIS_URL) is set.
    """
    import os
    import shutil
    import sys

    paths = default_paths()
    name = _default_demo_dataset(paths)
    bundle = paths.bundles / f"{name}-{model}"
    pipeline(dataset=name, model=model, bundle_out=bundle, max_minutes=max_minutes)
    serve = shutil.which("mmrec-serve") or str(Path(sys.executable).with_name("mmrec-serve"))
    args = [serve, "--bundle", str(bundle), "--host", host, "--port", str(port),
            "--state-dir", str(paths.home / "state" / bundle.name)]  # fmt: skip
    redis_url = os.environ.get("MMREC_REDIS_URL") or os.environ.get("REDIS_URL")
    if redis_url:
        args += ["--redis-url", redis_url]
    typer.echo("starting: " + " ".join(args))
    os.execv(serve, args)


if __name__ == "__main__":
    app()
