"""`mmrec`: prepare datasets, train and tune models, report, export bundles, run the demo.

Settings come from one place (training/config.py: defaults → presets.toml → --set/--train); `mmrec config MODEL`
lists them. A mistake in what was asked (unknown dataset or model, bad setting, missing data, a folder that is not a
run) prints one line and exits 2; `mmrec --debug ...` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import typer
from typer.core import TyperGroup

from training import LOG_FORMAT
from training.config import MODEL_NAMES, SOURCE_NAMES, Overrides, RunConfig
from training.config import parse_assignments as parse_assignments  # kept for callers of phase 1
from training.settings import PROJECT_ROOT, Paths, default_paths

log = logging.getLogger("mmrec")

# The demo's and `mmrec pipeline`'s training: to early stopping (patience 20 evaluations) under the trainer's
# 1,000-epoch cap, so the demo model does not depend on machine load. LightGCN (the default model) trains with a
# larger batch and learning rate than the trainer's defaults (2048, 1e-3). Measured on ml100k-posters, seed 2024, on
# the 2 cores of this machine at load ~1: batch 8192 / lr 1e-2 stops early at epoch 87 (best epoch 67, valid
# Recall@20 0.3502) in 48 s at 0.51 s/epoch; the defaults peak at epoch 205 (0.3483, early stop at 225) and reach
# 0.3312 after 120 epochs (161 s at 1.34 s/epoch). Other models train with their presets.
DEMO_EPOCHS = 1000
DEMO_TRAIN: dict[str, tuple[str, ...]] = {"lightgcn": ("batch_size=8192", "learning_rate=1e-2")}

DATASETS_HELP = (f"One of {', '.join(SOURCE_NAMES)}; add -seq for the leave-one-out split by time (e.g. "
                 "ml100k-posters-seq, for sequential models); or a folder in MMRec format.")  # fmt: skip
MODEL_HELP = f"One of {', '.join(MODEL_NAMES)}."
SET_HELP = "Model setting KEY=VALUE (repeatable); `mmrec config MODEL [--dataset D]` lists keys, defaults, presets."
TRAIN_HELP = "Trainer setting KEY=VALUE (repeatable), e.g. epochs=200; `mmrec config MODEL` lists them."
CORRUPT_HELP = ("Damage the item content before the model is built, KEY=VALUE (repeatable): kind=missing|swapped|noise, "
                "fraction=P (share of the items with content), seed=S; recorded in the run (docs/modality-quality.md).")


class CommandLineError(Exception):
    """Something the user asked for that cannot be done; printed as one line, exit status 2."""


class ErrorsAsOneLine(TyperGroup):
    """Runs a subcommand; a :class:`CommandLineError`, a config mistake or missing raw data becomes one line on
    stderr and exit status 2 (the traceback under ``--debug``)."""

    def invoke(self, ctx: Any) -> Any:  # a click.Context (typer vendors click: no public name for it)
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = user_error_message(exc)
            if message is None or ctx.params.get("debug"):
                raise
            typer.echo(f"Error: {message}", err=True)
            raise typer.Exit(2) from None


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of a mistake in the user's request; None for anything else (a bug: traceback)."""
    if isinstance(exc, CommandLineError):
        return str(exc)
    # Those classes can only have been raised if their module is loaded: no import on the error path.
    for module, name in (("models.config", "ConfigError"), ("training.data.sources", "SourceMissingError"),
                         ("training.experiments.modality_audit", "AuditError")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return str(exc)
    return None


def fail(message: str) -> NoReturn:
    raise CommandLineError(message)


app = typer.Typer(cls=ErrorsAsOneLine, add_completion=False, no_args_is_help=True, help=__doc__,
                  rich_markup_mode=None)  # fmt: skip


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=LOG_FORMAT)


# ------------------------------------------------------------------------------------------------------ helpers
def source_and_split(name: str, split: str = "default") -> tuple[str, str]:
    """(source or MMRec folder, split) for a dataset name; an unknown name fails with the known ones."""
    if split not in ("default", "given", "random", "loo"):
        fail(f"--split {split!r}: expected default, given, random or loo")
    if name.endswith("-seq") and name.removesuffix("-seq") in SOURCE_NAMES:
        if split not in ("default", "loo"):
            fail(f"{name} is {name.removesuffix('-seq')} with the leave-one-out split; --split {split} contradicts it")
        return name.removesuffix("-seq"), "loo"
    if name in SOURCE_NAMES or Path(name).is_dir():
        return name, split
    fail(f"unknown dataset {name!r}; known: {', '.join(SOURCE_NAMES)} (add -seq for leave-one-out), "
         "or a folder in MMRec format")  # fmt: skip


def dataset_dir(paths: Paths, name: str, *, encode: bool = True) -> Path:
    """The prepared dataset ``name`` (``<source>`` or ``<source>-seq``), preparing it first if needed."""
    directory = paths.datasets / name
    if not (directory / "dataset.json").exists():
        source, split = source_and_split(name)
        from training.data.prepare import prepare_named, pretrained_encoders

        typer.echo(f"preparing {name} (split: {split}) ...", err=True)
        encoders = pretrained_encoders(paths) if encode else None
        prepare_named(source, paths, split=split, encoders=encoders)  # type: ignore[arg-type]
    return directory


def compose_run(dataset: str, model: str, set_: list[str], train_set: list[str], seed: int | None,
                corrupt: list[str] | None = None) -> RunConfig:  # fmt: skip
    """The run's configs from the command line; ``--train seed=...`` is refused, not silently overridden."""
    from training.config import compose

    overrides = Overrides.from_assignments(set_, train_set, corrupt or [])
    if seed is not None:
        if "seed" in overrides.train:
            fail(f"give the seed as --seed {overrides.train['seed']}, not --train seed=...")
        overrides = Overrides(model=overrides.model, train={**overrides.train, "seed": seed},
                              corruption=overrides.corruption)  # fmt: skip
    return compose(dataset, model, overrides)


def prepared(paths: Paths, dataset: str) -> Path:
    directory = paths.datasets / dataset
    if not (directory / "dataset.json").exists():
        source_and_split(dataset)  # an unknown name fails with the known ones
        fail(f"{dataset!r} is not a prepared dataset under {paths.datasets}; run `mmrec prepare {dataset}`")
    return directory


def run_directory(path: Path, *, model: str | None = None) -> Path:
    """``path`` if it is a training run directory (of ``model``); fails otherwise."""
    from training.runs import has_checkpoint, has_results, read_config

    if not path.is_dir() or not has_checkpoint(path) or not has_results(path):
        fail(f"{path} is not a training run directory (config.json, metrics.json and checkpoint.pt)")
    if model is not None and read_config(path).get("model") != model:
        fail(f"{path} is a {read_config(path).get('model')} run, not {model}")
    return path


def runs_root(path: Path | None) -> Path:
    if path is not None and not path.is_dir():
        fail(f"--runs {path}: not a directory")
    return path or default_paths().runs


# ----------------------------------------------------------------------------------------------------- commands
@app.command()
def prepare(
    dataset: Annotated[str, typer.Argument(help=DATASETS_HELP)],
    split: Annotated[str, typer.Option(help="default (the source's own split, else random 8:1:1), given, random, loo")] = "default",
    seed: Annotated[int, typer.Option(help="Seed of the random split.")] = 2024,
    encode: Annotated[bool, typer.Option(help="Encode item text (MiniLM) and images (EfficientNet-Lite0).")] = True,
) -> None:
    """Read a raw dataset, store its split and encode its item content into a prepared dataset."""
    from training.data.prepare import prepare_named, pretrained_encoders

    source, split_kind = source_and_split(dataset, split)
    paths = default_paths()
    encoders = pretrained_encoders(paths) if encode else None
    directory = prepare_named(source, paths, split=split_kind, seed=seed, encoders=encoders)  # type: ignore[arg-type]
    meta = json.loads((directory / "dataset.json").read_text())
    typer.echo(f"prepared {meta['name']} in {directory}")
    typer.echo(json.dumps({k: meta[k] for k in ("n_users", "n_items", "n_interactions", "split", "split_sizes",
                                                "modalities", "report")}, indent=2))  # fmt: skip


@app.command("config")
def config_command(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    dataset: Annotated[str | None, typer.Option(help="Show this dataset's presets (default: the [defaults] tables).")] = None,
) -> None:
    """List the model's and the trainer's settings: key, default, the value after presets.toml, and its source."""
    from training.config import describe

    if dataset is not None and not (default_paths().datasets / dataset / "dataset.json").exists():
        source_and_split(dataset)  # neither prepared nor a known source: fails with the known names
    rows = describe(model, dataset)
    typer.echo(f"{model}{' on ' + dataset if dataset else ''}: --set KEY=VALUE (model), --train KEY=VALUE (trainer)")
    width = max(len(r.key) for r in rows)
    for scope in ("model", "train"):
        typer.echo(f"\n{'--set' if scope == 'model' else '--train'} keys:")
        for row in (r for r in rows if r.scope == scope):
            preset = "" if row.note == "default" else f"  (presets.toml {row.note}: {json.dumps(row.value)})"
            typer.echo(f"  {row.key:<{width}}  {json.dumps(row.default)}{preset}")


@app.command("train")
def train_command(
    dataset: Annotated[str, typer.Option(help="Prepared dataset name (prepared on first use). " + DATASETS_HELP)],
    model: Annotated[str, typer.Option(help=MODEL_HELP)],
    set_: Annotated[list[str], typer.Option("--set", help=SET_HELP)] = [],  # noqa: B006
    train_set: Annotated[list[str], typer.Option("--train", help=TRAIN_HELP)] = [],  # noqa: B006
    seed: Annotated[int, typer.Option(help="Seed of initialisation and sampling.")] = 2024,
    tag: Annotated[str, typer.Option(help="Variant label (ablations); runs with a tag get their own row.")] = "",
    corrupt: Annotated[list[str], typer.Option("--corrupt", help=CORRUPT_HELP)] = [],  # noqa: B006
) -> None:
    """Train one model; writes a run directory with config, metrics, learning curve and checkpoint."""
    from training.data.dataset import InteractionDataset
    from training.fit.trainer import train

    run = compose_run(dataset, model, set_, train_set, seed, corrupt)
    paths = default_paths()
    directory = dataset_dir(paths, dataset)
    result = train(InteractionDataset.load(directory), model, dataset_dir=directory, model_config=run.model_config,
                   train_config=run.train, runs_root=paths.runs, tag=tag, corruption=run.corruption)  # fmt: skip
    typer.echo(json.dumps({"run_dir": str(result.run_dir), "best_epoch": result.best_epoch,
                           "stopped_by": result.stopped_by,
                           "valid": {k: round(v, 4) for k, v in result.valid.items() if "@20" in k},
                           "test": {k: round(v, 4) for k, v in result.test.items() if "@20" in k or "@10" in k}},
                          indent=2))  # fmt: skip
    warn_if_safety_capped(result.run_dir)


def warn_if_safety_capped(run_dir: Path | None) -> None:
    """Repeat the run's safety-cap warning on stderr (the cap is never the intended end of a run)."""
    from training.runs import read_metrics

    if run_dir is not None and "safety_cap" in (metrics := read_metrics(run_dir)):
        typer.secho(metrics["safety_cap"]["warning"], err=True, fg=typer.colors.RED, bold=True)


@app.command()
def tune(
    dataset: Annotated[str, typer.Option(help="Prepared dataset name. " + DATASETS_HELP)],
    model: Annotated[str, typer.Option(help=MODEL_HELP)],
    grid: Annotated[list[str], typer.Option(help="Model setting KEY=V1,V2,... (repeatable); the grid is their product.")],
    set_: Annotated[list[str], typer.Option("--set", help=SET_HELP)] = [],  # noqa: B006
    train_set: Annotated[list[str], typer.Option("--train", help=TRAIN_HELP)] = [],  # noqa: B006
    seed: Annotated[int, typer.Option(help="Seed.")] = 2024,
) -> None:
    """Train every grid point; report the one with the best VALIDATION Recall@20 (test is never looked at)."""
    import itertools

    from training.data.dataset import InteractionDataset
    from training.fit.trainer import train

    axes = {k: v.split(",") for k, v in parse_assignments(grid, option="--grid").items()}
    points = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    runs = [compose_run(dataset, model, [*set_, *(f"{k}={v}" for k, v in p.items())], train_set, seed) for p in points]
    paths = default_paths()
    directory = dataset_dir(paths, dataset)
    data = InteractionDataset.load(directory)
    results = []
    for point, run in zip(points, runs, strict=True):
        result = train(data, model, dataset_dir=directory, model_config=run.model_config, train_config=run.train,
                       runs_root=paths.runs)  # fmt: skip
        score = result.valid[run.train.select_metric]
        results.append((score, point, result.run_dir))
        typer.echo(f"{point}: valid {run.train.select_metric} {score:.4f} ({result.run_dir}, {result.stopped_by})")
        warn_if_safety_capped(result.run_dir)
    best = max(results, key=lambda r: r[0])
    typer.echo(f"best on validation: {best[1]} valid {runs[0].train.select_metric} {best[0]:.4f} ({best[2]})")


@app.command()
def results(
    out: Annotated[Path, typer.Option(help="Markdown file to write.")] = PROJECT_ROOT / "docs" / "results.md",
    runs: Annotated[Path | None, typer.Option(help="Runs root (default: $MMREC_HOME/runs).")] = None,
) -> None:
    """Record the run directories in the run ledger (docs/results-runs.jsonl), then regenerate the results tables."""
    from training.experiments.results import write_results

    docs = PROJECT_ROOT / "docs"
    text = write_results(runs_root(runs), out, docs / "results-notes.json", ledger_path=docs / "results-runs.jsonl",
                         recovered_path=docs / "results-recovered.json")  # fmt: skip
    typer.echo(text)


@app.command("qarm")
def qarm_command(
    dataset: Annotated[str, typer.Option(help="Prepared dataset with content modalities (e.g. ml100k-posters, lfm2k).")],
    cold_share: Annotated[float, typer.Option(help="Share of items held out of training entirely (0: warm split).")] = 0.0,
    cold_seed: Annotated[int, typer.Option(help="Seed of the cold-item draw.")] = 2024,
    set_: Annotated[list[str], typer.Option("--set", help="QARM setting KEY=VALUE, e.g. source=raw (`mmrec config qarm`).")] = [],  # noqa: B006
    train_set: Annotated[list[str], typer.Option("--train", help="Trainer setting KEY=VALUE (also for a LightGCN trained here).")] = [],  # noqa: B006
    align: Annotated[list[str], typer.Option("--align", help="Alignment setting KEY=VALUE, e.g. temperature=0.1.")] = [],  # noqa: B006
    seed: Annotated[int, typer.Option(help="Seed of the recommender's initialisation and sampling.")] = 2024,
    tag: Annotated[str, typer.Option(help="Variant label for docs/results.md (e.g. unaligned).")] = "",
) -> None:
    """QARM end to end (docs/qarm.md): mine pairs from LightGCN, align, residual k-means codes, train the code-based
    recommender; with --cold-share, evaluate on items held out of training. Writes qarm_report.json in the run."""
    from models.config import build_config
    from training.experiments.qarm_alignment import AlignmentTrainConfig
    from training.experiments.qarm_pipeline import QARM_REPORT, PipelineConfig, run_qarm
    from training.runs import report_file

    run = compose_run(dataset, "qarm", set_, train_set, seed)
    lightgcn = compose_run(dataset, "lightgcn", [], train_set, seed)
    align_config = build_config(AlignmentTrainConfig, parse_assignments(align, option="--align"))
    paths = default_paths()
    outcome = run_qarm(
        prepared(paths, dataset), runs_root=paths.runs, datasets_root=paths.datasets,
        model_config=run.model_settings(), train_config=run.train, align_config=align_config,
        pipeline_config=PipelineConfig(cold_share=cold_share, cold_seed=cold_seed),
        lightgcn_train_config=lightgcn.train, tag=tag, echo=typer.echo,
    )  # fmt: skip
    typer.echo(f"report: {report_file(outcome.run_dir, QARM_REPORT) if outcome.run_dir else '(no run directory)'}")


@app.command("qarm-report")
def qarm_report_command(
    out: Annotated[Path, typer.Option(help="Markdown file to write.")] = PROJECT_ROOT / "docs" / "qarm-results.md",
    runs: Annotated[Path | None, typer.Option(help="Runs root (default: $MMREC_HOME/runs).")] = None,
) -> None:
    """Regenerate the QARM tables (warm, cold start, alignment, quantiser) from the runs' qarm_report.json."""
    from training.experiments.reports import render_qarm_report

    text = render_qarm_report(runs_root(runs))
    out.write_text(text)
    typer.echo(text)


@app.command("cold-start")
def cold_start_command(
    dataset: Annotated[str, typer.Option(help="Prepared dataset name (under $MMREC_HOME/datasets).")],
    model: Annotated[list[str], typer.Option(help="Model to train and evaluate (repeatable). " + MODEL_HELP)],
    share: Annotated[float, typer.Option(help="Share of the items with interactions held out.")] = 0.1,
    split_seed: Annotated[int, typer.Option(help="Seed of the held-out item draw.")] = 2024,
    seed: Annotated[list[int], typer.Option(help="Training seed (repeatable).")] = [2024],  # noqa: B006
    train_set: Annotated[list[str], typer.Option("--train", help=TRAIN_HELP)] = [],  # noqa: B006
    out: Annotated[Path | None, typer.Option(help="JSON report (default docs/cold-start/<dataset>.json).")] = None,
    doc: Annotated[Path | None, typer.Option(help="Markdown with the table (default docs/cold-start.md).")] = None,
) -> None:
    """Every --model trained on one cold split and evaluated with the one cold-start protocol
    (training/experiments/cold_protocol.py, docs/cold-start.md); writes the JSON report and the table."""
    import shlex
    import sys

    from training.experiments import cold_start

    prepared(default_paths(), dataset)
    for name in model:  # every model's settings are checked before the first one trains
        compose_run(dataset, name, [], train_set, None)
    path = cold_start.record_cold_start(dataset, model, share=share, split_seed=split_seed, seeds=seed,
                                        train_set=train_set, out=out, doc=doc,
                                        command="mmrec " + shlex.join(sys.argv[1:]))  # fmt: skip
    typer.echo(f"wrote {path}")


@app.command("corrupt")
def corrupt_command(
    dataset: Annotated[list[str], typer.Option(help="Dataset (repeatable; default: ml100k-posters and lfm2k, prepared).")] = [],  # noqa: B006
    kind: Annotated[list[str], typer.Option(help="Corruption kind (repeatable; default: missing, swapped, noise).")] = [],  # noqa: B006
    fraction: Annotated[list[float], typer.Option(help="Share p of the items damaged (repeatable; default: 0, 0.2, 0.4).")] = [],  # noqa: B006
    model: Annotated[list[str], typer.Option(help="Benchmark model (repeatable; default: all of r2mr, r2mr-no-reviewer, r2mr-no-rewriter, freedom, lattice, vbpr, lightgcn).")] = [],  # noqa: B006
    seed: Annotated[list[int], typer.Option(help="Training and corruption seed (repeatable; default: 2024, 1, 2).")] = [],  # noqa: B006
    plan: Annotated[bool, typer.Option("--plan", help="List the runs of the slice (to train or reused) and train nothing.")] = False,
    jobs: Annotated[int, typer.Option(help="Cells trained at once, each in its own process (torch threads: the usable cores shared out, at most OMP_NUM_THREADS); 1: one at a time, in this process.")] = 1,
    out: Annotated[Path, typer.Option(help="Markdown to write (its ledgers and plots go in modality-quality/ beside it).")] = PROJECT_ROOT / "docs" / "modality-quality.md",
) -> None:
    """The corruption benchmark (docs/modality-quality.md): train every cell of the slice that has no run yet
    (resumable), then write the tables, the goals, the detectors' AUROC and the plot."""
    from training.experiments import corruption_benchmark as bench
    from training.experiments.modality_quality_report import write_page

    if jobs < 1:
        fail(f"--jobs {jobs}: must be at least 1")
    cells = bench.grid(*benchmark_slice(dataset, kind, fraction, model, seed))
    paths = default_paths()
    for name in dict.fromkeys(c.dataset for c in cells):
        prepared(paths, name)
    docs_dir = out.parent
    if plan:
        for cell, key in bench.unique_cells(cells, {}):
            recorded = any(e["key"] == key for e in bench.read_ledger(bench.ledger_path(docs_dir, cell.dataset),
                                                                       cell.dataset)["runs"].values())  # fmt: skip
            found = recorded or key in bench.finished_runs(paths.runs, cell.dataset, cell.model.model)
            typer.echo(f"{'reuse' if found else 'train'}: {cell.description}")
        return
    bench.run_cells(cells, datasets_root=paths.datasets, runs_root=paths.runs, docs_dir=docs_dir, echo=typer.echo,
                    after_each=lambda: write_page(docs_dir, out), jobs=jobs)  # fmt: skip
    typer.echo(f"wrote {write_page(docs_dir, out)}")


def benchmark_slice(datasets: list[str], kinds: list[str], fractions: list[float], models: list[str],
                    seeds: list[int]) -> tuple[list[str], list[str], list[float], list[str], list[int]]:  # fmt: skip
    """The options of `mmrec corrupt` checked against the grid, defaults filled in."""
    from training.experiments import corruption_benchmark as bench

    for given, valid, option in ((datasets, bench.DATASETS, "--dataset"), (kinds, bench.KINDS, "--kind"),
                                 (fractions, bench.FRACTIONS, "--fraction"), (models, bench.MODEL_BY_LABEL, "--model")):  # fmt: skip
        unknown = [str(v) for v in given if v not in valid]
        if unknown:
            fail(f"{option} {unknown[0]}: not in the benchmark grid; valid: {', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in valid)}")
    return (datasets or list(bench.DATASETS), kinds or list(bench.KINDS), fractions or list(bench.FRACTIONS),
            models or list(bench.MODEL_BY_LABEL), seeds or list(bench.SEEDS))  # fmt: skip


@app.command("r2mr-report")
def r2mr_report_command(
    run_dir: Annotated[Path, typer.Argument(help="An r2mr training run directory.")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default docs/r2mr).")] = None,
) -> None:
    """The modality-quality report of an R2MR run (training/experiments/r2mr_report.py): Markdown and PNGs."""
    from training.experiments import r2mr_report

    r2mr_report.main(run_directory(run_dir, model="r2mr"), out)


@app.command("audit")
def audit_command(
    path: Annotated[Path, typer.Argument(help="An r2mr training run directory, or a bundle exported from one.")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default docs/modality-audit).")] = None,
    top: Annotated[int, typer.Option(help="Worst-judged items listed per modality in the report (and at most 8 "
                                          "images per row of the contact sheet).")] = 20,
) -> None:
    """The modality-quality audit of an R2MR model (training/experiments/modality_audit.py): items whose text or
    image its reviewer judges out of line with their users, worst first, and beside them the items least in line
    with their users' other items (the training-free user-profile cosine, from the run's interactions or the
    bundle's item metadata). Writes
    Markdown, a CSV of every item and a contact sheet of the images judged worst and best; on a corrupted run,
    precision@N and AUROC of both at finding the damaged items."""
    from training.experiments.modality_audit import write_audit

    files = write_audit(path, out or PROJECT_ROOT / "docs" / "modality-audit", top=top)
    typer.echo(f"report: {files.markdown}")
    typer.echo(f"csv: {files.csv}")
    typer.echo(f"contact sheet: {files.contact_sheet or '(none)'}")


@app.command("export")
def export_command(
    run_dir: Annotated[Path, typer.Argument(help="A training run directory (has checkpoint.pt).")],
    out: Annotated[Path, typer.Option(help="Bundle directory to write (replaced if it exists).")],
    modality_encoders: Annotated[bool, typer.Option(help="Include the ONNX text/image encoders (for raw-content ingestion).")] = True,
    exact_up_to: Annotated[int, typer.Option(help="Items up to which the index is exact (flat inner product); above it, approximate.")] = 200_000,
    approximate: Annotated[str, typer.Option(help="Approximate index above the threshold: ivf (IVF-Flat, L2 over the vectors with one coordinate appended: inner-product order), ivf-ip (IVF-Flat under the inner product, as before) or hnsw.")] = "ivf",
    target_recall: Annotated[float, typer.Option(help="recall@20 against exact search that the approximate index's nprobe / efSearch must reach.")] = 0.95,
    text_encoder_precision: Annotated[str, typer.Option(help="The text encoder graph: int8-dynamic (MatMul weights in int8, half the CPU of a text) or fp32.")] = "int8-dynamic",
    image_encoder_precision: Annotated[str, typer.Option(help="The image encoder graph: fp32, or int8-static (int8 weights and activations, scales calibrated on 300 of the dataset's images).")] = "fp32",
) -> None:
    """Export a run as a bundle: manifest, FAISS index, arrays and ONNX graphs (docs/bundle-format.md).

    The option defaults are IndexConfig's (training/export/item_index.py; a test keeps them equal)."""
    approximate_kinds: dict[str, Literal["ivf", "ivf-ip", "hnsw"]] = {"ivf": "ivf", "ivf-ip": "ivf-ip", "hnsw": "hnsw"}
    if approximate not in approximate_kinds:
        fail(f"--approximate must be ivf, ivf-ip or hnsw, got {approximate!r}")
    import bundle_format as bf

    if text_encoder_precision not in bf.TEXT_ENCODER_PRECISIONS:
        fail(f"--text-encoder-precision must be one of {', '.join(bf.TEXT_ENCODER_PRECISIONS)}, got {text_encoder_precision!r}")
    if image_encoder_precision not in bf.IMAGE_ENCODER_PRECISIONS:
        fail(f"--image-encoder-precision must be one of {', '.join(bf.IMAGE_ENCODER_PRECISIONS)}, got {image_encoder_precision!r}")
    run_directory(run_dir)
    from training.export.bundle import ExportConfig, export_run
    from training.export.item_index import IndexConfig

    index = IndexConfig(approximate_threshold=exact_up_to, approximate=approximate_kinds[approximate],
                        target_recall_at_20=target_recall)  # fmt: skip
    text_precision: bf.EncoderPrecision = bf.INT8_DYNAMIC if text_encoder_precision == bf.INT8_DYNAMIC else bf.FP32
    image_precision: bf.EncoderPrecision = bf.INT8_STATIC if image_encoder_precision == bf.INT8_STATIC else bf.FP32
    bundle = export_run(run_dir, out, config=ExportConfig(include_modality_encoders=modality_encoders, index=index,
                                                          text_encoder_precision=text_precision,
                                                          image_encoder_precision=image_precision))  # fmt: skip
    manifest = json.loads((bundle / bf.MANIFEST).read_text())
    typer.echo(f"bundle {manifest['bundle_version']} written to {bundle}")


def _default_demo_dataset(paths: Paths) -> str:
    return "ml100k-posters" if (paths.data_root / "ml100k-posters").is_dir() else "ml100k"


EPOCHS_HELP = (f"Epoch cap (default {DEMO_EPOCHS}: early stopping, patience 20 evaluations, ends the run; LightGCN "
               "on ml100k-posters stops near epoch 90, about 50 s); the best validation epoch is exported.")  # fmt: skip
SAFETY_HELP = "Wall-clock safety cap in minutes (0: none); if it fires, the output says so loudly."


@app.command()
def pipeline(
    dataset: Annotated[str | None, typer.Option(help="Dataset (default: ml100k-posters if the shared data is there, else ml100k from the recbole wheel).")] = None,
    model: Annotated[str, typer.Option(help="Model to train. " + MODEL_HELP)] = "lightgcn",
    bundle_out: Annotated[Path | None, typer.Option(help="Bundle directory (default: $MMREC_HOME/bundles/<dataset>-<model>).")] = None,
    epochs: Annotated[int, typer.Option(help=EPOCHS_HELP)] = DEMO_EPOCHS,
    safety_minutes: Annotated[float, typer.Option(help=SAFETY_HELP)] = 0.0,
) -> None:
    """Prepare the dataset, train the model (selected on validation), export the bundle. Prints the bundle path."""
    from training.data.dataset import InteractionDataset
    from training.export.bundle import export_run
    from training.fit.trainer import train

    paths = default_paths()
    name = dataset or _default_demo_dataset(paths)
    settings = [*DEMO_TRAIN.get(model, ()), f"epochs={epochs}", f"max_minutes={safety_minutes}"]
    run = compose_run(name, model, [], settings, None)
    directory = dataset_dir(paths, name)
    result = train(InteractionDataset.load(directory), model, dataset_dir=directory, model_config=run.model_config,
                   train_config=run.train, runs_root=paths.runs, tag="")  # fmt: skip
    assert result.run_dir is not None
    typer.echo(f"trained {model} on {name}: best epoch {result.best_epoch} of {epochs} (stopped by {result.stopped_by}), "
               f"valid recall@20 {result.valid['recall@20']:.4f}, test recall@20 {result.test['recall@20']:.4f}")  # fmt: skip
    warn_if_safety_capped(result.run_dir)
    bundle = export_run(result.run_dir, bundle_out or paths.bundles / f"{name}-{model}")
    typer.echo(f"bundle: {bundle}")


def check_port_free(host: str, port: int) -> None:
    """Fail with one line if ``host:port`` cannot be listened on (busy, or not an address of this machine).

    Binds and closes a socket with SO_REUSEADDR, as uvicorn does, so a port whose last server just stopped
    (connections in TIME_WAIT) counts as free."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        fail(f"--host {host}: not an address ({exc.strerror})")
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                fail(f"port {port} on {host} is already in use (another mmrec demo or server?); stop it, or pick "
                     "another with --port (make demo DEMO_ARGS='--port 8001')")  # fmt: skip
            fail(f"cannot listen on {host}:{port}: {exc.strerror}")


@app.command()
def demo(
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8000,
    dataset: Annotated[str | None, typer.Option(help="Dataset (default: ml100k-posters if the shared data is there, else ml100k from the recbole wheel).")] = None,
    model: Annotated[str, typer.Option(help="Model to train. " + MODEL_HELP)] = "lightgcn",
    retrain: Annotated[bool, typer.Option("--retrain", help="Train and export again even if a valid bundle of this dataset and model exists.")] = False,
    epochs: Annotated[int, typer.Option(help=EPOCHS_HELP)] = DEMO_EPOCHS,
    safety_minutes: Annotated[float, typer.Option(help=SAFETY_HELP)] = 0.0,
) -> None:
    """The main job: prepare the default data, train, export, then serve the bundle over REST.

    A re-run serves the bundle it exported before ($MMREC_HOME/bundles/<dataset>-<model>) when that bundle is
    intact and matches the prepared dataset; --retrain trains again. Prepared datasets and encoded item features
    are always reused. The port is checked before any work. Serves with the embedded in-process cache unless
    REDIS_URL (or MMREC_REDIS_URL) is set.
    """
    import os
    import shutil

    from training.export.reuse import bundle_problem
    from training.settings import redis_url

    check_port_free(host, port)
    if model not in MODEL_NAMES:
        fail(f"unknown model {model!r}; valid models: {', '.join(sorted(MODEL_NAMES))}")
    paths = default_paths()
    name = dataset or _default_demo_dataset(paths)
    if not (paths.datasets / name / "dataset.json").exists():
        source_and_split(name)  # neither prepared nor a known source: fails before any work
    bundle = paths.bundles / f"{name}-{model}"
    problem = "--retrain" if retrain else bundle_problem(bundle, model=model, dataset=name,
                                                          prepared_dir=paths.datasets / name)  # fmt: skip
    if problem is None:
        typer.echo(f"serving the existing bundle {bundle} (`mmrec demo --retrain` trains a new one)", err=True)
    else:
        typer.echo(f"training {model} on {name} ({problem})", err=True)
        pipeline(dataset=name, model=model, bundle_out=bundle, epochs=epochs, safety_minutes=safety_minutes)
    serve = shutil.which("mmrec-serve") or str(Path(sys.executable).with_name("mmrec-serve"))
    args = [serve, "--bundle", str(bundle), "--host", host, "--port", str(port),
            "--state-dir", str(paths.home / "state" / bundle.name)]  # fmt: skip
    if url := redis_url():
        args += ["--redis-url", url]
    typer.echo("starting: " + " ".join(args))
    os.execv(serve, args)


if __name__ == "__main__":
    app()
