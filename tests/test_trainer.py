"""The trainer on a small synthetic dataset (a few epochs, CPU): the run directory, repeatability, rebuilding the
model from its checkpoint, selection on validation; and the results table's choice of grid point."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from training.data.dataset import TEST, VALID, InteractionDataset, Modality
from training.data.splits import random_811
from training.experiments.results import read_ledger, read_runs, render, write_results
from training.fit.evaluator import FullRankingEvaluator
from training.fit.trainer import Callback, ClipGradNorm, TrainConfig, Trainer, TrainResult, train
from training.runs import load_run

N_USERS, N_ITEMS = 40, 60
FAST = TrainConfig(epochs=5, batch_size=64, learning_rate=0.01, patience=100, device="cpu", progress=False, seed=11)
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "popularity": {},
    "bpr": {"embedding_size": 8},
    "lightgcn": {"embedding_size": 8, "n_layers": 1},
    "vbpr": {"embedding_size": 8},
}


def synthetic_dataset(*, modalities: bool = True) -> InteractionDataset:
    """40 users in two taste groups (items 0–29 vs 30–59), 10 interactions each, random 8:1:1 split; a 4-d
    "text" modality missing for items 0 and 1."""
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(N_USERS):
        group = u % 2
        liked = rng.choice(30, 8, replace=False) + 30 * group
        other = rng.choice(30, 2, replace=False) + 30 * (1 - group)
        users += [u] * 10
        items += [*liked, *other]
    user = np.array(users, dtype=np.int64)
    mods = {}
    if modalities:
        present = np.ones(N_ITEMS, dtype=bool)
        present[:2] = False
        features = rng.normal(size=(N_ITEMS, 4)).astype(np.float32) * present[:, None]
        mods["text"] = Modality("text", features, present, "synthetic")
    return InteractionDataset(
        name="synthetic" if modalities else "synthetic-ids",
        split_name="random-811-seed1",
        sequential=False,
        user_ids=[f"u{u}" for u in range(N_USERS)],
        item_ids=[f"i{i}" for i in range(N_ITEMS)],
        user=user,
        item=np.array(items, dtype=np.int64),
        timestamp=np.arange(user.size, dtype=np.int64),
        split=random_811(user, seed=1),
        item_text=[None] * N_ITEMS,
        item_image=[None] * N_ITEMS,
        modalities=mods,
    )


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("datasets") / "synthetic"
    synthetic_dataset().save(directory)
    return directory


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


_RUNS: dict[str, TrainResult] = {}


def trained(model: str, dataset_dir: Path, runs_root: Path) -> TrainResult:
    """One finished run per model, shared by the tests of this module."""
    if model not in _RUNS:
        data = InteractionDataset.load(dataset_dir)
        _RUNS[model] = train(data, model, dataset_dir=dataset_dir, model_config=MODEL_CONFIGS[model],
                             train_config=FAST, runs_root=runs_root)  # fmt: skip
    return _RUNS[model]


@pytest.mark.parametrize("model", list(MODEL_CONFIGS))
def test_train_writes_the_run_directory(model: str, dataset_dir: Path, runs_root: Path) -> None:
    result = trained(model, dataset_dir, runs_root)
    assert result.run_dir is not None
    assert result.run_dir.parent == runs_root / "synthetic" / model
    assert {p.name for p in result.run_dir.iterdir()} == {"config.json", "metrics.json", "curve.png", "checkpoint.pt"}
    assert (result.run_dir / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["model"] == model and config["dataset"]["dir"] == str(dataset_dir)
    assert config["train_config"]["epochs"] == 5
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert {"best_epoch", "valid", "test", "history", "select_metric", "wall_seconds"} <= set(metrics)
    assert metrics["best_epoch"] == result.best_epoch
    assert metrics["valid"] == result.valid and metrics["test"] == result.test
    assert set(result.valid) == {f"{m}@{k}" for m in ("recall", "ndcg", "precision", "map", "hit", "mrr")
                                 for k in (5, 10, 20, 50)}  # fmt: skip


@pytest.mark.parametrize("model", ["bpr", "lightgcn", "vbpr"])
def test_train_history_has_one_validation_per_epoch(model: str, dataset_dir: Path, runs_root: Path) -> None:
    result = trained(model, dataset_dir, runs_root)
    assert result.run_dir is not None
    history = json.loads((result.run_dir / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(h["loss"]) for h in history)
    assert all("test" not in h for h in history)  # the test split is never part of what selection sees


def test_train_popularity_is_evaluated_once_without_training(dataset_dir: Path, runs_root: Path) -> None:
    result = trained("popularity", dataset_dir, runs_root)
    assert result.run_dir is not None
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["best_epoch"] == 0 and metrics["epochs_run"] == 0
    assert [h["epoch"] for h in metrics["history"]] == [0] and metrics["history"][0]["loss"] is None


@pytest.mark.parametrize("model", ["bpr", "lightgcn", "vbpr"])
def test_train_best_epoch_is_the_first_best_validation_epoch(model: str, dataset_dir: Path, runs_root: Path) -> None:
    result = trained(model, dataset_dir, runs_root)
    assert result.run_dir is not None
    history = json.loads((result.run_dir / "metrics.json").read_text())["history"]
    recall = [h["valid"]["recall@20"] for h in history]
    assert result.best_epoch == history[int(np.argmax(recall))]["epoch"]
    assert result.valid == history[int(np.argmax(recall))]["valid"]


@pytest.mark.parametrize("model", ["bpr", "vbpr"])
def test_train_returns_the_best_validation_state(model: str, dataset_dir: Path, runs_root: Path) -> None:
    # the returned model is the best-validation epoch's: evaluating it again gives the reported metrics
    result = trained(model, dataset_dir, runs_root)
    data = InteractionDataset.load(dataset_dir)
    assert FullRankingEvaluator(data, split=VALID).evaluate(result.model).metrics == pytest.approx(result.valid)
    assert FullRankingEvaluator(data, split=TEST).evaluate(result.model).metrics == pytest.approx(result.test)


@pytest.mark.parametrize("model", list(MODEL_CONFIGS))
def test_load_run_rebuilds_the_trained_model(model: str, dataset_dir: Path, runs_root: Path) -> None:
    result = trained(model, dataset_dir, runs_root)
    assert result.run_dir is not None
    loaded = load_run(result.run_dir)
    assert loaded.model_name == model and not loaded.model.training
    assert loaded.metrics["best_epoch"] == result.best_epoch
    with torch.no_grad():
        expected, actual = result.model.representations(), loaded.model.representations()
    assert expected.users is not None and actual.users is not None
    torch.testing.assert_close(actual.users, expected.users, rtol=0, atol=0)
    torch.testing.assert_close(actual.items, expected.items, rtol=1e-6, atol=1e-7)


def test_train_same_seed_gives_identical_metrics(dataset_dir: Path) -> None:
    data = InteractionDataset.load(dataset_dir)
    runs = [train(data, "bpr", dataset_dir=dataset_dir, model_config=MODEL_CONFIGS["bpr"], train_config=FAST,
                  runs_root=None) for _ in range(2)]  # fmt: skip
    assert runs[0].run_dir is None  # no runs root: nothing written
    assert (runs[0].best_epoch, runs[0].valid, runs[0].test) == (runs[1].best_epoch, runs[1].valid, runs[1].test)
    for a, b in zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = train(data, "bpr", dataset_dir=dataset_dir, model_config=MODEL_CONFIGS["bpr"],
                  train_config=replace(FAST, seed=12), runs_root=None)  # fmt: skip
    assert not torch.equal(other.model.state_dict()["user_embedding.weight"],
                           runs[0].model.state_dict()["user_embedding.weight"])  # fmt: skip


def test_train_vbpr_refuses_a_dataset_without_modalities(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vbpr needs item modalities and synthetic-ids has none"):
        train(synthetic_dataset(modalities=False), "vbpr", dataset_dir=tmp_path, train_config=FAST, runs_root=None)


def test_train_reports_why_it_stopped(dataset_dir: Path, runs_root: Path) -> None:
    result = trained("bpr", dataset_dir, runs_root)
    assert result.run_dir is not None and result.stopped_by == "epochs"
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["stopped_by"] == "epochs" and "safety_cap" not in metrics
    assert trained("popularity", dataset_dir, runs_root).stopped_by == "nothing_to_train"


def test_train_stops_early_after_patience_evaluations_without_improvement(dataset_dir: Path) -> None:
    data = InteractionDataset.load(dataset_dir)
    result = train(data, "bpr", dataset_dir=dataset_dir, model_config=MODEL_CONFIGS["bpr"],
                   train_config=replace(FAST, epochs=200, patience=2), runs_root=None)  # fmt: skip
    assert result.stopped_by == "early_stopping"


def test_the_safety_cap_is_reported_loudly_in_metrics(dataset_dir: Path, tmp_path: Path) -> None:
    data = InteractionDataset.load(dataset_dir)
    result = train(data, "bpr", dataset_dir=dataset_dir, model_config=MODEL_CONFIGS["bpr"],
                   train_config=replace(FAST, max_minutes=1e-9), runs_root=tmp_path)  # fmt: skip
    assert result.run_dir is not None and result.stopped_by == "safety_cap"
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["stopped_by"] == "safety_cap" and metrics["epochs_run"] == 1
    assert metrics["safety_cap"]["epoch"] == 1 and metrics["safety_cap"]["epochs"] == FAST.epochs
    assert metrics["safety_cap"]["warning"].startswith("WARNING: the 1e-09-minute wall-clock safety cap stopped")


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.largest_gradient_norm = 0.0

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.calls.append(("start", epoch))

    def after_backward(self, trainer: Trainer) -> None:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.parameters if p.grad is not None]))
        self.largest_gradient_norm = max(self.largest_gradient_norm, float(norm))

    def on_evaluation(self, trainer: Trainer, entry: dict[str, Any]) -> None:
        self.calls.append(("evaluation", entry["epoch"]))

    def on_epoch_end(self, trainer: Trainer, epoch: int, loss: float) -> None:
        self.calls.append(("end", epoch))


def test_callbacks_see_every_epoch_and_evaluation_in_order(dataset_dir: Path) -> None:
    data = InteractionDataset.load(dataset_dir)
    recorder = Recorder()
    train(data, "bpr", dataset_dir=dataset_dir, model_config=MODEL_CONFIGS["bpr"],
          train_config=replace(FAST, epochs=4, eval_every=2), runs_root=None, callbacks=[recorder])  # fmt: skip
    assert recorder.calls == [("start", 1), ("end", 1), ("start", 2), ("evaluation", 2), ("end", 2),
                              ("start", 3), ("end", 3), ("start", 4), ("evaluation", 4), ("end", 4)]  # fmt: skip


def test_clip_grad_norm_bounds_the_gradient_that_the_optimiser_sees(dataset_dir: Path) -> None:
    data = InteractionDataset.load(dataset_dir)
    unclipped, clipped = Recorder(), Recorder()
    config = replace(FAST, epochs=2, learning_rate=0.5)
    train(data, "bpr", dataset_dir=dataset_dir, model_config=MODEL_CONFIGS["bpr"], train_config=config,
          runs_root=None, callbacks=[unclipped])  # fmt: skip
    train(data, "bpr", dataset_dir=dataset_dir, model_config=MODEL_CONFIGS["bpr"], train_config=config,
          runs_root=None, callbacks=[ClipGradNorm(max_norm=1e-3), clipped])  # fmt: skip
    assert unclipped.largest_gradient_norm > 1e-3
    assert clipped.largest_gradient_norm <= 1e-3 * (1 + 1e-5)


# ------------------------------------------------------------------------------------------------- results
def fake_run(root: Path, dataset: str, model: str, name: str, *, model_config: dict[str, Any], seed: int,
             valid: float, test: float, split: str = "given", tag: str = "") -> None:  # fmt: skip
    directory = root / dataset / model / name
    directory.mkdir(parents=True)
    metrics = {"recall@10": test / 2, "recall@20": test, "ndcg@10": test / 4, "ndcg@20": test / 3,
               "mrr@20": test / 5, "hit@20": test * 2}  # fmt: skip
    (directory / "metrics.json").write_text(json.dumps({
        "model": model, "dataset": dataset, "seed": seed, "tag": tag, "best_epoch": 7,
        "valid": {"recall@20": valid}, "test": metrics, "wall_seconds": 12.0, "seconds_per_epoch": 0.5,
    }))  # fmt: skip
    (directory / "config.json").write_text(json.dumps({
        "model": model, "model_config": model_config, "dataset": {"name": dataset, "split": split},
        "train_config": {"epochs": 10, "seed": seed, "progress": False, "device": "cpu"},
    }))  # fmt: skip


@pytest.fixture()
def results_root(tmp_path: Path) -> Path:
    # alpha/bpr: grid point A wins on VALID (0.30 vs 0.20) although B is better on TEST (0.40 vs 0.10)
    fake_run(tmp_path, "alpha", "bpr", "a", model_config={"reg": 1}, seed=1, valid=0.30, test=0.10)
    fake_run(tmp_path, "alpha", "bpr", "b", model_config={"reg": 2}, seed=1, valid=0.20, test=0.40)
    # beta (sequential split)/lightgcn: one grid point, two seeds → mean ± std
    for seed, test in ((1, 0.2), (2, 0.4)):
        fake_run(tmp_path, "beta", "lightgcn", f"s{seed}", model_config={"n_layers": 2}, seed=seed, valid=0.5,
                 test=test, split="loo-time")  # fmt: skip
    return tmp_path


def table_row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_render_one_table_per_dataset_with_its_heading(results_root: Path) -> None:
    text = render(read_runs(results_root))
    assert [line for line in text.splitlines() if line.startswith("## ")] == ["## alpha", "## beta"]
    assert sum(line.startswith("| Model |") for line in text.splitlines()) == 2
    alpha, beta = text.split("## alpha")[1].split("## beta")
    assert "| bpr |" in alpha and "lightgcn" not in alpha
    assert "| lightgcn |" in beta and "| bpr |" not in beta
    assert "MRR@20" in beta and "MRR@20" not in alpha  # sequential datasets get MRR and Hit columns


def test_render_picks_the_grid_point_by_validation_recall(results_root: Path) -> None:
    row = table_row(render(read_runs(results_root)), "bpr")
    # columns: Model, Recall@10, Recall@20, NDCG@10, NDCG@20, valid Recall@20, best epoch, wall, s/epoch, seed, grid
    assert row[2] == "0.1000"  # grid point A's TEST recall@20, not B's 0.4000
    assert row[5] == "0.3000"
    assert row[-1] == "2"


def test_render_reports_mean_and_std_over_seeds(results_root: Path) -> None:
    row = table_row(render(read_runs(results_root)), "lightgcn")
    assert row[2] == "0.3000 ± 0.1414"  # recall@20 over seeds 0.2 and 0.4
    assert row[-2] == "1,2"


def test_read_runs_counts_a_setting_added_later_at_its_default(tmp_path: Path) -> None:
    # seed 1 ran before the trainer had "patience"; seed 2 records the default: one grid point, two seeds
    fake_run(tmp_path, "gamma", "bpr", "old", model_config={"reg": 1}, seed=1, valid=0.3, test=0.2)
    fake_run(tmp_path, "gamma", "bpr", "new", model_config={"reg": 1}, seed=2, valid=0.3, test=0.4)
    config_path = tmp_path / "gamma" / "bpr" / "new" / "config.json"
    config = json.loads(config_path.read_text())
    config["train_config"]["patience"] = TrainConfig().patience
    config_path.write_text(json.dumps(config))
    row = table_row(render(read_runs(tmp_path)), "bpr")
    assert row[-2] == "1,2" and row[-1] == "1"


def test_write_results_writes_the_markdown_with_notes(results_root: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"alpha": ["first line", "second line"]}))
    out = tmp_path / "docs" / "results.md"
    text = write_results(results_root, out, notes)
    assert out.read_text() == text
    assert "first line\nsecond line" in text.split("## beta")[0]


def test_the_ledger_keeps_the_tables_after_the_run_directories_are_gone(results_root: Path, tmp_path: Path) -> None:
    ledger, out = tmp_path / "ledger.jsonl", tmp_path / "results.md"
    before = write_results(results_root, out, ledger_path=ledger)
    assert sorted(read_ledger(ledger)) == ["alpha/bpr/a", "alpha/bpr/b", "beta/lightgcn/s1", "beta/lightgcn/s2"]
    shutil.rmtree(results_root / "alpha")
    shutil.rmtree(results_root / "beta")
    assert write_results(results_root, out, ledger_path=ledger) == before


def test_a_run_present_again_replaces_its_ledger_line(results_root: Path, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    write_results(results_root, tmp_path / "r.md", ledger_path=ledger)
    shutil.rmtree(results_root / "alpha" / "bpr" / "a")
    fake_run(results_root, "alpha", "bpr", "a", model_config={"reg": 1}, seed=1, valid=0.35, test=0.25)
    text = write_results(results_root, tmp_path / "r.md", ledger_path=ledger)
    assert read_ledger(ledger)["alpha/bpr/a"]["test"]["recall@20"] == 0.25
    assert table_row(text, "bpr")[2] == "0.2500" and table_row(text, "bpr")[-1] == "2"


def test_recovered_rows_are_marked_and_give_way_to_recorded_runs(results_root: Path, tmp_path: Path) -> None:
    cells = ["0.1", "0.2", "0.3", "0.4", "0.5", "9", "1 s", "0.10", "2024", "1"]
    recovered = tmp_path / "recovered.json"
    recovered.write_text(json.dumps({"datasets": {"alpha": {"sequential": False, "rows": [
        ["bpr", *cells], ["vbpr (old)", *cells]]}, "gamma": {"sequential": False, "rows": [["bpr", *cells]]}}}))
    text = write_results(results_root, tmp_path / "r.md", ledger_path=tmp_path / "l.jsonl", recovered_path=recovered)
    alpha, gamma = text.split("## alpha")[1].split("## beta")[0], text.split("## gamma")[1]
    assert table_row(alpha, "bpr")[2] == "0.1000"  # the recorded runs replace the recovered row of the same label
    assert table_row(alpha, "vbpr (old) †") == ["vbpr (old) †", *cells]
    assert table_row(gamma, "bpr †") == ["bpr †", *cells]  # a dataset with no recorded runs keeps its table


def test_read_ledger_names_a_malformed_line(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text('{"run": "a/b/c"}\nnot json\n')
    with pytest.raises(ValueError, match=r"ledger\.jsonl:2: not a JSON object"):
        read_ledger(ledger)


def test_fine_tuning_runs_from_each_seeds_own_pretraining_are_one_grid_point(tmp_path: Path) -> None:
    for seed in (1, 2):
        fake_run(tmp_path, "seq", "mp4sr", f"ft{seed}", model_config={}, seed=seed, valid=0.3, test=0.1 * seed)
        config_path = tmp_path / "seq" / "mp4sr" / f"ft{seed}" / "config.json"
        config = json.loads(config_path.read_text())
        config["train_config"]["init_from"] = f"/runs/seq/mp4sr/20261124T12000{seed}Z-s{seed}-pretrain"
        config_path.write_text(json.dumps(config))
    fake_run(tmp_path, "seq", "mp4sr", "other", model_config={}, seed=1, valid=0.1, test=0.9)  # no init_from
    row = table_row(render(read_runs(tmp_path)), "mp4sr")
    assert row[2] == "0.1500 ± 0.0707" and row[-2] == "1,2" and row[-1] == "2"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda")])
def test_resolve_device_refuses_cuda_where_there_is_none(device: str | torch.device) -> None:
    from training.device import resolve_device

    with pytest.raises(ValueError, match=r"device 'cuda(:1)?' requested but CUDA is not available"):
        resolve_device(device)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")


class StopForecasts(Callback):
    """Records, after each evaluation, the epoch by which the trainer says the run stops (what the bar counts to)."""

    def __init__(self) -> None:
        self.forecasts: list[tuple[int, int]] = []

    def on_evaluation(self, trainer: Trainer, entry: dict[str, Any]) -> None:
        self.forecasts.append((entry["epoch"], trainer.latest_stop_epoch()))


def test_the_progress_total_is_the_epoch_the_run_stops_at_unless_validation_improves(dataset_dir: Path) -> None:
    data = InteractionDataset.load(dataset_dir)
    forecasts = StopForecasts()
    result = train(data, "bpr", dataset_dir=dataset_dir, model_config=MODEL_CONFIGS["bpr"],
                   train_config=replace(FAST, epochs=200, patience=3, eval_every=2), runs_root=None,
                   callbacks=[forecasts])  # fmt: skip
    assert result.stopped_by == "early_stopping"
    stopped_at = forecasts.forecasts[-1][0]
    # from the best evaluation on, nothing improved: every forecast since then named the epoch the run stopped at
    from_best = [forecast for epoch, forecast in forecasts.forecasts if epoch >= result.best_epoch]
    assert from_best == [stopped_at] * len(from_best) and stopped_at == result.best_epoch + 3 * 2
    # each forecast is patience evaluations after that moment's best, never beyond the cap
    assert all(epoch < forecast <= 200 or epoch == forecast == stopped_at for epoch, forecast in forecasts.forecasts)
    capped = StopForecasts()
    train(data, "bpr", dataset_dir=dataset_dir, model_config=MODEL_CONFIGS["bpr"],
          train_config=replace(FAST, epochs=3, patience=20), runs_root=None, callbacks=[capped])  # fmt: skip
    assert [forecast for _, forecast in capped.forecasts] == [3, 3, 3]
