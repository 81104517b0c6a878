"""`mmrec audit`: the modality-quality audit of a small real R2MR run and of its bundle. The ranking, precision@N and
AUROC are checked against brute-force references; the CSV, the report and the contact sheet are written; every
refusal is one line with exit status 2."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_datasets import multimodal_dataset
from typer.testing import CliRunner
from user_profile_reference import loop_profile_cosines

from training.cli import app
from training.experiments.modality_audit import (
    MISSING_FLAG,
    AuditTable,
    audit_table,
    auroc,
    bundle_images,
    detection,
    item_title,
    profile_flags,
    profile_ranking,
    ranking,
    write_audit,
)
from training.export.bundle import ExportConfig, export_run
from training.fit.trainer import TrainConfig, train
from training.runs import CorruptionRecord, load_run, write_corruption

TINY = {
    "feature_dim": 8, "prompt_dim": 4, "encoder_channels": [16, 32], "decoder_channels": [16, 32], "n_codes": 4,
    "code_dim": 4, "codebook_size": 16, "discriminator_channels": [8], "rewriter_batch_size": 16,
    "first_round_epochs": 2, "later_round_epochs": 1, "rewrite_every": 2,
}  # fmt: skip
STATES = ("high-quality", "disparity", "low-quality")


@pytest.fixture(scope="module")
def r2mr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 5-epoch R2MR run on a synthetic dataset whose items have real image files (coloured squares)."""
    root = tmp_path_factory.mktemp("audit")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    dataset = multimodal_dataset(item_text=lambda i: f"Item {i} (2001). Drama. A story.")
    images: list[str | None] = []
    for i in range(dataset.n_items):
        path = root / "images" / f"{i}.png"
        Image.new("RGB", (12, 18), tuple(int(c) for c in rng.integers(0, 256, 3))).save(path)
        images.append(str(path))
    dataset = dataclasses.replace(dataset, item_image=images)
    dataset.save(root / "data")
    result = train(dataset, "r2mr", dataset_dir=root / "data", runs_root=root / "runs", model_config=TINY,
                   train_config=TrainConfig(epochs=5, progress=False, topk=(5, 10, 20)))  # fmt: skip
    assert result.run_dir is not None
    return result.run_dir


@pytest.fixture(scope="module")
def corrupted_run(r2mr_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CorruptionRecord]:
    """The same run with a corruption record naming 12 images and 6 texts as damaged."""
    run = tmp_path_factory.mktemp("corrupted") / "run"
    shutil.copytree(r2mr_run, run)
    rng = np.random.default_rng(3)
    items = [f"i{i}" for i in rng.permutation(60)]
    record = CorruptionRecord(dataset="synthetic-mm", kind="swapped", fraction=0.3, seed=7,
                              damaged=tuple([(i, "image") for i in items[:12]] + [(i, "text") for i in items[12:18]]))  # fmt: skip
    write_corruption(run, record)
    return run, record


@pytest.fixture(scope="module")
def r2mr_bundle(corrupted_run: tuple[Path, CorruptionRecord], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_run(corrupted_run[0], tmp_path_factory.mktemp("bundle") / "bundle",
                      config=ExportConfig(include_modality_encoders=False))  # fmt: skip


def model_scores(run_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(scores (2, I), training users (I,), item ids) straight from the model and the dataset."""
    run = load_run(run_dir)
    with torch.no_grad():
        scores, _ = run.model.quality()  # type: ignore[operator]
    users, items = run.dataset.edges(0)
    n_users = np.array([len(set(users[items == i].tolist())) for i in range(run.dataset.n_items)])
    return scores.double().numpy(), n_users, list(run.dataset.item_ids)


def brute_force_ranking(scores: np.ndarray, n_users: np.ndarray, ids: list[str]) -> list[str]:
    return [ids[r] for r in sorted((r for r in range(len(ids)) if n_users[r] > 0), key=lambda r: (scores[r], ids[r]))]


def brute_force_auroc(flag: list[float], positive: list[bool]) -> float:
    pairs = [(p, n) for p, is_p in zip(flag, positive, strict=True) if is_p
             for n, is_n in zip(flag, positive, strict=True) if not is_n]  # fmt: skip
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def test_audit_of_a_run_writes_every_item_ranked_worst_first(r2mr_run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["audit", str(r2mr_run), "--out", str(tmp_path), "--top", "5"])
    assert result.exit_code == 0, result.output
    scores, n_users, ids = model_scores(r2mr_run)
    with (tmp_path / "synthetic-mm.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["id"] for row in rows] == ids  # every item, in dataset order
    for k, modality in enumerate(("image", "text")):  # R2MR's modalities, sorted
        assert [float(row[f"score_{modality}"]) for row in rows] == pytest.approx(scores[k].tolist(), abs=1e-4)
        ranked = sorted((row for row in rows if row[f"rank_{modality}"]), key=lambda row: int(row[f"rank_{modality}"]))
        assert [row["id"] for row in ranked] == brute_force_ranking(scores[k], n_users, ids)
        assert [int(row[f"rank_{modality}"]) for row in ranked] == list(range(1, len(ranked) + 1))
    for row, users in zip(rows, n_users, strict=True):
        assert int(row["training_users"]) == users
        n_good = (float(row["score_image"]) >= 0.5) + (float(row["score_text"]) >= 0.5)
        assert row["state"] == STATES[2 - n_good]
    report = (tmp_path / "synthetic-mm.md").read_text()
    assert "## image: the 5 judged worst" in report and "## text: the 5 judged worst" in report
    assert "![images judged worst and best](synthetic-mm-contact-sheet.png)" in report
    assert "## Damaged content found" not in report  # a clean run
    with Image.open(tmp_path / "synthetic-mm-contact-sheet.png") as sheet:
        assert sheet.size[0] > 300 and sheet.size[1] > 300


def test_precision_and_auroc_on_a_corrupted_run_match_brute_force(corrupted_run: tuple[Path, CorruptionRecord],
                                                                   tmp_path: Path) -> None:  # fmt: skip
    run, record = corrupted_run
    scores, n_users, ids = model_scores(run)
    table = audit_table(run)
    for k, modality in enumerate(("image", "text")):
        damaged = {item for item, m in record.damaged if m == modality}
        ranked = brute_force_ranking(scores[k], n_users, ids)
        found = detection(table, k)
        assert found.damaged == sum(item in damaged for item in ranked)
        assert dict(found.precision) == pytest.approx(
            {n: sum(item in damaged for item in ranked[:n]) / n for n in (10, 50, found.damaged) if n <= len(ranked)})
        judged = [r for r in range(len(ids)) if n_users[r] > 0]
        assert found.auroc == pytest.approx(brute_force_auroc([1 - float(scores[k, r]) for r in judged],
                                                              [ids[r] in damaged for r in judged]))  # fmt: skip
    files = write_audit(run, tmp_path, top=3)
    assert files.markdown.name == "synthetic-mm-swapped-p0.3-s7.md"
    report = files.markdown.read_text()
    assert "## Damaged content found" in report and "kind `swapped`, fraction 0.3, seed 7" in report
    image = detection(table, 0)
    n, precision = image.precision[0]
    assert f"| image | {image.ranked} | {image.damaged} | {n} | {round(precision * n)} | {precision:.3f} |" in report
    with files.csv.open() as f:
        rows = list(csv.DictReader(f))
    assert {row["id"] for row in rows if row["damaged_image"] == "1"} == {i for i, m in record.damaged if m == "image"}


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_the_pairwise_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    flag = rng.integers(0, 6, size=40) / 5.0  # many ties
    positive = rng.random(40) < 0.3
    assert auroc(flag, positive) == pytest.approx(brute_force_auroc(flag.tolist(), positive.tolist()))
    assert np.isnan(auroc(flag, np.zeros(40, dtype=bool)))


def test_audit_of_a_bundle_reads_its_metadata_and_its_runs_record(r2mr_bundle: Path,
                                                                   corrupted_run: tuple[Path, CorruptionRecord],
                                                                   tmp_path: Path) -> None:  # fmt: skip
    run = audit_table(corrupted_run[0])
    bundle = audit_table(r2mr_bundle)
    assert bundle.item_ids == run.item_ids and bundle.modality_names == run.modality_names
    np.testing.assert_allclose(bundle.scores, run.scores, atol=1e-6)
    assert bundle.states == run.states
    np.testing.assert_array_equal(bundle.training_users, run.training_users)
    assert bundle.corruption == run.corruption  # through the manifest's metrics.run_dir
    assert bundle.images == run.images  # from the prepared dataset the run names
    for k in range(2):
        np.testing.assert_array_equal(ranking(bundle, k), ranking(run, k))
        assert detection(bundle, k).precision == detection(run, k).precision
        assert detection(bundle, k).auroc == pytest.approx(detection(run, k).auroc, abs=1e-6)
    files = write_audit(r2mr_bundle, tmp_path)
    assert files.contact_sheet is not None and "## Damaged content found" in files.markdown.read_text()


def bundle_without_its_run(bundle: Path, tmp_path: Path, *, exported_before_profiles: bool = False) -> Path:
    """A copy of ``bundle`` whose manifest names a run directory that does not exist (and, when
    ``exported_before_profiles``, does not declare the user-profile cosines, as a bundle exported before them)."""
    moved = tmp_path / "bundle"
    shutil.copytree(bundle, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["metrics"]["run_dir"] = str(tmp_path / "no-such-run")
    if exported_before_profiles:
        del manifest["profile_cosine"]
    (moved / "manifest.json").write_text(json.dumps(manifest))
    return moved


def test_a_bundle_whose_run_is_gone_is_audited_without_record_or_images(r2mr_bundle: Path, tmp_path: Path) -> None:
    moved = bundle_without_its_run(r2mr_bundle, tmp_path)
    files = write_audit(moved, tmp_path / "out")
    report = files.markdown.read_text()
    assert files.contact_sheet is None and "## Damaged content found" not in report
    assert "the bundle ships no images and the prepared dataset of its run is not on this machine" in report


def brute_force_profile(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The user-profile cosines of the dataset the run trained on, by loops (``user_profile_reference``)."""
    return loop_profile_cosines(load_run(run_dir).dataset)


def brute_force_profile_flags(cosine: np.ndarray, has: np.ndarray, n_users: np.ndarray) -> dict[int, float]:
    """judged row → 1 − c; a missing modality the largest flag; an undefined c the median flag (neutral)."""
    judged = [r for r in range(len(has)) if n_users[r] > 0]
    neutral = float(np.median([1.0 - cosine[r] for r in judged if has[r] and not np.isnan(cosine[r])]))
    return {r: (MISSING_FLAG if not has[r] else neutral if np.isnan(cosine[r]) else 1.0 - cosine[r]) for r in judged}


def brute_force_profile_order(cosine: np.ndarray, has: np.ndarray, n_users: np.ndarray, ids: list[str]) -> list[str]:
    flag = brute_force_profile_flags(cosine, has, n_users)
    return [ids[r] for r in sorted(flag, key=lambda r: (-flag[r], ids[r]))]


def test_the_user_profile_cosine_is_computed_ranked_and_written_for_a_run(r2mr_run: Path, tmp_path: Path) -> None:
    table = audit_table(r2mr_run)
    expected, has = brute_force_profile(r2mr_run)
    assert table.profile is not None
    np.testing.assert_array_equal(np.isnan(table.profile), np.isnan(expected))
    np.testing.assert_allclose(np.nan_to_num(table.profile), np.nan_to_num(expected), atol=1e-9)
    _, n_users, ids = model_scores(r2mr_run)
    write_audit(r2mr_run, tmp_path, top=4)
    with (tmp_path / "synthetic-mm.csv").open() as f:
        rows = list(csv.DictReader(f))
    for k, modality in enumerate(("image", "text")):
        order = brute_force_profile_order(expected[k], has[k], n_users, ids)
        assert [ids[r] for r in profile_ranking(table, k)] == order
        ranked = sorted((row for row in rows if row[f"profile_rank_{modality}"]),
                        key=lambda row: int(row[f"profile_rank_{modality}"]))  # fmt: skip
        assert [row["id"] for row in ranked] == order
        written = [float(row[f"profile_{modality}"]) if row[f"profile_{modality}"] else np.nan for row in rows]
        np.testing.assert_allclose(np.nan_to_num(written), np.nan_to_num(expected[k]), atol=1e-4)
    report = (tmp_path / "synthetic-mm.md").read_text()
    assert "## image: the 4 least in line with their users' other items (user-profile cosine)" in report
    assert "## text: the 4 least in line with their users' other items (user-profile cosine)" in report
    with pytest.raises(ValueError, match="by must be 'reviewer' or 'profile'"):
        detection(table, 0, by="popularity")


def test_the_user_profile_cosine_finds_damage_as_brute_force_counts(corrupted_run: tuple[Path, CorruptionRecord],
                                                                      tmp_path: Path) -> None:  # fmt: skip
    run, record = corrupted_run
    table = audit_table(run)
    expected, has = brute_force_profile(run)
    _, n_users, ids = model_scores(run)
    for k, modality in enumerate(("image", "text")):
        damaged = {item for item, m in record.damaged if m == modality}
        order = brute_force_profile_order(expected[k], has[k], n_users, ids)
        found = detection(table, k, by="profile")
        assert dict(found.precision) == pytest.approx(
            {n: sum(item in damaged for item in order[:n]) / n for n in (10, 50, found.damaged) if 0 < n <= len(order)})
        flag = brute_force_profile_flags(expected[k], has[k], n_users)
        assert found.auroc == pytest.approx(brute_force_auroc(list(flag.values()), [ids[r] in damaged for r in flag]))
    report = write_audit(run, tmp_path, top=3).markdown.read_text()
    assert "Found by the user-profile cosine c instead" in report and "| AUROC (1 − c) |" in report


def test_profile_flags_put_missing_first_undefined_at_the_median_of_defined_ones() -> None:
    """Seven items; g has no training user. image: a, b, c defined (1 − c = 0.1, 0.2, 0.9), d and e lack it, f has it
    with c undefined (the median of 0.1, 0.2, 0.9: 0.2). text: present everywhere, c undefined everywhere."""
    nan = float("nan")
    table = AuditTable(
        source="hand", dataset="toy", item_ids=list("abcdefg"), titles=list("abcdefg"), modality_names=("image", "text"),
        scores=np.full((2, 7), 0.5), states=["disparity"] * 7,
        present=np.array([[1, 1, 1, 0, 0, 1, 1], [1] * 7], dtype=bool), training_users=np.array([3, 3, 3, 3, 3, 3, 0]),
        threshold=0.5, images=None, images_note="", run_summary="",
        corruption=CorruptionRecord(dataset="toy", kind="swapped", fraction=0.3, seed=1,
                                    damaged=(("c", "image"), ("f", "image"))),
        profile=np.array([[0.9, 0.8, 0.1, nan, nan, nan, 0.5], [nan] * 7]),
    )  # fmt: skip
    np.testing.assert_allclose(profile_flags(table, 0), [0.1, 0.2, 0.9, np.inf, np.inf, 0.2, 0.5])
    assert [table.item_ids[r] for r in profile_ranking(table, 0)] == list("decbfa")  # ties by id; g not judged
    np.testing.assert_array_equal(profile_flags(table, 1), np.zeros(7))  # nothing defined: all neutral
    assert [table.item_ids[r] for r in profile_ranking(table, 1)] == list("abcdef")
    found = detection(table, 0, by="profile")
    assert (found.ranked, found.damaged, found.precision) == (6, 2, ((2, 0.0),))  # d, e first: not damaged
    assert found.auroc == pytest.approx(3.5 / 8)  # c beats a, b; f beats a, ties b: (2 + 1.5) / (2 × 4)


def test_a_bundle_audit_reads_the_user_profile_cosine_it_carries(
        r2mr_bundle: Path, corrupted_run: tuple[Path, CorruptionRecord], tmp_path: Path) -> None:  # fmt: skip
    run = audit_table(corrupted_run[0])
    assert run.profile is not None
    for bundle_dir in (r2mr_bundle, bundle_without_its_run(r2mr_bundle, tmp_path)):  # the run is not needed
        bundle = audit_table(bundle_dir)
        assert bundle.profile is not None and bundle.profile_note == ""
        np.testing.assert_array_equal(bundle.profile, run.profile)  # written at export by the same code: bit for bit
        for k in range(2):
            np.testing.assert_array_equal(profile_ranking(bundle, k), profile_ranking(run, k))
    with write_audit(r2mr_bundle, tmp_path / "out").csv.open() as f:
        assert "profile_image" in next(csv.reader(f))


def test_an_older_bundle_computes_the_user_profile_cosine_from_its_runs_dataset(
        r2mr_bundle: Path, corrupted_run: tuple[Path, CorruptionRecord], tmp_path: Path) -> None:  # fmt: skip
    older = tmp_path / "older"
    shutil.copytree(r2mr_bundle, older)
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["profile_cosine"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    run, bundle = audit_table(corrupted_run[0]), audit_table(older)
    assert bundle.profile is not None and run.profile is not None
    np.testing.assert_array_equal(bundle.profile, run.profile)  # same dataset, same code: bit for bit
    for k in range(2):
        assert detection(bundle, k, by="profile") == detection(run, k, by="profile")


def test_an_older_bundle_whose_run_is_gone_says_why_it_has_no_user_profile_cosine(r2mr_bundle: Path,
                                                                                  tmp_path: Path) -> None:  # fmt: skip
    moved = bundle_without_its_run(r2mr_bundle, tmp_path, exported_before_profiles=True)
    table = audit_table(moved)
    assert table.profile is None and table.profile_note == (
        "Not computed: the bundle was exported before bundles carried it (profile_<modality> in item_metadata.jsonl), "
        "and it needs the training interactions, which a bundle does not ship, and the run the bundle was exported "
        "from is not on this machine.")
    with pytest.raises(ValueError, match="no user-profile cosine for the bundle .*: Not computed: the bundle was"):
        detection(table, 0, by="profile")
    files = write_audit(moved, tmp_path / "out")
    assert table.profile_note in files.markdown.read_text()
    with files.csv.open() as f:
        assert not any(name.startswith("profile_") for name in next(csv.reader(f)))


def test_a_dataset_without_images_gets_no_contact_sheet() -> None:
    images, note = bundle_images(None, ["a"], ("audio", "text"))
    assert images is None and note == "this bundle has no images (its modalities: audio, text): no contact sheet"


@pytest.mark.parametrize(("text", "title"), [
    ("U.S. Marshals (1998). Action|Thriller. A fugitive...", "U.S. Marshals (1998)"),
    ("What Happened Was... (1994). Comedy. Two people.", "What Happened Was... (1994)"),
    ("Kolya (1996)", "Kolya (1996)"),
    ("rock, indie. Artists like these", "rock, indie"),
    (None, "(no text)"),
])  # fmt: skip
def test_titles_end_at_the_year(text: str | None, title: str) -> None:
    assert item_title(text) == title


def refused(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0].removeprefix("Error: ")


def test_audit_refuses_a_path_that_is_no_run_or_bundle(tmp_path: Path) -> None:
    assert refused(["audit", str(tmp_path / "absent")]) == (
        f"{tmp_path / 'absent'}: no such directory (expected an R2MR run directory or bundle)")
    assert refused(["audit", str(tmp_path)]) == (f"{tmp_path} is neither a training run directory (config.json, "
                                                 "metrics.json, checkpoint.pt) nor a bundle (manifest.json)")  # fmt: skip


def test_audit_refuses_a_run_of_another_model(tmp_path: Path) -> None:
    for name, text in (("config.json", json.dumps({"model": "lightgcn"})), ("metrics.json", "{}"), ("checkpoint.pt", "")):
        (tmp_path / name).write_text(text)
    assert refused(["audit", str(tmp_path)]) == (
        f"{tmp_path} is a lightgcn run, not r2mr: only R2MR's reviewer judges modality quality")


def test_audit_refuses_a_bundle_without_quality_scores(r2mr_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(r2mr_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["model"]["name"] = "lightgcn"
    manifest["item_encoder"]["extra_outputs"] = {}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert refused(["audit", str(bundle)]) == (f"bundle {bundle} (model lightgcn) has no modality quality scores "
                                               "(quality_<modality> and quality_state in its item metadata): export an "
                                               "R2MR run (its user-profile cosines are served by GET "
                                               "/v1/audit?by=profile)")  # fmt: skip
    del manifest["profile_cosine"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert refused(["audit", str(bundle)]).endswith("export an R2MR run")


def test_audit_refuses_a_top_below_one(r2mr_run: Path, tmp_path: Path) -> None:
    assert refused(["audit", str(r2mr_run), "--out", str(tmp_path), "--top", "0"]) == "--top must be at least 1, got 0"
