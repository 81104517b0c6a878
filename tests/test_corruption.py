"""training/data/corruption.py and its config: seeded, recorded, each kind does what it says, interactions untouched;
the corruption composes like any setting and travels with the run (config.json, corruption.json, load_run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.config import ConfigError
from tests.synthetic_datasets import multimodal_dataset
from training.config import CorruptionConfig, Overrides, compose
from training.data.corruption import corrupt_content, damaged_pairs
from training.data.dataset import InteractionDataset


@pytest.fixture(scope="module")
def dataset() -> InteractionDataset:
    return multimodal_dataset(n_users=40, n_items=120, seed=3)


def corrupted(dataset: InteractionDataset, kind: str, fraction: float = 0.4, seed: int = 7):  # type: ignore[no-untyped-def]
    return corrupt_content(dataset, CorruptionConfig(kind=kind, fraction=fraction, seed=seed))


def with_content(dataset: InteractionDataset) -> np.ndarray:
    return np.flatnonzero(np.stack([m.present for m in dataset.modalities.values()]).any(axis=0))


@pytest.mark.parametrize("kind", ["missing", "swapped", "noise"])
def test_the_same_seed_damages_the_same_pairs_and_another_seed_others(dataset: InteractionDataset, kind: str) -> None:
    first, again, other = corrupted(dataset, kind, seed=7), corrupted(dataset, kind, seed=7), corrupted(dataset, kind, seed=8)
    assert first.damaged == again.damaged
    assert first.damaged != other.damaged
    for name in dataset.modalities:
        np.testing.assert_array_equal(first.dataset.modalities[name].features, again.dataset.modalities[name].features)


def test_a_fraction_of_the_items_with_content_gets_one_present_modality_damaged(dataset: InteractionDataset) -> None:
    candidates = with_content(dataset)
    pairs = damaged_pairs(dataset, fraction=0.4, seed=7)
    rows = [row for row, _ in pairs]
    assert len(rows) == len(set(rows)) == round(0.4 * candidates.size)  # one modality per item
    assert set(rows) <= set(candidates.tolist())
    assert all(dataset.modalities[m].present[row] for row, m in pairs)  # only a modality the item has
    assert {m for _, m in pairs} == {"text", "image"}


def test_the_items_damaged_at_a_smaller_fraction_are_among_those_at_a_larger_one(dataset: InteractionDataset) -> None:
    small, large = damaged_pairs(dataset, fraction=0.2, seed=7), damaged_pairs(dataset, fraction=0.4, seed=7)
    assert set(small) < set(large)  # same items, same modality choice
    for kind in ("missing", "swapped", "noise"):  # the draw does not depend on the kind
        assert corrupted(dataset, kind).damaged == large


def test_missing_switches_the_mask_off_and_zeroes_the_row(dataset: InteractionDataset) -> None:
    result = corrupted(dataset, "missing")
    for name, original in dataset.modalities.items():
        after = result.dataset.modalities[name]
        hit = result.damaged_mask(name)
        assert not after.present[hit].any() and (after.features[hit] == 0).all()
        np.testing.assert_array_equal(after.present[~hit], original.present[~hit])
        np.testing.assert_array_equal(after.features[~hit], original.features[~hit])


def test_swapped_takes_another_items_original_feature_of_that_modality(dataset: InteractionDataset) -> None:
    result = corrupted(dataset, "swapped")
    for name, original in dataset.modalities.items():
        after = result.dataset.modalities[name]
        for row in np.flatnonzero(result.damaged_mask(name)):
            sources = np.flatnonzero((original.features == after.features[row]).all(axis=1) & original.present)
            assert sources.size and row not in sources  # some other item's feature, never its own
        np.testing.assert_array_equal(after.present, original.present)
        untouched = ~result.damaged_mask(name)
        np.testing.assert_array_equal(after.features[untouched], original.features[untouched])


def test_noise_has_the_modalitys_mean_and_covariance(dataset: InteractionDataset) -> None:
    from training.data.corruption import covariance_noise

    modality = dataset.modalities["text"]
    reference = modality.features[modality.present].astype(np.float64)
    draws = covariance_noise(modality, 200_000, np.random.default_rng(0)).astype(np.float64)
    scale = np.abs(np.cov(reference, rowvar=False)).max()
    np.testing.assert_allclose(draws.mean(axis=0), reference.mean(axis=0), atol=0.02 * np.sqrt(scale))
    np.testing.assert_allclose(np.cov(draws, rowvar=False), np.cov(reference, rowvar=False), atol=0.03 * scale)
    result = corrupted(dataset, "noise")
    hit = result.damaged_mask("text")
    after = result.dataset.modalities["text"].features
    assert not np.isin(after[hit], modality.features).all(axis=1).any()  # new vectors, no item's own
    np.testing.assert_array_equal(result.dataset.modalities["text"].present, modality.present)


@pytest.mark.parametrize("kind", ["missing", "swapped", "noise"])
def test_interactions_splits_and_raw_content_are_untouched(dataset: InteractionDataset, kind: str) -> None:
    after = corrupted(dataset, kind).dataset
    for column in ("user", "item", "timestamp", "split"):
        np.testing.assert_array_equal(getattr(after, column), getattr(dataset, column))
    assert (after.item_ids, after.item_text, after.item_image) == (dataset.item_ids, dataset.item_text, dataset.item_image)
    for name, original in dataset.modalities.items():  # the input dataset itself is not modified
        assert original.features is dataset.modalities[name].features


def test_a_clean_config_changes_nothing(dataset: InteractionDataset) -> None:
    result = corrupt_content(dataset, CorruptionConfig())
    assert result.dataset is dataset and result.damaged == ()


def test_the_record_names_items_by_their_ids(dataset: InteractionDataset) -> None:
    result = corrupted(dataset, "swapped")
    record = result.record()
    assert (record.kind, record.fraction, record.seed, record.dataset) == ("swapped", 0.4, 7, dataset.name)
    assert record.damaged == tuple((dataset.item_ids[row], m) for row, m in result.damaged)


# ------------------------------------------------------------------------------------------------ the config
def test_compose_carries_the_corruption_and_it_round_trips_through_a_dict() -> None:
    from models.config import build_config, config_to_dict

    run = compose("ml100k-posters", "vbpr", Overrides.from_assignments(corruption=["kind=noise", "fraction=0.2", "seed=3"]))
    assert run.corruption == CorruptionConfig(kind="noise", fraction=0.2, seed=3)
    assert build_config(CorruptionConfig, json.loads(json.dumps(config_to_dict(run.corruption)))) == run.corruption
    assert compose("ml100k-posters", "vbpr").corruption == CorruptionConfig()  # clean unless asked
    assert run.corruption.label() == "noise-p20-c3"


@pytest.mark.parametrize(("model", "corruption", "message"), [
    ("vbpr", {"kind": "blur", "fraction": "0.2"}, "--corrupt: vbpr corruption setting kind='blur': expected one of none, missing"),
    ("vbpr", {"kind": "swapped"}, "--corrupt: vbpr corruption setting kind=swapped with fraction=0.0: a clean run is"),
    ("vbpr", {"kind": "swapped", "fraction": "1.5"}, "--corrupt: vbpr corruption setting fraction=1.5: expected a share"),
    ("vbpr", {"share": "0.2"}, "--corrupt: vbpr has no corruption setting 'share'; valid: kind, fraction, seed"),
    ("lightgcn", {"kind": "swapped", "fraction": "0.4"}, "--corrupt: lightgcn reads no item content"),
])  # fmt: skip
def test_a_bad_corruption_is_refused_with_one_line(model: str, corruption: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose("ml100k-posters", model, Overrides(corruption=corruption))
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------- through a run
def test_a_corrupted_run_records_its_corruption_and_reloads_on_the_damaged_content(tmp_path: Path) -> None:
    from training.fit.trainer import train
    from training.runs import load_run, read_config, read_corruption

    data = multimodal_dataset()
    directory = tmp_path / "data"
    data.save(directory)
    corruption = CorruptionConfig(kind="missing", fraction=0.5, seed=4)
    run = compose(data.name, "vbpr", Overrides(train={"epochs": 1, "progress": False}))
    result = train(data, "vbpr", dataset_dir=directory, model_config=run.model_config, train_config=run.train,
                   runs_root=tmp_path / "runs", corruption=corruption)  # fmt: skip
    assert result.run_dir is not None and result.run_dir.name.endswith("-missing-p50-c4")
    assert read_config(result.run_dir)["corruption"] == {"kind": "missing", "fraction": 0.5, "seed": 4}
    expected = corrupt_content(data, corruption)
    assert read_corruption(result.run_dir) == expected.record()
    loaded = load_run(result.run_dir)
    for name in data.modalities:
        np.testing.assert_array_equal(loaded.dataset.modalities[name].present, expected.dataset.modalities[name].present)
        np.testing.assert_array_equal(loaded.inputs.modalities[name].present.numpy(), expected.dataset.modalities[name].present)
    (result.run_dir / "corruption.json").write_text(json.dumps({**json.loads((result.run_dir / "corruption.json")
                                                                            .read_text()), "damaged": []}))  # fmt: skip
    with pytest.raises(ValueError, match="does not damage the items its corruption.json records"):
        load_run(result.run_dir)


def test_a_clean_run_has_no_corruption_key_and_is_in_the_results_ledger_while_a_corrupted_one_is_not(tmp_path: Path) -> None:
    from training.experiments.results import scan_runs
    from training.fit.trainer import train
    from training.runs import read_config

    data = multimodal_dataset()
    data.save(tmp_path / "data")
    run = compose(data.name, "vbpr", Overrides(train={"epochs": 1, "progress": False}))
    clean, damaged = (train(data, "vbpr", dataset_dir=tmp_path / "data", model_config=run.model_config,
                            train_config=run.train, runs_root=tmp_path / "runs", corruption=corruption).run_dir
                      for corruption in (None, CorruptionConfig(kind="noise", fraction=0.3, seed=1)))  # fmt: skip
    assert clean is not None and damaged is not None
    assert "corruption" not in read_config(clean)
    assert [Path(name).name for name in scan_runs(tmp_path / "runs")] == [clean.name]
