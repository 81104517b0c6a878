"""The `mmrec` command line: a mistake in what was asked prints one line and exits 2, before any work starts;
`--debug` shows the traceback; `mmrec config` lists the settings; `mmrec --help` imports no torch."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from models import MODELS
from models.config import ConfigError
from training.cli import app, export_command
from training.config import MODEL_NAMES, SOURCE_NAMES, TrainConfig, compose
from training.data.sources import SOURCES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty MMREC_HOME and a raw-data root without any dataset."""
    monkeypatch.setenv("MMREC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MMREC_DATA_ROOT", str(tmp_path / "no-data"))
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path / "home"


def refused(args: list[str]) -> str:
    """The one line that `mmrec ARGS` printed on its way to exit status 2."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output  # one clear line, no traceback
    assert lines[0].startswith("Error: ")
    return lines[0].removeprefix("Error: ")


@pytest.mark.parametrize("command", [
    ["train", "--dataset", "not-prepared", "--model", "bpr", "--train", "seed=1"],
    ["tune", "--dataset", "not-prepared", "--model", "bpr", "--grid", "reg_weight=1e-3", "--train", "seed=1"],
    ["qarm", "--dataset", "not-prepared", "--train", "seed=1"],
])  # fmt: skip
def test_a_seed_given_as_a_trainer_setting_is_refused(command: list[str], home: Path) -> None:
    assert refused(command) == "give the seed as --seed 1, not --train seed=..."
    assert not home.exists()  # nothing was prepared or written before the refusal


KNOWN = "known: ml100k-posters, ml100k, lfm2k, amazon-baby, amazon-scientific (add -seq for leave-one-out)"


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--dataset", "nope", "--model", "bpr"], f"unknown dataset 'nope'; {KNOWN}, or a folder in MMRec format"),
    (["prepare", "nope"], f"unknown dataset 'nope'; {KNOWN}, or a folder in MMRec format"),
    (["config", "bpr", "--dataset", "nope"], f"unknown dataset 'nope'; {KNOWN}, or a folder in MMRec format"),
    (["prepare", "ml100k-posters-seq", "--split", "random"],
     "ml100k-posters-seq is ml100k-posters with the leave-one-out split; --split random contradicts it"),
    (["prepare", "lfm2k", "--split", "weekly"], "--split 'weekly': expected default, given, random or loo"),
    (["qarm", "--dataset", "lfm2k"], "'lfm2k' is not a prepared dataset under {home}/datasets; run `mmrec prepare lfm2k`"),
    (["cold-start", "--dataset", "lfm2k", "--model", "vbpr"],
     "'lfm2k' is not a prepared dataset under {home}/datasets; run `mmrec prepare lfm2k`"),
])  # fmt: skip
def test_an_unknown_or_unprepared_dataset_is_refused(args: list[str], message: str, home: Path) -> None:
    assert refused(args) == message.format(home=home)


MODELS_LINE = "unknown model 'nope'; valid models: " + ", ".join(sorted(MODEL_NAMES))


@pytest.mark.parametrize("args", [
    ["train", "--dataset", "lfm2k", "--model", "nope"],
    ["tune", "--dataset", "lfm2k", "--model", "nope", "--grid", "reg_weight=1"],
    ["config", "nope"],
    ["cold-start", "--dataset", "lfm2k", "--model", "nope"],
])  # fmt: skip
def test_an_unknown_model_is_refused(args: list[str], home: Path) -> None:
    if args[0] == "cold-start":  # the dataset is checked first: make it look prepared
        (home / "datasets" / "lfm2k").mkdir(parents=True)
        (home / "datasets" / "lfm2k" / "dataset.json").write_text("{}")
    assert refused(args) == MODELS_LINE


LIGHTGCN_KEYS = "valid: embedding_size, n_layers, reg_weight (`mmrec config lightgcn` lists them with defaults)"
TRAIN_KEYS = ", ".join(TrainConfig.__dataclass_fields__)


@pytest.mark.parametrize(("options", "message"), [
    (["--set", "n_layer=3"], f"--set: lightgcn has no model setting 'n_layer'; {LIGHTGCN_KEYS}"),
    (["--set", "n_layers=three"], "--set: lightgcn model setting n_layers='three': expected int"),
    (["--set", "n_layers"], "--set 'n_layers': expected KEY=VALUE"),
    (["--train", "epoch=3"], f"--train: lightgcn has no trainer setting 'epoch'; valid: {TRAIN_KEYS} "
                             "(`mmrec config lightgcn` lists them with defaults)"),
    (["--train", "progress=maybe"], "--train: lightgcn trainer setting progress='maybe': expected true or false"),
    (["--grid", "n_layer=1,2"], f"--set: lightgcn has no model setting 'n_layer'; {LIGHTGCN_KEYS}"),
])  # fmt: skip
def test_a_bad_setting_is_refused_with_the_valid_keys(options: list[str], message: str, home: Path) -> None:
    command = "tune" if options[0] == "--grid" else "train"
    assert refused([command, "--dataset", "lfm2k", "--model", "lightgcn", *options]) == message
    assert not home.exists()


def test_a_bad_value_in_presets_names_the_table(tmp_path: Path) -> None:
    presets = tmp_path / "presets.toml"
    presets.write_text("[small.lightgcn]\nn_layers = 'two'\n")
    with pytest.raises(ConfigError, match=r"^presets.toml \[small.lightgcn\]: lightgcn model setting n_layers='two'"):
        compose("small", "lightgcn", presets=presets)


def test_missing_raw_data_is_refused(home: Path, tmp_path: Path) -> None:
    message = refused(["prepare", "lfm2k", "--no-encode"])
    assert message == f"{tmp_path / 'no-data' / 'lfm2k'} not found: set MMREC_DATA_ROOT to the folder that holds the raw datasets"


@pytest.mark.parametrize("command", [["export", "{dir}", "--out", "{dir}/bundle"], ["r2mr-report", "{dir}"]])
def test_a_folder_that_is_not_a_run_is_refused(command: list[str], home: Path, tmp_path: Path) -> None:
    args = [part.format(dir=tmp_path) for part in command]
    assert refused(args) == f"{tmp_path} is not a training run directory (config.json, metrics.json and checkpoint.pt)"


def test_a_run_of_another_model_is_refused_by_the_r2mr_report(home: Path, tmp_path: Path) -> None:
    for name, text in (("config.json", json.dumps({"model": "bpr"})), ("metrics.json", "{}"), ("checkpoint.pt", "")):
        (tmp_path / name).write_text(text)
    assert refused(["r2mr-report", str(tmp_path)]) == f"{tmp_path} is a bpr run, not r2mr"


@pytest.mark.parametrize("command", ["results", "qarm-report"])
def test_a_runs_root_that_is_not_a_folder_is_refused(command: str, home: Path, tmp_path: Path) -> None:
    assert refused([command, "--runs", str(tmp_path / "absent"), "--out", str(tmp_path / "out.md")]) == (
        f"--runs {tmp_path / 'absent'}: not a directory")


def test_export_refuses_an_unknown_index_kind(home: Path, tmp_path: Path) -> None:
    assert refused(["export", str(tmp_path), "--out", str(tmp_path / "b"), "--approximate", "lsh"]) == (
        "--approximate must be ivf, ivf-ip or hnsw, got 'lsh'")


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--text-encoder-precision", "int4", "--text-encoder-precision must be one of fp32, int8-dynamic, got 'int4'"),
    ("--image-encoder-precision", "int8-dynamic",
     "--image-encoder-precision must be one of fp32, int8-static, got 'int8-dynamic'"),
])  # fmt: skip
def test_export_refuses_an_encoder_precision_it_does_not_write(home: Path, tmp_path: Path, option: str, value: str,
                                                               message: str) -> None:  # fmt: skip
    assert refused(["export", str(tmp_path), "--out", str(tmp_path / "b"), option, value]) == message


@pytest.mark.parametrize(("parameter", "expected"), [("text_encoder_precision", "int8-dynamic"),
                                                     ("image_encoder_precision", "fp32")])  # fmt: skip
def test_export_encoder_precision_defaults_to_the_export_config_default(parameter: str, expected: str) -> None:
    from training.export.bundle import ExportConfig

    default = inspect.signature(export_command).parameters[parameter].default
    assert default == getattr(ExportConfig(), parameter) == expected


def test_debug_shows_the_traceback_instead(home: Path) -> None:
    result = CliRunner().invoke(app, ["--debug", "train", "--dataset", "lfm2k", "--model", "nope"])
    assert result.exit_code == 1
    assert isinstance(result.exception, ConfigError) and str(result.exception) == MODELS_LINE


def test_config_lists_keys_defaults_and_preset_values(home: Path) -> None:
    result = CliRunner().invoke(app, ["config", "r2mr", "--dataset", "ml100k-posters"])
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.split()) for line in result.output.splitlines()]
    assert "feature_dim 384 (presets.toml [defaults.r2mr]: 128)" in lines  # R2MRConfig's default, then the preset
    assert "batch_size 2048 (presets.toml [ml100k-posters.r2mr.train]: 4096)" in lines
    assert "epochs 1000 (presets.toml [defaults.train]: 1000)" in lines
    assert "max_minutes 0.0" in lines and "reviewer true" in lines


def test_help_of_set_and_train_points_to_mmrec_config() -> None:
    text = " ".join(CliRunner().invoke(app, ["train", "--help"]).output.split())
    text = re.sub(r"(?<=[a-z])- (?=[a-z])", "-", text)
    assert "`mmrec config MODEL [--dataset D]` lists keys, defaults, presets" in text
    assert "e.g. epochs=200; `mmrec config MODEL` lists them" in text


def test_prepare_help_names_every_dataset_the_readme_uses() -> None:
    readme = (REPO / "README.md").read_text()
    names = set(re.findall(r"^\| `([a-z0-9-]+)` \|", readme, flags=re.MULTILINE))
    assert {"ml100k-posters", "ml100k-posters-seq", "lfm2k"} <= names
    text = " ".join(CliRunner().invoke(app, ["prepare", "--help"]).output.split())
    text = re.sub(r"(?<=[a-z])- (?=[a-z])", "-", text)  # "amazon- scientific": wrapped at the hyphen
    assert all(name in text for name in names), names


def test_the_help_texts_name_exactly_the_registered_models_and_sources() -> None:
    assert set(MODEL_NAMES) == set(MODELS)
    assert set(SOURCE_NAMES) == set(SOURCES)


def test_export_defaults_are_the_index_config_defaults() -> None:
    from training.export.item_index import IndexConfig

    defaults = {name: p.default for name, p in inspect.signature(export_command).parameters.items()}
    config = IndexConfig()
    assert (defaults["exact_up_to"], defaults["approximate"], defaults["target_recall"]) == (
        config.approximate_threshold, config.approximate, config.target_recall_at_20)


def test_mmrec_help_imports_no_torch() -> None:
    code = ("import sys; from typer.testing import CliRunner; from training.cli import app; "
            "assert CliRunner().invoke(app, ['--help']).exit_code == 0; "
            "print(sorted(m for m in ('torch', 'numpy', 'scipy', 'faiss') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_reports_a_fired_safety_cap_loudly(home: Path) -> None:
    from synthetic_datasets import multimodal_dataset

    multimodal_dataset().save(home / "datasets" / "synthetic-mm")
    result = CliRunner().invoke(app, ["train", "--dataset", "synthetic-mm", "--model", "bpr", "--train", "epochs=5",
                                      "--train", "max_minutes=1e-9", "--train", "progress=false"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{") :])["stopped_by"] == "safety_cap"
    assert ("WARNING: the 1e-09-minute wall-clock safety cap stopped training at epoch 1 of 5; this model depends on "
            "how busy the machine was (cap runs with epochs, not minutes)") in result.stderr  # fmt: skip


def test_pipeline_trains_the_stated_number_of_epochs(home: Path, tmp_path: Path) -> None:
    from synthetic_datasets import multimodal_dataset

    multimodal_dataset().save(home / "datasets" / "synthetic-mm")
    result = CliRunner().invoke(app, ["pipeline", "--dataset", "synthetic-mm", "--model", "bpr", "--epochs", "3",
                                      "--bundle-out", str(tmp_path / "bundle")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "of 3 (stopped by epochs)" in result.stdout and "WARNING" not in result.output
    (run,) = (home / "runs" / "synthetic-mm" / "bpr").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["epochs_run"], metrics["stopped_by"]) == (3, "epochs")
    assert json.loads((run / "config.json").read_text())["train_config"]["max_minutes"] == 0.0
