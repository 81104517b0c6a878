"""The project's one dataset format: interactions with their split, items, and named item modalities.

On disk a prepared dataset is a directory::

    dataset.json            name, split, counts, modality descriptions, preparation report, format version
    interactions.npz        user, item, timestamp (int64) and split (int8: 0 train, 1 valid, 2 test), one row each
    users.json / items.json external ids; row r of every per-item array belongs to items.json[r]
    item_content.jsonl      per item: {"text": str | null, "image": absolute path | null}
    modalities/<name>.npy       float32 (n_items, d); rows of missing items are zero and MUST be read with the mask
    modalities/<name>.mask.npy  bool (n_items,); True where the item has this modality

The split is stored with the interactions, so every model trained on one prepared dataset sees the same split.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

FORMAT_VERSION = 1
TRAIN, VALID, TEST = 0, 1, 2
SPLIT_CODES = {"train": TRAIN, "valid": VALID, "test": TEST}


class DatasetFormatError(ValueError):
    """A prepared dataset directory is missing a file or is inconsistent."""


@dataclass(frozen=True)
class Modality:
    """One kind of item content (text, image, audio, ...) as fixed-size feature vectors."""

    name: str
    features: np.ndarray  # (n_items, d) float32, zero where absent
    present: np.ndarray  # (n_items,) bool
    encoder: str

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.present.shape != (self.features.shape[0],):
            raise DatasetFormatError(
                f"modality {self.name!r}: features {self.features.shape} and mask {self.present.shape} disagree"
            )

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


@dataclass(frozen=True)
class InteractionDataset:
    """A dataset with its split, in memory. Users and items are contiguous integer rows."""

    name: str
    split_name: str
    sequential: bool  # True when the split is leave-one-out by time (valid/test = a user's last items)
    user_ids: list[str]
    item_ids: list[str]
    user: np.ndarray  # (E,) int64
    item: np.ndarray  # (E,) int64
    timestamp: np.ndarray  # (E,) int64
    split: np.ndarray  # (E,) int8
    item_text: list[str | None]
    item_image: list[str | None]
    modalities: Mapping[str, Modality] = field(default_factory=dict)
    report: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.user.shape[0]
        for arr_name in ("item", "timestamp", "split"):
            if getattr(self, arr_name).shape != (n,):
                raise DatasetFormatError(f"interactions: column {arr_name!r} has a different length than 'user'")
        if n and (self.user.max() >= self.n_users or self.item.max() >= self.n_items):
            raise DatasetFormatError("interactions refer to users or items beyond the id lists")
        if len(self.item_text) != self.n_items or len(self.item_image) != self.n_items:
            raise DatasetFormatError("item content lists must have one entry per item")
        for m in self.modalities.values():
            if m.features.shape[0] != self.n_items:
                raise DatasetFormatError(f"modality {m.name!r} has {m.features.shape[0]} rows, expected {self.n_items}")

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def edges(self, split: int) -> tuple[np.ndarray, np.ndarray]:
        """(users, items) of the interactions in one split, in stored order."""
        keep = self.split == split
        return self.user[keep], self.item[keep]

    def matrix(self, split: int) -> sp.csr_matrix:
        """Binary user×item CSR matrix of one split (duplicates collapse to 1)."""
        users, items = self.edges(split)
        m = sp.csr_matrix(
            (np.ones(users.shape[0], dtype=np.float32), (users, items)), shape=(self.n_users, self.n_items)
        )
        m.data[:] = 1.0
        return m

    def chronological_history(self, *, through: int) -> list[np.ndarray]:
        """Per user, items of splits ≤ ``through`` ordered by (timestamp, stored order): the sequence input."""
        keep = self.split <= through
        idx = np.nonzero(keep)[0]
        order = idx[np.lexsort((idx, self.timestamp[idx], self.user[idx]))]
        users, items = self.user[order], self.item[order]
        bounds = np.searchsorted(users, np.arange(self.n_users + 1))
        return [items[bounds[u] : bounds[u + 1]] for u in range(self.n_users)]

    # ----------------------------------------------------------------------------------------------- disk I/O
    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "modalities").mkdir(exist_ok=True)
        np.savez(
            directory / "interactions.npz",
            user=self.user.astype(np.int64),
            item=self.item.astype(np.int64),
            timestamp=self.timestamp.astype(np.int64),
            split=self.split.astype(np.int8),
        )
        (directory / "users.json").write_text(json.dumps(self.user_ids))
        (directory / "items.json").write_text(json.dumps(self.item_ids))
        with (directory / "item_content.jsonl").open("w") as f:
            for text, image in zip(self.item_text, self.item_image, strict=True):
                f.write(json.dumps({"text": text, "image": image}) + "\n")
        for m in self.modalities.values():
            np.save(directory / "modalities" / f"{m.name}.npy", m.features.astype(np.float32))
            np.save(directory / "modalities" / f"{m.name}.mask.npy", m.present.astype(bool))
        meta = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "split": self.split_name,
            "sequential": self.sequential,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_interactions": int(self.user.shape[0]),
            "split_sizes": {k: int((self.split == v).sum()) for k, v in SPLIT_CODES.items()},
            "modalities": {
                m.name: {"dim": m.dim, "encoder": m.encoder, "n_present": int(m.present.sum())}
                for m in self.modalities.values()
            },
            "report": dict(self.report),
        }
        (directory / "dataset.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: Path) -> InteractionDataset:
        meta_path = directory / "dataset.json"
        if not meta_path.exists():
            raise DatasetFormatError(f"{directory} is not a prepared dataset (no dataset.json); run `mmrec prepare`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DatasetFormatError(
                f"{directory}: dataset format {meta.get('format_version')} but this code reads {FORMAT_VERSION}"
            )
        arrays = np.load(directory / "interactions.npz")
        content = [json.loads(line) for line in (directory / "item_content.jsonl").read_text().splitlines()]
        modalities = {
            name: Modality(
                name=name,
                features=np.load(directory / "modalities" / f"{name}.npy"),
                present=np.load(directory / "modalities" / f"{name}.mask.npy"),
                encoder=info["encoder"],
            )
            for name, info in meta["modalities"].items()
        }
        return cls(
            name=meta["name"],
            split_name=meta["split"],
            sequential=bool(meta["sequential"]),
            user_ids=json.loads((directory / "users.json").read_text()),
            item_ids=json.loads((directory / "items.json").read_text()),
            user=arrays["user"],
            item=arrays["item"],
            timestamp=arrays["timestamp"],
            split=arrays["split"],
            item_text=[c["text"] for c in content],
            item_image=[c["image"] for c in content],
            modalities=modalities,
            report=meta.get("report", {}),
        )
