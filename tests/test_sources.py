"""Raw-data readers against the real shared data (skipped where absent), the MMRec importer on a synthetic folder,
and the prepared-dataset format's save/load round trip."""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.data.dataset import TEST, TRAIN, VALID, DatasetFormatError, InteractionDataset, Modality
from training.data.prepare import ContentEncoders, prepare_dataset
from training.data.sources import (
    RawDataset,
    SourceMissingError,
    read_amazon_baby,
    read_amazon_scientific,
    read_lfm2k,
    read_ml100k_posters,
    read_mmrec,
)
from training.settings import Paths, default_paths

DATA_ROOT = default_paths().data_root


def real_source(folder: str, reader: Callable[[Paths], RawDataset]) -> RawDataset:
    if not (DATA_ROOT / folder).is_dir():
        pytest.skip(f"shared data {DATA_ROOT / folder} is absent (set MMREC_DATA_ROOT to the raw datasets folder)")
    return reader(default_paths())


@pytest.fixture(scope="module")
def ml100k() -> RawDataset:
    return real_source("ml100k-posters", read_ml100k_posters)


@pytest.fixture(scope="module")
def lfm2k() -> RawDataset:
    return real_source("lfm2k", read_lfm2k)


@pytest.fixture(scope="module")
def baby() -> RawDataset:
    return real_source("amazon-baby", read_amazon_baby)


@pytest.fixture(scope="module")
def scientific() -> RawDataset:
    return real_source("amazon-scientific", read_amazon_scientific)


def shape(raw: RawDataset) -> tuple[int, int, int]:
    return len(raw.user_ids), len(raw.item_ids), int(raw.user.shape[0])


# ------------------------------------------------------------------------------------------- ml100k-posters
@pytest.mark.shared_data
def test_ml100k_posters_counts(ml100k: RawDataset) -> None:
    assert shape(ml100k) == (943, 1663, 99_815)
    assert len(np.unique(ml100k.user)) == 943 and len(np.unique(ml100k.item)) == 1663
    assert ml100k.given_split is None  # no split in the source: the random 8:1:1 is chosen at preparation


def first_item_rows() -> dict[str, dict[str, str]]:
    rows: dict[str, dict[str, str]] = {}
    with (DATA_ROOT / "ml100k-posters" / "items.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            rows.setdefault(row["movie_id"], row)
    return rows


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("movie_id", "expected_start"),
    [
        ("1", "Toy Story (1995). Animation, Children, Comedy. Led by Woody, Andy's toys live happily"),
        # movie 56 is one of the repeated movie_ids in items.csv: the first row gives the text
        ("56", "Pulp Fiction (1994). Crime, Drama. A burger-loving hit man"),
    ],
)
def test_ml100k_posters_item_text_is_title_genres_overview(
    ml100k: RawDataset, movie_id: str, expected_start: str
) -> None:
    text = ml100k.item_text[ml100k.item_ids.index(movie_id)]
    assert text is not None and text.startswith(expected_start)
    assert text.endswith(first_item_rows()[movie_id]["overview"].strip())  # ends its own sentence: no ".." added


@pytest.mark.shared_data
def test_ml100k_posters_every_text_is_title_then_overview_with_one_final_stop(ml100k: RawDataset) -> None:
    rows = first_item_rows()
    for movie_id, text in zip(ml100k.item_ids, ml100k.item_text, strict=True):
        title, overview = rows[movie_id]["title"].strip(), rows[movie_id]["overview"].strip()
        assert text is not None and text.startswith(f"{title}. ")
        assert text.endswith((".", "!", "?"))
        if overview:
            assert text.endswith(overview) or text.endswith(overview + "."), movie_id
        if text.endswith(".."):  # only where TMDB's own overview ends so
            assert overview.endswith(".."), movie_id


@pytest.mark.shared_data
def test_ml100k_posters_poster_paths_exist(ml100k: RawDataset) -> None:
    for movie_id, image in zip(ml100k.item_ids, ml100k.item_image, strict=True):
        assert image is not None
        assert Path(image).name == f"{movie_id}.jpg"
        assert Path(image).is_file()


def write_ml100k_posters(root: Path) -> None:
    """A three-movie ml100k-posters folder where movie 2 appears twice with different rows."""
    folder = root / "ml100k-posters"
    (folder / "posters").mkdir(parents=True)
    genre_columns = ["genre_unknown", "Action", "Comedy", "Drama"]
    with (folder / "items.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["movie_id", "title", *genre_columns, "overview"])
        writer.writerow(["1", " Heat (1995) ", 0, 1, 0, 1, "Cops and robbers."])
        writer.writerow(["2", "Clueless (1995)", 0, 0, 1, 0, "Teen comedy"])
        writer.writerow(["2", "Second row (2000)", 0, 1, 0, 0, "Must not be used."])
        writer.writerow(["3", "No Overview (1990)", 0, 0, 0, 0, ""])
    with (folder / "ratings.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "movie_id", "rating", "unix_timestamp"])
        writer.writerows([[10, 2, 5, 100], [10, 1, 3, 200], [20, 3, 4, 150], [20, 2, 1, 50]])
    (folder / "posters" / "2.jpg").write_bytes(b"\xff\xd8\xff")


def test_read_ml100k_posters_first_row_of_a_repeated_movie_wins(tmp_path: Path) -> None:
    write_ml100k_posters(tmp_path)
    raw = read_ml100k_posters(Paths(data_root=tmp_path, home=tmp_path / "home"))
    assert raw.user_ids == ["10", "20"] and raw.item_ids == ["2", "1", "3"]  # order of first appearance
    assert raw.user.tolist() == [0, 0, 1, 1] and raw.item.tolist() == [0, 1, 2, 0]
    assert raw.timestamp.tolist() == [100, 200, 150, 50]
    assert raw.item_text == [
        "Clueless (1995). Comedy. Teen comedy.",  # first row; a full stop is added where the overview lacks one
        "Heat (1995). Action, Drama. Cops and robbers.",  # title stripped; no doubled full stop
        "No Overview (1990).",  # no genre, no overview
    ]
    assert raw.item_image == [str(tmp_path / "ml100k-posters" / "posters" / "2.jpg"), None, None]


def test_read_ml100k_posters_missing_folder_says_which_setting(tmp_path: Path) -> None:
    with pytest.raises(SourceMissingError, match="MMREC_DATA_ROOT"):
        read_ml100k_posters(Paths(data_root=tmp_path, home=tmp_path))


# ------------------------------------------------------------------------------------------------------ lfm2k
@pytest.mark.shared_data
def test_lfm2k_counts_and_given_split(lfm2k: RawDataset) -> None:
    assert shape(lfm2k) == (1858, 1425, 56_345)
    with (DATA_ROOT / "lfm2k" / "lfm2k.inter").open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert lfm2k.given_split is not None
    np.testing.assert_array_equal(lfm2k.given_split, [int(r["x_label"]) for r in rows])
    np.testing.assert_array_equal(lfm2k.user, [int(r["userID"]) for r in rows])
    np.testing.assert_array_equal(lfm2k.item, [int(r["itemID"]) for r in rows])


@pytest.mark.shared_data
@pytest.mark.parametrize(("name", "file", "dim"), [("text", "all-MiniLM-L6-v2.npy", 384), ("audio", "vggish.npy", 128)])
def test_lfm2k_modalities(lfm2k: RawDataset, name: str, file: str, dim: int) -> None:
    assert set(lfm2k.precomputed) == {"text", "audio"}
    modality = lfm2k.precomputed[name]
    assert modality.features.shape == (1425, dim) and modality.features.dtype == np.float32
    assert modality.present.all()
    np.testing.assert_allclose(modality.features, np.load(DATA_ROOT / "lfm2k" / file), rtol=1e-6)


@pytest.mark.shared_data
def test_lfm2k_prepare_keeps_the_given_split(lfm2k: RawDataset) -> None:
    dataset = prepare_dataset(lfm2k)
    assert dataset.split_name == "given" and not dataset.sequential
    assert lfm2k.given_split is not None
    np.testing.assert_array_equal(dataset.split, lfm2k.given_split)
    assert set(dataset.modalities) == {"text", "audio"}


@pytest.mark.shared_data
def test_lfm2k_item_text_names_the_artist(lfm2k: RawDataset) -> None:
    assert all(t for t in lfm2k.item_text)
    assert lfm2k.item_text[0] is not None and lfm2k.item_text[0].startswith("Groove Armada. ")


# ------------------------------------------------------------------------------------------------ amazon-baby
@pytest.mark.shared_data
def test_amazon_baby_counts_and_given_split(baby: RawDataset) -> None:
    assert shape(baby) == (19_445, 7050, 160_792)
    assert baby.given_split is not None
    root = DATA_ROOT / "amazon-baby" / "5-core"
    for code, file in ((TRAIN, "train.json"), (VALID, "val.json"), (TEST, "test.json")):
        expected = sum(len(items) for items in json.loads((root / file).read_text()).values())
        assert int((baby.given_split == code).sum()) == expected, file
    assert baby.item_text == [None] * 7050 and not baby.precomputed


# ------------------------------------------------------------------------------------------ amazon-scientific
@pytest.mark.shared_data
def test_amazon_scientific_counts(scientific: RawDataset) -> None:
    assert shape(scientific) == (2928, 1585, 19_712)  # the README's counts
    assert scientific.given_split_sequential
    assert sum(t is not None for t in scientific.item_text) > 0.9 * 1585


@pytest.mark.shared_data
def test_amazon_scientific_test_item_is_last_in_time_and_valid_second_last(scientific: RawDataset) -> None:
    assert scientific.given_split is not None
    order = np.lexsort((scientific.timestamp, scientific.user))
    users, split = scientific.user[order], scientific.given_split[order]
    last = np.r_[users[1:] != users[:-1], True]  # each user's last row in time
    assert (split[last] == TEST).all()
    assert (split == TEST).sum() == 2928
    second_last = np.r_[last[1:], False] & ~last
    assert (split[second_last] == VALID).all() and (split == VALID).sum() == 2928


@pytest.mark.shared_data
@pytest.mark.parametrize(("file", "code"), [("Scientific.test.inter", TEST), ("Scientific.valid.inter", VALID)])
def test_amazon_scientific_targets_match_the_files(scientific: RawDataset, file: str, code: int) -> None:
    assert scientific.given_split is not None
    targets = {}
    for line in (DATA_ROOT / "amazon-scientific" / file).read_text().splitlines()[1:]:
        user, _, target = line.split("\t")
        targets[int(user)] = int(target)
    labelled = scientific.given_split == code
    assert dict(zip(scientific.user[labelled].tolist(), scientific.item[labelled].tolist(), strict=True)) == targets


# ------------------------------------------------------------------------------------------ MMRec importer
def write_mmrec(folder: Path, *, header: str = "userID\titemID\trating\tx_label", rows: list[str] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else ["0\t0\t1\t0", "0\t1\t1\t0", "0\t2\t1\t1", "0\t3\t1\t2",
                                          "1\t1\t1\t0", "1\t3\t1\t0", "2\t2\t1\t2"]  # fmt: skip
    (folder / f"{folder.name}.inter").write_text("\n".join([header, *rows]) + "\n")
    rng = np.random.default_rng(0)
    np.save(folder / "text_feat.npy", rng.normal(size=(4, 5)).astype(np.float32) + 10)
    image = rng.normal(size=(4, 3)) + 10  # float64, as some MMRec files are
    image[2] = 0.0  # an all-zero row: item 2 has no image
    np.save(folder / "image_feat.npy", image)


def test_read_mmrec_imports_interactions_split_and_features(tmp_path: Path) -> None:
    write_mmrec(tmp_path / "toy")
    raw = read_mmrec(tmp_path / "toy")
    assert raw.name == "toy"
    assert shape(raw) == (3, 4, 7)
    assert raw.user.tolist() == [0, 0, 0, 0, 1, 1, 2] and raw.item.tolist() == [0, 1, 2, 3, 1, 3, 2]
    assert raw.given_split is not None and raw.given_split.tolist() == [0, 0, 1, 2, 0, 0, 2]
    assert set(raw.precomputed) == {"text", "image"}
    text, image = raw.precomputed["text"], raw.precomputed["image"]
    assert text.present.all() and text.dim == 5
    assert image.present.tolist() == [True, True, False, True]
    assert image.features.dtype == np.float32 and not image.features[2].any()
    np.testing.assert_allclose(image.features[[0, 1, 3]], np.load(tmp_path / "toy" / "image_feat.npy")[[0, 1, 3]],
                               rtol=1e-6)  # fmt: skip


def test_read_mmrec_missing_x_label_column_is_named(tmp_path: Path) -> None:
    write_mmrec(tmp_path / "toy", header="userID\titemID\trating", rows=["0\t0\t1", "1\t1\t1"])
    with pytest.raises(ValueError, match=r"column 'x_label' missing \(found \['userID', 'itemID', 'rating'\]\)"):
        read_mmrec(tmp_path / "toy")


def test_read_mmrec_header_only_file_is_a_clear_error(tmp_path: Path) -> None:
    write_mmrec(tmp_path / "toy", rows=[])
    with pytest.raises(ValueError, match="no interactions"):
        read_mmrec(tmp_path / "toy")


def test_read_mmrec_rejects_unknown_split_label(tmp_path: Path) -> None:
    write_mmrec(tmp_path / "toy", rows=["0\t0\t1\t0", "0\t1\t1\t3"])
    with pytest.raises(ValueError, match="x_label must be 0, 1 or 2"):
        read_mmrec(tmp_path / "toy")


def test_read_mmrec_rejects_features_with_too_few_rows(tmp_path: Path) -> None:
    write_mmrec(tmp_path / "toy", rows=["0\t0\t1\t0", "0\t9\t1\t2"])  # item 9 but only 4 feature rows
    with pytest.raises(ValueError, match=r"expected \(10, d\) features"):
        read_mmrec(tmp_path / "toy")


def test_read_mmrec_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SourceMissingError, match="absent"):
        read_mmrec(tmp_path / "absent")


# ------------------------------------------------------------------------------- prepare + save/load round trip
def assert_same_dataset(a: InteractionDataset, b: InteractionDataset) -> None:
    assert (a.name, a.split_name, a.sequential) == (b.name, b.split_name, b.sequential)
    assert (a.user_ids, a.item_ids, a.item_text, a.item_image) == (b.user_ids, b.item_ids, b.item_text, b.item_image)
    for column in ("user", "item", "timestamp", "split"):
        np.testing.assert_array_equal(getattr(a, column), getattr(b, column), err_msg=column)
    assert set(a.modalities) == set(b.modalities)
    for name, m in a.modalities.items():
        np.testing.assert_array_equal(m.features, b.modalities[name].features, err_msg=name)
        np.testing.assert_array_equal(m.present, b.modalities[name].present, err_msg=name)
        assert m.encoder == b.modalities[name].encoder
    assert dict(a.report) == dict(b.report)


def test_prepare_dataset_save_load_round_trip(tmp_path: Path) -> None:
    write_mmrec(tmp_path / "toy")
    dataset = prepare_dataset(read_mmrec(tmp_path / "toy"))
    assert dataset.split_name == "given"
    assert dataset.report["missing"]["image"] == {"absent_feature_row": 1}
    dataset.save(tmp_path / "prepared")
    loaded = InteractionDataset.load(tmp_path / "prepared")
    assert_same_dataset(dataset, loaded)
    assert loaded.modalities["image"].present.dtype == bool
    meta = json.loads((tmp_path / "prepared" / "dataset.json").read_text())
    assert meta["split_sizes"] == {"train": 4, "valid": 1, "test": 2}
    assert meta["modalities"]["image"] == {"dim": 3, "encoder": "precomputed:image_feat.npy", "n_present": 3}


@pytest.mark.parametrize(
    ("split", "split_name", "sequential", "name"),
    [("random", "random-811-seed5", False, "toy"), ("loo", "loo-time", True, "toy-seq"), ("given", "given", False, "toy")],
)
def test_prepare_dataset_split_choice(tmp_path: Path, split: str, split_name: str, sequential: bool, name: str) -> None:
    write_mmrec(tmp_path / "toy")
    dataset = prepare_dataset(read_mmrec(tmp_path / "toy"), split=split, seed=5)  # type: ignore[arg-type]
    assert (dataset.split_name, dataset.sequential, dataset.name) == (split_name, sequential, name)


def test_prepare_dataset_encodes_text_with_the_given_encoder(tmp_path: Path) -> None:
    write_ml100k_posters(tmp_path)
    raw = read_ml100k_posters(Paths(data_root=tmp_path, home=tmp_path / "home"))
    seen: list[list[str | None]] = []

    def fake_text(texts: list[str | None]) -> tuple[Modality, dict[str, int]]:
        seen.append(texts)
        present = np.array([t is not None for t in texts])
        return Modality("text", np.ones((len(texts), 2), dtype=np.float32), present, "fake-v1"), {"empty": 0}

    dataset = prepare_dataset(raw, encoders=ContentEncoders(text=fake_text, image=None))
    assert seen == [raw.item_text]
    assert set(dataset.modalities) == {"text"} and dataset.modalities["text"].encoder == "fake-v1"
    assert dataset.report["missing"]["text"] == {"empty": 0}


@settings(max_examples=25, deadline=None, database=None)
@given(texts=st.lists(st.one_of(st.none(), st.text()), min_size=1, max_size=6))
def test_dataset_save_load_round_trips_any_item_text(texts: list[str | None]) -> None:
    # JSON Lines read back with str.splitlines(): text with \n, \u2028, \x85, ... must not split a record
    n = len(texts)
    dataset = InteractionDataset(
        name="t", split_name="given", sequential=False, user_ids=["u"], item_ids=[str(i) for i in range(n)],
        user=np.zeros(n, dtype=np.int64), item=np.arange(n), timestamp=np.arange(n),
        split=np.zeros(n, dtype=np.int8), item_text=texts, item_image=[None] * n,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as directory:
        dataset.save(Path(directory))
        assert InteractionDataset.load(Path(directory)).item_text == texts


def test_dataset_load_without_dataset_json_explains(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError) as info:
        InteractionDataset.load(tmp_path)
    assert str(info.value) == f"{tmp_path} is not a prepared dataset (no dataset.json); run `mmrec prepare`"


def test_dataset_load_rejects_another_format_version(tmp_path: Path) -> None:
    write_mmrec(tmp_path / "toy")
    prepare_dataset(read_mmrec(tmp_path / "toy")).save(tmp_path / "prepared")
    meta_path = tmp_path / "prepared" / "dataset.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "format_version": 99}))
    with pytest.raises(DatasetFormatError, match="dataset format 99 but this code reads 1"):
        InteractionDataset.load(tmp_path / "prepared")
