"""Turn a raw dataset into a prepared one: choose and store the split, encode item content into modalities.

``prepare_dataset(raw, split=...)`` is the one path from any source to the on-disk format of
:mod:`training.data.dataset`. Text is encoded with all-MiniLM-L6-v2 and images with EfficientNet-Lite0 (both cached on
disk by content and encoder version); precomputed features (MMRec format) are taken as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from training.data.dataset import InteractionDataset, Modality
from training.data.sources import SOURCES, RawDataset, read_mmrec
from training.data.splits import leave_one_out_by_time, random_811
from training.settings import Paths

log = logging.getLogger(__name__)

SplitKind = Literal["default", "given", "random", "loo"]
DEFAULT_SPLIT_SEED = 2024


@dataclass(frozen=True)
class ContentEncoders:
    """Factories for the content encoders, so tests can pass light ones and nothing loads until needed."""

    text: Callable[[list[str | None]], tuple[Modality, dict[str, int]]] | None
    image: Callable[[list[str | None]], tuple[Modality, dict[str, int]]] | None


def pretrained_encoders(paths: Paths, *, device: str = "auto", progress: bool = True) -> ContentEncoders:
    """MiniLM for text and EfficientNet-Lite0 for images, with the on-disk feature cache under ``MMREC_HOME``."""
    from training.data.encoders import ImageEncoder, TextEncoder
    from training.data.feature_cache import FeatureCache
    from training.data.features import encode_images, encode_texts

    paths.feature_cache.mkdir(parents=True, exist_ok=True)
    cache = FeatureCache(paths.feature_cache / "features.sqlite")

    def text(texts: list[str | None]) -> tuple[Modality, dict[str, int]]:
        encoder = TextEncoder(device=device)
        out = encode_texts(texts, encoder=encoder, cache=cache, progress=progress)
        return Modality("text", out.features, out.present, encoder.version), dict(out.n_missing_reasons)

    def image(images: list[str | None]) -> tuple[Modality, dict[str, int]]:
        # channels_last: features within 7e-6 of NCHW, faster on CPU (training/data/features.py, IMAGE_BATCH_SIZE)
        encoder = ImageEncoder(device=device, channels_last=True)
        files = [Path(p) if p else None for p in images]
        out = encode_images(files, encoder=encoder, cache=cache, progress=progress)
        return Modality("image", out.features, out.present, encoder.version), dict(out.n_missing_reasons)

    return ContentEncoders(text=text, image=image)


def choose_split(raw: RawDataset, kind: SplitKind, *, seed: int) -> tuple[np.ndarray, str, bool]:
    """The split array, its name and whether it is sequential (leave-one-out)."""
    if kind == "default":
        kind = "given" if raw.given_split is not None else "random"
    if kind == "given":
        if raw.given_split is None:
            raise ValueError(f"{raw.name} has no given split; use --split random or --split loo")
        name = "given-loo" if raw.given_split_sequential else "given"
        return raw.given_split, name, raw.given_split_sequential
    if kind == "random":
        return random_811(raw.user, seed=seed), f"random-811-seed{seed}", False
    if kind == "loo":
        return leave_one_out_by_time(raw.user, raw.timestamp), "loo-time", True
    raise ValueError(f"unknown split {kind!r}: expected default, given, random or loo")


def prepared_name(raw_name: str, kind: SplitKind) -> str:
    """Directory name of a prepared dataset: the source name, with ``-seq`` for leave-one-out by time."""
    return f"{raw_name}-seq" if kind == "loo" else raw_name


def prepare_dataset(
    raw: RawDataset,
    *,
    split: SplitKind = "default",
    seed: int = DEFAULT_SPLIT_SEED,
    encoders: ContentEncoders | None = None,
    name: str | None = None,
) -> InteractionDataset:
    split_array, split_name, sequential = choose_split(raw, split, seed=seed)
    modalities: dict[str, Modality] = dict(raw.precomputed)
    report: dict[str, Any] = {"source": raw.name, "missing": {}}
    if encoders is not None:
        if encoders.text is not None and "text" not in modalities and any(t is not None for t in raw.item_text):
            modalities["text"], report["missing"]["text"] = encoders.text(raw.item_text)
        if encoders.image is not None and "image" not in modalities and any(p is not None for p in raw.item_image):
            modalities["image"], report["missing"]["image"] = encoders.image(raw.item_image)
    for m in modalities.values():
        report["missing"].setdefault(m.name, {"absent_feature_row": int((~m.present).sum())})
        log.info("modality %s: %d of %d items present", m.name, int(m.present.sum()), len(raw.item_ids))
    return InteractionDataset(
        name=name or prepared_name(raw.name, split),
        split_name=split_name,
        sequential=sequential,
        user_ids=raw.user_ids,
        item_ids=raw.item_ids,
        user=raw.user,
        item=raw.item,
        timestamp=raw.timestamp,
        split=split_array,
        item_text=raw.item_text,
        item_image=raw.item_image,
        modalities=modalities,
        report=report,
    )


def prepare_named(
    source: str,
    paths: Paths,
    *,
    split: SplitKind = "default",
    seed: int = DEFAULT_SPLIT_SEED,
    encoders: ContentEncoders | None = None,
    out_dir: Path | None = None,
) -> Path:
    """Read a known source (or an MMRec-format directory path), prepare it and save it. Returns its directory."""
    if source in SOURCES:
        raw = SOURCES[source](paths)
    elif Path(source).is_dir():
        raw = read_mmrec(Path(source))
    else:
        raise ValueError(f"unknown dataset {source!r}: expected one of {sorted(SOURCES)} or an MMRec-format folder")
    dataset = prepare_dataset(raw, split=split, seed=seed, encoders=encoders)
    directory = out_dir or paths.datasets / dataset.name
    dataset.save(directory)
    return directory
