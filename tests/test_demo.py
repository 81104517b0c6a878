"""`mmrec demo` re-runs: an intact bundle of the dataset and model is served again without training; --retrain, a
damaged or stale bundle trains; a busy port is refused with one line before any work."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.cli import app
from training.export.reuse import bundle_problem

DATASET = "synthetic-mm"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with the prepared synthetic dataset and its bpr bundle, exported once for the module."""
    from synthetic_datasets import multimodal_dataset

    home = tmp_path_factory.mktemp("demo-home")
    multimodal_dataset().save(home / "datasets" / DATASET)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMREC_HOME", str(home))
        result = CliRunner().invoke(
            app, ["pipeline", "--dataset", DATASET, "--model", "bpr", "--epochs", "2"]
        )
    assert result.exit_code == 0, result.output
    return home


@pytest.fixture()
def home(exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the exported home (tests damage it), with os.execv recorded instead of replacing pytest."""
    copy = tmp_path / "home"
    shutil.copytree(exported, copy)
    monkeypatch.setenv("MMREC_HOME", str(copy))
    monkeypatch.setenv("MMREC_DATA_ROOT", str(tmp_path / "no-data"))
    return copy


@pytest.fixture()
def served(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda path, args: calls.append(list(args)))
    return calls


@pytest.fixture()
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def runs(home: Path) -> list[Path]:
    return sorted((home / "runs" / DATASET / "bpr").iterdir())


def demo(port: int, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["demo", "--dataset", DATASET, "--model", "bpr", "--epochs", "1",
                                      "--port", str(port), *extra])  # fmt: skip
    return result.exit_code, result.output


def test_a_rerun_serves_the_existing_bundle_without_training(
    home: Path, served: list[list[str]], free_port: int
) -> None:
    before = runs(home)
    code, output = demo(free_port)
    assert code == 0, output
    assert f"serving the existing bundle {home / 'bundles' / (DATASET + '-bpr')}" in output
    assert runs(home) == before  # nothing trained
    (args,) = served
    assert args[args.index("--bundle") + 1] == str(home / "bundles" / f"{DATASET}-bpr")
    assert args[args.index("--port") + 1] == str(free_port)


def test_retrain_trains_a_new_bundle(home: Path, served: list[list[str]], free_port: int) -> None:
    before = runs(home)
    code, output = demo(free_port, "--retrain")
    assert code == 0, output
    assert f"training bpr on {DATASET} (--retrain)" in output
    assert len(runs(home)) == len(before) + 1 and len(served) == 1


def test_a_damaged_bundle_is_retrained(home: Path, served: list[list[str]], free_port: int) -> None:
    bundle = home / "bundles" / f"{DATASET}-bpr"
    with (bundle / "popularity.npy").open("ab") as f:
        f.write(b"\0")
    before = runs(home)
    code, output = demo(free_port)
    assert code == 0, output
    assert "does not match its sha256 in the manifest" in output
    assert len(runs(home)) == len(before) + 1
    assert bundle_problem(bundle, model="bpr", dataset=DATASET) is None  # the new export replaced it


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda b: (b / "item_ids.json").unlink(), "bundle file {b}/item_ids.json is missing"),
    (lambda b: (b / "manifest.json").write_text("{"), "{b}/manifest.json is not readable JSON"),
    (lambda b: shutil.rmtree(b), "no bundle at {b}"),
])  # fmt: skip
def test_bundle_problem_names_what_is_wrong(home: Path, damage: object, expected: str) -> None:
    bundle = home / "bundles" / f"{DATASET}-bpr"
    assert (
        bundle_problem(bundle, model="bpr", dataset=DATASET, prepared_dir=home / "datasets" / DATASET) is None
    )
    damage(bundle)  # type: ignore[operator]
    problem = bundle_problem(bundle, model="bpr", dataset=DATASET)
    assert problem is not None and problem.startswith(expected.format(b=bundle))


def test_bundle_problem_refuses_another_model_dataset_or_a_re_prepared_dataset(home: Path) -> None:
    bundle = home / "bundles" / f"{DATASET}-bpr"
    assert (
        bundle_problem(bundle, model="lightgcn", dataset=DATASET)
        == f"the bundle at {bundle} is a bpr bundle, not lightgcn"
    )
    assert (
        bundle_problem(bundle, model="bpr", dataset="ml100k")
        == f"the bundle at {bundle} was trained on {DATASET}, not ml100k"
    )
    meta_path = home / "datasets" / DATASET / "dataset.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "n_items": meta["n_items"] + 1}))
    problem = bundle_problem(bundle, model="bpr", dataset=DATASET, prepared_dir=home / "datasets" / DATASET)
    assert problem is not None and "n_items" in problem


@pytest.fixture()
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_a_busy_port_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                served: list[list[str]], busy_port: int) -> None:  # fmt: skip
    monkeypatch.setenv("MMREC_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setenv("MMREC_DATA_ROOT", str(tmp_path / "no-data"))
    result = CliRunner().invoke(app, ["demo", "--port", str(busy_port), "--retrain"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"Error: port {busy_port} on 127.0.0.1 is already in use (another mmrec demo or server?); stop it, or pick "
        "another with --port (make demo DEMO_ARGS='--port 8001')"]  # fmt: skip
    assert not (tmp_path / "empty-home").exists() and not served


def test_an_unknown_model_or_dataset_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                served: list[list[str]], free_port: int) -> None:  # fmt: skip
    monkeypatch.setenv("MMREC_HOME", str(tmp_path / "empty-home"))
    for args, message in (
        (["--model", "nope"], "unknown model 'nope'"),
        (["--dataset", "nope"], "unknown dataset 'nope'"),
    ):
        result = CliRunner().invoke(app, ["demo", "--port", str(free_port), *args])
        assert result.exit_code == 2 and result.output.startswith(f"Error: {message}"), result.output
    assert not (tmp_path / "empty-home").exists() and not served
