"""The corruption benchmark: AUROC against a brute-force count, the detectors on a case whose answer is known, the
grid's sharing of clean and content-blind runs, resumability (a second invocation trains nothing) and the page."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.synthetic_datasets import multimodal_dataset
from training.config import CorruptionConfig
from training.data.corruption import CorruptedContent
from training.data.dataset import InteractionDataset, Modality
from training.experiments import corruption_benchmark as bench
from training.experiments.damage_detectors import (
    CROSS_MODAL_KNN,
    REVIEWER_FINAL,
    REVIEWER_FIRST,
    REVIEWER_RAW,
    USER_PROFILE,
    auroc,
    detection_auroc,
    reviewer_detector_scores,
    simple_detector_scores,
)
from training.experiments.modality_quality_report import NOT_RUN, grid_status, render_page


# --------------------------------------------------------------------------------------------------- AUROC
def brute_force_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    pairs = [(p, n) for p, n in itertools.product(scores[labels], scores[~labels])]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


@pytest.mark.parametrize("seed", range(6))
def test_auroc_equals_the_pairwise_count_with_ties_as_half(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    scores = rng.integers(0, 6, size=n).astype(float) if seed % 2 else rng.normal(size=n)  # ties on odd seeds
    labels = rng.random(n) < 0.3
    labels[:2] = [True, False]
    assert auroc(scores, labels) == pytest.approx(brute_force_auroc(scores, labels), abs=1e-12)


def test_auroc_of_one_class_only_is_nan() -> None:
    assert np.isnan(auroc(np.arange(4.0), np.zeros(4, dtype=bool)))


# ------------------------------------------------------------------------------------- a known answer
def two_cluster_dataset(n_per_cluster: int = 20, n_users_per_cluster: int = 10) -> InteractionDataset:
    """Two item clusters with disjoint users; each modality is its cluster's direction plus small noise, in spaces
    of different widths. A damaged item carries the OTHER cluster's direction in one modality."""
    rng = np.random.default_rng(0)
    n_items, n_users = 2 * n_per_cluster, 2 * n_users_per_cluster
    cluster = np.repeat([0, 1], n_per_cluster)
    users, items = [], []
    for u in range(n_users):
        own = np.flatnonzero(cluster == u // n_users_per_cluster)
        chosen = rng.choice(own, size=8, replace=False)
        users += [u] * chosen.size
        items += chosen.tolist()
    modalities = {}
    for name, dim in (("image", 16), ("text", 8)):
        centres = rng.normal(size=(2, dim)) * 3
        features = (centres[cluster] + 0.1 * rng.normal(size=(n_items, dim))).astype(np.float32)
        modalities[name] = Modality(name, features, np.ones(n_items, dtype=bool), "synthetic")
    user, item = np.array(users), np.array(items)
    return InteractionDataset(name="two-clusters", split_name="all-train", sequential=False,
                              user_ids=[f"u{u}" for u in range(n_users)], item_ids=[f"i{i}" for i in range(n_items)],
                              user=user, item=item, timestamp=np.zeros_like(user), split=np.zeros(user.size, dtype=np.int8),
                              item_text=[None] * n_items, item_image=[None] * n_items, modalities=modalities)  # fmt: skip


def damage_by_hand(clean: InteractionDataset, pairs: list[tuple[int, str]], *, kind: str) -> CorruptedContent:
    """The known damage: the other cluster's feature (an item of the other half) or, for missing, the mask off."""
    modalities = dict(clean.modalities)
    half = clean.n_items // 2
    for row, name in pairs:
        m = modalities[name]
        features, present = m.features.copy(), m.present.copy()
        if kind == "missing":
            features[row], present[row] = 0.0, False
        else:
            features[row] = clean.modalities[name].features[(row + half) % clean.n_items]
        modalities[name] = dataclasses.replace(m, features=features, present=present)
    return CorruptedContent(dataset=dataclasses.replace(clean, modalities=modalities),
                            config=CorruptionConfig(kind=kind, fraction=0.1, seed=0), damaged=tuple(sorted(pairs)))  # fmt: skip


PAIRS = [(1, "image"), (5, "text"), (22, "image"), (30, "text")]


def test_the_user_profile_detector_flags_exactly_the_modality_carrying_the_other_clusters_feature() -> None:
    clean = two_cluster_dataset()
    damaged = damage_by_hand(clean, PAIRS, kind="swapped")
    result = detection_auroc(clean, damaged, simple_detector_scores(damaged))
    assert result["n_scored"] == clean.n_items and result["n_damaged"] == {"image": 2, "text": 2}
    assert result["auroc"][USER_PROFILE] == {"image": 1.0, "text": 1.0, "pooled": 1.0}
    for detector in (USER_PROFILE, CROSS_MODAL_KNN):
        assert result["neutral"][detector] == {"image": 0, "text": 0}
        assert result["mean_score"][detector]["damaged"] > result["mean_score"][detector]["clean"]


def test_the_cross_modal_knn_detector_flags_the_item_but_not_which_of_its_modalities() -> None:
    clean = two_cluster_dataset()
    damaged = damage_by_hand(clean, PAIRS, kind="swapped")
    knn = simple_detector_scores(damaged)[CROSS_MODAL_KNN]
    items = np.zeros(clean.n_items, dtype=bool)
    items[[row for row, _ in PAIRS]] = True
    assert auroc(np.maximum(knn["image"], knn["text"]), items) == 1.0  # the damaged items, found
    # item 5's text is wrong, so its neighbours in text space are the other cluster's: its clean image is far from
    # their images too, and scores above every undamaged item's image
    assert knn["image"][5] > knn["image"][~items].max()


def test_a_random_detector_is_near_one_half_and_a_reversed_one_is_zero() -> None:
    clean = two_cluster_dataset()
    damaged = damage_by_hand(clean, PAIRS, kind="swapped")
    simple = simple_detector_scores(damaged)
    reversed_scores = {m: -scores for m, scores in simple[USER_PROFILE].items()}
    assert detection_auroc(clean, damaged, {"reversed": reversed_scores})["auroc"]["reversed"]["pooled"] == 0.0
    constant = {m: np.zeros(clean.n_items) for m in clean.modalities}
    assert detection_auroc(clean, damaged, {"constant": constant})["auroc"]["constant"]["pooled"] == 0.5


def test_a_missing_modality_is_flagged_by_every_detector_and_the_reviewers_zero_counts_as_flagged() -> None:
    clean = two_cluster_dataset()
    damaged = damage_by_hand(clean, PAIRS, kind="missing")
    simple = simple_detector_scores(damaged)
    assert np.isnan(simple[USER_PROFILE]["image"][1]) and np.isnan(simple[CROSS_MODAL_KNN]["text"][1])
    names = ("image", "text")
    final = np.full((2, clean.n_items), 0.9)
    for row, m in PAIRS:
        final[names.index(m), row] = 0.0  # R2MR scores a modality the item lacks 0
    reviewer = reviewer_detector_scores(np.full((2, clean.n_items), -1.0), final, names)
    assert set(reviewer) == {REVIEWER_FINAL}  # no first round ran: no first-review row
    result = detection_auroc(clean, damaged, {**simple, **reviewer})
    for detector in (USER_PROFILE, CROSS_MODAL_KNN, REVIEWER_FINAL):
        assert result["auroc"][detector]["pooled"] == 1.0
    # item 1 lost its image, so (b) has no other-modality neighbours for its text: neutral, and counted
    assert result["neutral"][CROSS_MODAL_KNN] == {"image": 2, "text": 2}


def test_the_reviewer_detector_is_one_minus_the_score_per_round() -> None:
    first, final = np.array([[0.2, 0.9], [0.6, 0.1]]), np.array([[0.3, 0.8], [0.7, 0.5]])
    out = reviewer_detector_scores(first, final, ("image", "text"))
    np.testing.assert_allclose(out[REVIEWER_FIRST]["image"], [0.8, 0.1])
    np.testing.assert_allclose(out[REVIEWER_FINAL]["text"], [0.3, 0.5])


# ------------------------------------------------------------------------------------------------ the grid
def test_clean_runs_are_shared_by_the_kinds_and_lightgcn_by_every_cell() -> None:
    cells = bench.grid(["ml100k-posters"], list(bench.KINDS), list(bench.FRACTIONS), ["vbpr", "lightgcn"], [2024, 1])
    unique = bench.unique_cells(cells, {})
    # per seed: vbpr 1 clean + 3 kinds × 2 fractions, lightgcn 1
    assert len(unique) == 2 * (1 + 6 + 1)
    assert [c.seed for c, _ in unique[:8]] == [2024] * 8  # every run of the first seed first
    lightgcn = [c for c, _ in unique if c.model.label == "lightgcn"]
    assert all(not c.corruption().active for c in lightgcn)


def test_the_protocol_caps_r2mr_as_the_clean_rows_do() -> None:
    run = bench.Cell("ml100k-posters", bench.MODEL_BY_LABEL["r2mr-no-reviewer"], "swapped", 0.4, 1).compose()
    assert (run.train.epochs, run.train.batch_size, run.train.seed, run.model_config.reviewer) == (80, 4096, 1, False)
    assert run.corruption == CorruptionConfig(kind="swapped", fraction=0.4, seed=1)
    assert bench.Cell("lfm2k", bench.MODEL_BY_LABEL["freedom"], "noise", 0.2, 2).compose().train.epochs == 1000


SMALL = {"epochs": 8, "eval_every": 8}  # R2MR's first review round runs before epoch 7: the best epoch is after it


@pytest.fixture(scope="module")
def benchmark_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("bench")
    data = multimodal_dataset(n_users=30, n_items=50, seed=2)
    data.save(home / "datasets" / data.name)
    return home


def run_small(home: Path, jobs: int = 1, after_each: Callable[[], object] = lambda: None) -> list[bench.Outcome]:
    cells = bench.grid(["synthetic-mm"], ["swapped"], [0.0, 0.4], ["r2mr", "vbpr", "lightgcn"], [2024])
    return bench.run_cells(cells, datasets_root=home / "datasets", runs_root=home / "runs", docs_dir=home / "docs",
                           train_overrides=SMALL, echo=lambda _: None, after_each=after_each, jobs=jobs)  # fmt: skip


def test_a_second_invocation_trains_nothing_and_a_lost_ledger_is_rebuilt_from_the_runs(benchmark_home: Path) -> None:
    first = run_small(benchmark_home)
    assert [o.trained for o in first] == [True] * 5  # r2mr ×2, vbpr ×2, lightgcn once
    ledger_file = bench.ledger_path(benchmark_home / "docs", "synthetic-mm")
    ledger = json.loads(ledger_file.read_text())
    assert not any(o.trained for o in run_small(benchmark_home))
    ledger_file.unlink()
    assert not any(o.trained for o in run_small(benchmark_home))  # found again in the runs root
    rebuilt = json.loads(ledger_file.read_text())
    assert set(rebuilt["runs"]) == set(ledger["runs"])
    for name, entry in ledger["runs"].items():
        assert rebuilt["runs"][name]["test"] == entry["test"]
        if entry["detection"] is None:
            assert rebuilt["runs"][name]["detection"] is None
            continue
        for detector, values in entry["detection"]["auroc"].items():  # from the reloaded checkpoint
            assert rebuilt["runs"][name]["detection"]["auroc"][detector] == pytest.approx(values)
    assert rebuilt["detectors"] == ledger["detectors"]


def test_ledger_writers_with_stale_copies_keep_each_others_runs(tmp_path: Path) -> None:
    path = bench.ledger_path(tmp_path, "synthetic-mm")
    first = bench.read_ledger(path, "synthetic-mm")  # two processes read the ledger before either wrote
    second = bench.read_ledger(path, "synthetic-mm")
    first["runs"]["a"] = {"key": "ka"}
    first["detectors"]["swapped/0.4/1"] = {"n_scored": 1}
    bench.write_ledger(path, first)
    second["runs"]["b"] = {"key": "kb"}
    bench.write_ledger(path, second)
    on_disk = json.loads(path.read_text())
    assert set(on_disk["runs"]) == {"a", "b"} and set(on_disk["detectors"]) == {"swapped/0.4/1"}
    assert set(second["runs"]) == {"a", "b"}  # the writer's copy holds the other's run from then on
    assert sorted(p.name for p in path.parent.iterdir()) == [f".{path.name}.lock", path.name]  # nothing staged left


def _write_runs(path: Path, writer: int, count: int, start: Any) -> None:
    start.wait()  # every writer has imported what it needs: the writes overlap
    ledger = bench.read_ledger(path, "synthetic-mm")
    for k in range(count):
        ledger["runs"][f"{writer}-{k}"] = {"key": f"{writer}-{k}"}
        bench.write_ledger(path, ledger)


def test_ledger_writers_in_separate_processes_lose_no_run(tmp_path: Path) -> None:
    import multiprocessing

    path = bench.ledger_path(tmp_path, "synthetic-mm")
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(3)
    writers = [context.Process(target=_write_runs, args=(path, w, 25, start)) for w in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    assert set(json.loads(path.read_text())["runs"]) == {f"{w}-{k}" for w in range(3) for k in range(25)}


def test_cells_trained_in_worker_processes_are_the_cells_trained_in_order(benchmark_home: Path,
                                                                          tmp_path: Path) -> None:  # fmt: skip
    run_small(benchmark_home)  # in order, in this process (a no-op if an earlier test ran it)
    sequential = json.loads(bench.ledger_path(benchmark_home / "docs", "synthetic-mm").read_text())
    home = tmp_path / "home"
    shutil.copytree(benchmark_home / "datasets", home / "datasets")
    pages: list[int] = []
    outcomes = run_small(home, jobs=2, after_each=lambda: pages.append(1))
    assert sorted(o.trained for o in outcomes) == [True] * 5 and len(pages) == 5
    parallel = json.loads(bench.ledger_path(home / "docs", "synthetic-mm").read_text())
    assert sorted(e["key"] for e in parallel["runs"].values()) == sorted(e["key"] for e in sequential["runs"].values())
    by_key = {e["key"]: e for e in sequential["runs"].values()}
    for entry in parallel["runs"].values():
        assert entry["train_seconds"] > 0 and entry["stopped_by"] == by_key[entry["key"]]["stopped_by"]
        assert entry["test"]["recall@20"] == pytest.approx(by_key[entry["key"]]["test"]["recall@20"], abs=0.05)
        assert (entry["detection"] is None) == (by_key[entry["key"]]["detection"] is None)
    assert not any(o.trained for o in run_small(home, jobs=2, after_each=lambda: pages.append(1)))  # resumable
    assert len(pages) == 5  # a pass that only finds runs does not rewrite the report after each of them


def _scripted_worker(cell: bench.Cell, key: str, *, datasets_root: Path, runs_root: Path,
                     train_overrides: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """A stand-in for ``train_in_worker``: VBPR fails at once; R2MR finishes only after that failure; every cell
    leaves a mark that it started."""
    runs_root.mkdir(parents=True, exist_ok=True)
    (runs_root / f"{cell.model.label}.started").touch()
    if cell.model.label == "vbpr":
        (runs_root / "vbpr.failed").touch()
        raise ValueError("scripted failure")
    deadline = time.monotonic() + 120
    while cell.model.label == "r2mr" and not (runs_root / "vbpr.failed").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the failure reaches the parent first
    return {"run": f"{cell.dataset}/{cell.model.model}/scripted", "key": key, "label": cell.model.label,
            "train_seconds": 1.0, "corruption": {"kind": "none", "fraction": 0.0, "seed": cell.seed},
            "test": {"recall@20": 0.5}, "best_epoch": 1, "epochs_run": 1, "stopped_by": "epochs", "detection": None}  # fmt: skip


def test_after_a_failing_cell_no_cell_starts_and_the_running_one_is_recorded(benchmark_home: Path,
                                                                           tmp_path: Path) -> None:  # fmt: skip
    home = tmp_path / "home"
    shutil.copytree(benchmark_home / "datasets", home / "datasets")
    # in order: VBPR (fails), R2MR (running beside it when it fails), LightGCN (queued behind them)
    cells = bench.grid(["synthetic-mm"], ["swapped"], [0.0], ["vbpr", "r2mr", "lightgcn"], [2024])
    with pytest.raises(ValueError, match="scripted failure"):
        bench.run_cells(cells, datasets_root=home / "datasets", runs_root=home / "runs", docs_dir=home / "docs",
                        echo=lambda _: None, jobs=2, worker=_scripted_worker)  # fmt: skip
    ledger = json.loads(bench.ledger_path(home / "docs", "synthetic-mm").read_text())
    assert [e["label"] for e in ledger["runs"].values()] == ["r2mr"]  # the cell beside it finished and counts
    assert sorted(p.name for p in (home / "runs").glob("*.started")) == ["r2mr.started", "vbpr.started"]
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        bench.run_cells(cells, datasets_root=home / "datasets", runs_root=home / "runs", docs_dir=home / "docs", jobs=0)


def test_a_worker_failure_names_the_cell(tmp_path: Path) -> None:
    cell = bench.grid(["synthetic-mm"], ["noise"], [0.2], ["vbpr"], [3])[0]
    with pytest.raises(RuntimeError, match=r"^synthetic-mm vbpr noise p=0.2 seed 3: DatasetFormatError: .*not a prepared dataset.*\nTraceback"):
        bench.train_in_worker(cell, "key", datasets_root=tmp_path / "no-datasets", runs_root=tmp_path / "runs",
                              train_overrides={})  # fmt: skip


def test_worker_threads_share_the_usable_cores_and_respect_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [bench.worker_threads(w) for w in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert bench.worker_threads(2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert bench.worker_threads(2) == 4


def test_the_ledger_holds_the_reviewers_and_the_simple_detectors_auroc(benchmark_home: Path) -> None:
    run_small(benchmark_home)
    ledger = json.loads(bench.ledger_path(benchmark_home / "docs", "synthetic-mm").read_text())
    r2mr = [e for e in ledger["runs"].values() if e["label"] == "r2mr" and e["corruption"]["kind"] == "swapped"]
    assert len(r2mr) == 1 and set(r2mr[0]["detection"]["auroc"]) == {REVIEWER_FIRST, REVIEWER_FINAL, REVIEWER_RAW}
    diagnostics = r2mr[0]["detection"]["diagnostics"]
    assert set(diagnostics["share rewritten"]) == {"image", "text"}
    assert set(diagnostics["score s, first review"]["text"]) == {"damaged", "clean"}
    assert all(e["detection"] is None for e in ledger["runs"].values() if e["label"] != "r2mr" or
               e["corruption"]["kind"] == "none")  # fmt: skip
    assert set(ledger["detectors"]) == {"swapped/0.4/2024"}
    assert set(ledger["detectors"]["swapped/0.4/2024"]["auroc"]) == {USER_PROFILE, CROSS_MODAL_KNN}


def test_the_page_shows_measured_cells_and_not_run_for_the_rest(benchmark_home: Path) -> None:
    run_small(benchmark_home)
    page = render_page(benchmark_home / "docs", datasets=["synthetic-mm"], train_overrides=SMALL)
    ledger = json.loads(bench.ledger_path(benchmark_home / "docs", "synthetic-mm").read_text())
    vbpr = next(e for e in ledger["runs"].values() if e["label"] == "vbpr" and e["corruption"]["kind"] == "swapped")
    row = next(line for line in page.splitlines() if line.startswith("| VBPR |") and f"{vbpr['test']['recall@20']:.4f} (1)" in line)
    assert NOT_RUN in row  # p = 0.2 was not run
    assert "**Progress: 5 of the" in page
    assert "| p=0.4 swapped: R2MR above R2MR without reviewer by more than two seed standard deviations | not yet measured" in page
    assert (benchmark_home / "docs" / "modality-quality" / "synthetic-mm-recall.png").exists()


def test_the_page_says_the_grid_is_complete_only_when_every_run_exists() -> None:
    partial = grid_status(257, 258, ["ml100k-posters", "lfm2k"])
    assert partial.startswith("**Progress: 257 of the 258 runs") and "To complete it" in partial
    complete = grid_status(258, 258, ["ml100k-posters", "lfm2k"])
    assert complete.startswith("**The full grid is complete: 258 of 258 runs** (ml100k-posters, lfm2k × ")
    assert "To complete it" not in complete and "reuses every run" in complete


# ------------------------------------------------------------------------------------------- the command line
@pytest.fixture()
def cli_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MMREC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MMREC_DATA_ROOT", str(tmp_path / "no-data"))
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path / "home"


@pytest.mark.parametrize(("args", "message"), [
    (["corrupt", "--kind", "blur"], "Error: --kind blur: not in the benchmark grid; valid: missing, swapped, noise"),
    (["corrupt", "--fraction", "0.3"], "Error: --fraction 0.3: not in the benchmark grid; valid: 0, 0.2, 0.4"),
    (["corrupt", "--model", "mmgcn"], "Error: --model mmgcn: not in the benchmark grid; valid: r2mr, r2mr-no-reviewer"),
    (["corrupt", "--dataset", "amazon-baby"], "Error: --dataset amazon-baby: not in the benchmark grid; valid: ml100k-posters, lfm2k"),
    (["corrupt", "--dataset", "lfm2k"], "Error: 'lfm2k' is not a prepared dataset under"),
    (["corrupt", "--jobs", "0"], "Error: --jobs 0: must be at least 1"),
    (["train", "--dataset", "lfm2k", "--model", "vbpr", "--corrupt", "kind=swapped"],
     "Error: --corrupt: vbpr corruption setting kind=swapped with fraction=0.0"),
    (["train", "--dataset", "lfm2k", "--model", "lightgcn", "--corrupt", "kind=noise", "--corrupt", "fraction=0.2"],
     "Error: --corrupt: lightgcn reads no item content"),
    (["train", "--dataset", "lfm2k", "--model", "vbpr", "--corrupt", "noise"], "Error: --corrupt 'noise': expected KEY=VALUE"),
])  # fmt: skip
def test_a_bad_benchmark_or_corruption_option_is_refused_with_one_line(args: list[str], message: str, cli_home: Path) -> None:
    from typer.testing import CliRunner

    from training.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith(message), result.output
    assert len(result.output.strip().splitlines()) == 1


def test_plan_lists_the_slice_and_trains_nothing(cli_home: Path) -> None:
    from typer.testing import CliRunner

    from training.cli import app

    data = multimodal_dataset(n_users=30, n_items=50, seed=2)
    data = dataclasses.replace(data, name="ml100k-posters")
    data.save(cli_home / "datasets" / "ml100k-posters")
    result = CliRunner().invoke(app, ["corrupt", "--dataset", "ml100k-posters", "--kind", "noise", "--fraction", "0",
                                      "--fraction", "0.2", "--model", "vbpr", "--model", "lightgcn", "--seed", "3",
                                      "--plan", "--out", str(cli_home / "docs" / "modality-quality.md")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["train: ml100k-posters vbpr noise p=0 seed 3",
                                          "train: ml100k-posters lightgcn noise p=0 seed 3",
                                          "train: ml100k-posters vbpr noise p=0.2 seed 3"]  # fmt: skip
    assert not (cli_home / "runs").exists()


# --------------------------------------------------------------------------------------------------- goals
def hand_grid(recall: dict[tuple[str, float], list[float]]) -> object:
    """A Grid whose swapped cells hold runs with the given test Recall@20 per seed (seeds 2024, 1, 2 in order)."""
    from training.experiments.modality_quality_report import Grid

    cells = {(label, "swapped", p): [{"seed": seed, "test": {"recall@20": value, "ndcg@20": value}}
                                     for seed, value in zip(bench.SEEDS, values, strict=False)]
             for (label, p), values in recall.items()}  # fmt: skip
    return Grid("hand", {"runs": {}, "detectors": {}}, cells, bench.SEEDS)


@pytest.mark.parametrize(("r2mr", "expected"), [
    ([0.40, 0.40, 0.40], "met"),  # drop 0 % vs FREEDOM's and LATTICE's 10 %
    ([0.37, 0.37, 0.37], "not met"),  # 7.5 % > ½ × 10 %
    ([0.40], "not yet measured"),  # one seed of three
])  # fmt: skip
def test_the_drop_goal_needs_every_seed_and_half_the_baselines_drop(r2mr: list[float], expected: str) -> None:
    from training.experiments.modality_quality_report import drop_goal

    clean = [0.40, 0.40, 0.40]
    grid = hand_grid({("r2mr", 0.0): clean, ("r2mr", 0.4): r2mr, ("freedom", 0.0): clean, ("freedom", 0.4): [0.36] * 3,
                      ("lattice", 0.0): clean, ("lattice", 0.4): [0.36] * 3})  # fmt: skip
    goal = drop_goal(grid)  # type: ignore[arg-type]
    assert goal.status == expected
    if expected == "not yet measured":
        assert goal.evidence.startswith("so far (1 of 3 seeds) met: drops: R2MR +0.0 %, FREEDOM +10.0 %")


def test_the_ablation_goal_compares_the_gap_with_two_seed_standard_deviations() -> None:
    from training.experiments.modality_quality_report import ablation_goal

    grid = hand_grid({("r2mr", 0.4): [0.40, 0.41, 0.42], ("r2mr-no-reviewer", 0.4): [0.37, 0.38, 0.39]})
    assert ablation_goal(grid, "r2mr-no-reviewer", "swapped").status == "met"  # type: ignore[arg-type]
    close = hand_grid({("r2mr", 0.4): [0.40, 0.41, 0.42], ("r2mr-no-reviewer", 0.4): [0.39, 0.40, 0.41]})
    assert ablation_goal(close, "r2mr-no-reviewer", "swapped").status == "not met"  # type: ignore[arg-type]
    one = hand_grid({("r2mr", 0.4): [0.40], ("r2mr-no-reviewer", 0.4): [0.39]})
    assert ablation_goal(one, "r2mr-no-reviewer", "swapped").status == "not yet measured"  # type: ignore[arg-type]
