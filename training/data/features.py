"""Item content features: encode texts and images in batches, through the feature cache.

A missing modality is a row of zeros with ``present`` False, never an exception: ``None`` inputs, empty or
whitespace-only texts, image files that cannot be read or decoded. Each is counted under a reason in
``ModalityFeatures.n_missing_reasons``:

- ``no_text``: the text is ``None``;
- ``empty_text``: the text is empty or whitespace only;
- ``no_image``: the image path is ``None``;
- ``missing_image_file``: the path does not exist;
- ``unreadable_image``: the file cannot be read, or PIL cannot decode it.

Only cache misses reach the encoder, each distinct content once (the 29 ml100k posters that repeat another's bytes
are encoded once); each encoded batch is written to the cache before the next, so an interrupted run keeps its
progress.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray
from tqdm.auto import tqdm

from training.data.encoders import UnreadableImageError, preprocess_image
from training.data.feature_cache import FeatureCache, feature_key

logger = logging.getLogger(__name__)

# Batches of 8 images, the next batch decoded on a thread, and (prepare.py) the channels_last runner: 2.5-3.2x the
# items/s of batches of 64 decoded inline at load ~1 (19.5 -> 56.2 posters/s), 1.1-1.4x at load 5-7, where batches
# of 8 alone were slower (bench/results/feature-throughput*.json). Same features (within 7e-6 with channels_last).
IMAGE_BATCH_SIZE = 8

BatchT_contra = TypeVar("BatchT_contra", contravariant=True)
BatchT = TypeVar("BatchT")
PreparedT = TypeVar("PreparedT")


class FeatureEncoder(Protocol[BatchT_contra]):
    """What :func:`encode_texts` and :func:`encode_images` need from an encoder.

    ``version`` names everything that changes the output (weights, pooling, preprocessing): it is part of the
    cache key. ``encode`` maps a batch to float32 ``(len(batch), dim)``.
    """

    @property
    def version(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode(self, batch: BatchT_contra, /) -> NDArray[np.float32]: ...


@dataclass(frozen=True, eq=False)
class ModalityFeatures:
    """One modality's features for n items, row i for input i.

    ``features``: float32 ``(n, d)``, zeros where the modality is missing; ``present``: bool ``(n,)``;
    ``n_missing_reasons``: reason -> count, summing to the number of missing rows.
    """

    features: NDArray[np.float32]
    present: NDArray[np.bool_]
    n_missing_reasons: dict[str, int] = field(default_factory=dict)
    n_cache_hits: int = 0  # rows whose vector came from the cache
    n_encoded: int = 0  # distinct contents the encoder ran on

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def n_missing(self) -> int:
        return int(self.present.size - np.count_nonzero(self.present))


class _Missing(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode_texts(
    texts: Sequence[str | None],
    *,
    encoder: FeatureEncoder[Sequence[str]],
    cache: FeatureCache | None = None,
    batch_size: int = 64,
    progress: bool = True,
    prefetch: bool = True,
) -> ModalityFeatures:
    """Encode ``texts`` (``None`` or blank: missing) with ``encoder``, reading and filling ``cache``.

    Misses are encoded in order of length, so that batches pad little; rows keep the input order.
    """
    contents: list[bytes | None] = []
    reasons: dict[int, str] = {}
    for i, text in enumerate(texts):
        if text is None:
            reasons[i] = "no_text"
        elif not text.strip():
            reasons[i] = "empty_text"
        contents.append(text.encode("utf-8") if text is not None and i not in reasons else None)
    return _encode(
        contents,
        reasons,
        encoder=encoder,
        prepare=lambda content: content.decode("utf-8"),
        collate=list,
        sort_by_length=True,
        cache=cache,
        batch_size=batch_size,
        progress=progress,
        description="text",
        prefetch=prefetch,
    )


def encode_images(
    images: Sequence[Path | None],
    *,
    encoder: FeatureEncoder[NDArray[np.float32]],
    cache: FeatureCache | None = None,
    batch_size: int = IMAGE_BATCH_SIZE,
    progress: bool = True,
    prefetch: bool = True,
) -> ModalityFeatures:
    """Encode image files (``None``, absent, unreadable or undecodable: missing), reading and filling ``cache``.

    Cache keys hash the file bytes; pixels are made by :func:`training.data.encoders.preprocess_image`.
    """
    contents: list[bytes | None] = []
    reasons: dict[int, str] = {}
    for i, path in enumerate(images):
        data: bytes | None = None
        if path is None:
            reasons[i] = "no_image"
        else:
            try:
                data = Path(path).read_bytes()
            except FileNotFoundError:
                reasons[i] = "missing_image_file"
            except OSError as error:
                logger.debug("cannot read %s: %s", path, error)
                reasons[i] = "unreadable_image"
        contents.append(data)
    return _encode(
        contents,
        reasons,
        encoder=encoder,
        prepare=_decode_image,
        collate=lambda pixels: np.stack(pixels),
        sort_by_length=False,
        cache=cache,
        batch_size=batch_size,
        progress=progress,
        description="image",
        prefetch=prefetch,
    )


def _decode_image(content: bytes) -> NDArray[np.float32]:
    try:
        return preprocess_image(content)
    except UnreadableImageError as error:
        raise _Missing("unreadable_image") from error


def _encode(
    contents: list[bytes | None],
    reasons: dict[int, str],
    *,
    encoder: FeatureEncoder[BatchT],
    prepare: Callable[[bytes], PreparedT],
    collate: Callable[[list[PreparedT]], BatchT],
    sort_by_length: bool,
    cache: FeatureCache | None,
    batch_size: int,
    progress: bool,
    description: str,
    prefetch: bool,
) -> ModalityFeatures:
    """The shared pipeline: key every content, take cache hits, encode distinct misses batch by batch.

    ``contents[i]`` is None exactly where ``reasons`` has ``i``; ``prepare`` turns a content into one encoder input
    or raises :class:`_Missing`; ``collate`` turns a list of those into the encoder's batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    table = _FeatureTable.empty(len(contents), encoder.dim, description)
    rows_of_key, content_of_key = _keyed_contents(contents, encoder.version)
    n_cache_hits = table.fill_from_cache(rows_of_key, cache)
    misses = list(rows_of_key)
    if sort_by_length:
        misses.sort(key=lambda k: len(content_of_key[k]))
    n_encoded = 0
    batches = [misses[start : start + batch_size] for start in range(0, len(misses), batch_size)]

    def prepared(keys: list[str]) -> tuple[list[str], list[PreparedT], dict[str, str]]:
        """The keys that could be prepared, their encoder inputs, and the reason of each key that could not."""
        ok_keys: list[str] = []
        inputs: list[PreparedT] = []
        failed: dict[str, str] = {}
        for key in keys:
            try:
                inputs.append(prepare(content_of_key[key]))
                ok_keys.append(key)
            except _Missing as missing:
                failed[key] = missing.reason
        return ok_keys, inputs, failed

    # With prefetch, one thread prepares batch k+1 (image decoding and resizing, which release the GIL) while the
    # encoder runs on batch k.
    with (tqdm(total=len(misses), desc=f"encode {description}", unit=description, disable=not progress) as bar,
          ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"prepare-{description}") as pool):  # fmt: skip
        upcoming = pool.submit(prepared, batches[0]) if prefetch and batches else None
        for i, keys in enumerate(batches):
            if upcoming is not None:
                batch_keys, batch_inputs, failed = upcoming.result()
                upcoming = pool.submit(prepared, batches[i + 1]) if i + 1 < len(batches) else None
            else:
                batch_keys, batch_inputs, failed = prepared(keys)
            for key, reason in failed.items():
                reasons.update(dict.fromkeys(rows_of_key[key], reason))
            if batch_keys:
                vectors = table.put_encoded(batch_keys, encoder.encode(collate(batch_inputs)), rows_of_key)
                if cache is not None:
                    cache.put_many(dict(zip(batch_keys, vectors, strict=True)))
                n_encoded += len(batch_keys)
            bar.update(len(keys))
    return table.result(reasons, n_cache_hits=n_cache_hits, n_encoded=n_encoded)


def _keyed_contents(contents: list[bytes | None], version: str) -> tuple[dict[str, list[int]], dict[str, bytes]]:
    """Cache key → the rows holding that content, and key → the content (each distinct content once)."""
    rows_of_key: dict[str, list[int]] = {}
    content_of_key: dict[str, bytes] = {}
    for i, content in enumerate(contents):
        if content is None:
            continue
        key = feature_key(version, content)
        rows_of_key.setdefault(key, []).append(i)
        content_of_key.setdefault(key, content)
    return rows_of_key, content_of_key


@dataclass(frozen=True, eq=False)
class _FeatureTable:
    """The (n, dim) features being filled, row i for input i, and which rows are present."""

    features: NDArray[np.float32]
    present: NDArray[np.bool_]
    description: str

    @classmethod
    def empty(cls, n: int, dim: int, description: str) -> _FeatureTable:
        return cls(np.zeros((n, dim), dtype=np.float32), np.zeros(n, dtype=bool), description)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def fill_from_cache(self, rows_of_key: dict[str, list[int]], cache: FeatureCache | None) -> int:
        """Fill the rows of every cached key (taken out of ``rows_of_key``); returns the number of rows filled."""
        hits = cache.get_many(rows_of_key) if cache is not None else {}
        filled = 0
        for key, vector in hits.items():
            if vector.shape != (self.dim,):
                logger.warning("ignoring cached %s vector of shape %s, not (%d,)", self.description, vector.shape, self.dim)
                continue
            rows = rows_of_key.pop(key)
            self.features[rows] = vector
            self.present[rows] = True
            filled += len(rows)
        return filled

    def put_encoded(self, keys: list[str], encoded: NDArray[np.float32], rows_of_key: dict[str, list[int]]
                    ) -> NDArray[np.float32]:  # fmt: skip
        """Fill the rows of ``keys`` from the encoder's output (checked to be (len(keys), dim)); returns it."""
        vectors = np.asarray(encoded, dtype=np.float32)
        if vectors.shape != (len(keys), self.dim):
            raise ValueError(
                f"{self.description} encoder returned shape {vectors.shape}, expected {(len(keys), self.dim)}"
            )
        for key, vector in zip(keys, vectors, strict=True):
            self.features[rows_of_key[key]] = vector
            self.present[rows_of_key[key]] = True
        return vectors

    def result(self, reasons: dict[int, str], *, n_cache_hits: int, n_encoded: int) -> ModalityFeatures:
        n_missing_reasons = dict(Counter(reasons.values()))
        logger.info(
            "%s features: %d rows, %d present (%d from cache, %d encoded), missing %s",
            self.description,
            self.present.size,
            int(self.present.sum()),
            n_cache_hits,
            n_encoded,
            n_missing_reasons or "none",
        )
        return ModalityFeatures(
            features=self.features,
            present=self.present,
            n_missing_reasons=n_missing_reasons,
            n_cache_hits=n_cache_hits,
            n_encoded=n_encoded,
        )
