"""Open a model bundle (docs/bundle-format.md) for serving: verify it, load its arrays, index and ONNX graphs.

Only numpy, faiss, onnxruntime and tokenizers: the bundle is the whole contract with training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, overload

import faiss
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

import bundle_format as bf
from service.exact_search import (
    ONE_CALL_MAX_K,
    ONE_CALL_MAX_QUERIES,
    ExactInnerProductSearch,
    search_in_shards,
)
from service.ids import IdsError, IdTable
from service.settings import Device

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


class BundleError(Exception):
    """The bundle cannot be served; the message names the file or field at fault."""


@dataclass(frozen=True)
class DevicePlan:
    """What runs where, decided once from ``settings.device`` and what the installed wheels offer."""

    device: Literal["cpu", "cuda"]
    ort_providers: tuple[str, ...]
    faiss_gpu: bool
    onnx_threads: int = 0  # intra-op threads of every onnxruntime session; 0: onnxruntime's default (one per core)


def plan_device(requested: Device, *, onnx_threads: int = 0) -> DevicePlan:
    available = ort.get_available_providers()
    cuda_ort = CUDA_PROVIDER in available
    if requested == "cuda" and not cuda_ort:
        raise BundleError(
            f"device=cuda but onnxruntime offers no {CUDA_PROVIDER} (available: {', '.join(available)}); "
            "install the gpu extra or use device=auto"
        )
    use_cuda = requested != "cpu" and cuda_ort
    faiss_gpu = requested != "cpu" and hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0
    providers = (CUDA_PROVIDER, CPU_PROVIDER) if use_cuda else (CPU_PROVIDER,)
    return DevicePlan(device="cuda" if use_cuda or faiss_gpu else "cpu", ort_providers=providers, faiss_gpu=faiss_gpu,
                      onnx_threads=onnx_threads)  # fmt: skip


@dataclass(frozen=True)
class TextSpec:
    tokenizer: Tokenizer
    session: ort.InferenceSession
    max_length: int
    input_names: tuple[str, ...]
    output_name: str


@dataclass(frozen=True)
class ImageSpec:
    session: ort.InferenceSession
    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_name: str
    output_name: str


@dataclass(frozen=True)
class Modality:
    """One content modality of the item encoder: its feature size and, when the bundle ships one, its encoder."""

    name: str
    dim: int
    encoder: str | None = None  # the encoder that made the trained items' features (manifest "encoder")
    text: TextSpec | None = None
    image: ImageSpec | None = None
    present: np.ndarray | None = None  # bool (n_items,): which trained items have it (item_features mask, if shipped)
    encoder_precision: bf.EncoderPrecision | None = None  # the shipped encoder graph's arithmetic; None: no encoder


@dataclass(frozen=True)
class EncoderInput:
    name: str
    modality: str
    mask: bool


@dataclass(frozen=True)
class ItemEncoderSpec:
    session: ort.InferenceSession
    method: str
    inputs: tuple[EncoderInput, ...]
    vector_output: str
    extra_outputs: dict[str, str]  # onnx output name -> response field
    extra_output_labels: dict[str, tuple[str, ...]]  # onnx output name -> labels of its integer codes


@dataclass(frozen=True)
class UserTowerSpec:
    session: ort.InferenceSession
    max_length: int
    vectors_input: str
    mask_input: str
    output_name: str


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    version: str
    dim: int
    item_ids: IdTable  # row -> id, and id -> row (``item_rows``)
    user_ids: IdTable
    item_vectors: np.ndarray  # (n_items, dim) float32
    user_vectors: np.ndarray | None  # (n_users, dim) float32
    popularity: np.ndarray  # (n_items,) float32
    history_indptr: np.ndarray  # (n_users + 1,) int64
    history_indices: np.ndarray  # (nnz,) int64 item rows, oldest first within a user
    item_metadata: ItemMetadata
    index: Any  # faiss.IndexIDMap2 (possibly GPU-backed)
    index_type: str
    index_on_gpu: bool
    modalities: dict[str, Modality]
    item_encoder: ItemEncoderSpec | None  # None: a model without content features cannot ingest items
    user_tower: UserTowerSpec | None
    plan: DevicePlan

    @property
    def item_rows(self) -> IdTable:
        """Trained row of an item id: ``bundle.item_rows.get(item_id)``, ``item_id in bundle.item_rows``."""
        return self.item_ids

    @property
    def user_rows(self) -> IdTable:
        return self.user_ids

    @property
    def model_name(self) -> str:
        return str(self.manifest["model"]["name"])

    @property
    def model_kind(self) -> str | None:
        kind = self.manifest["model"].get("kind")
        return None if kind is None else str(kind)

    @property
    def created(self) -> str | None:
        created = self.manifest.get("created")
        return None if created is None else str(created)

    @property
    def dataset(self) -> dict[str, Any]:
        return dict(self.manifest.get("dataset") or {})

    @property
    def dataset_name(self) -> str:
        return str(self.dataset.get("name", "unknown"))

    @property
    def score(self) -> str:
        return str(self.manifest.get("score", bf.SCORE))

    @property
    def profile_modalities(self) -> tuple[str, ...]:
        """Modalities whose user-profile cosine the trained items' metadata carries (``profile_<m>``, declared by
        the manifest's ``profile_cosine``), sorted; empty for a bundle without them."""
        return bf.profile_modalities(self.manifest)

    @property
    def index_approximate(self) -> bool:
        return bool((self.manifest.get("index") or {}).get("approximate", False))

    @property
    def unknown_user_fallback(self) -> str:
        return str((self.manifest.get("fallback") or {}).get("unknown_user", bf.FALLBACK_UNKNOWN_USER))

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.manifest.get("metrics") or {})

    @property
    def text_modality(self) -> Modality | None:
        return next((m for m in self.modalities.values() if m.text is not None), None)

    @property
    def image_modality(self) -> Modality | None:
        return next((m for m in self.modalities.values() if m.image is not None), None)

    def training_history(self, user_row: int) -> np.ndarray:
        return self.history_indices[self.history_indptr[user_row] : self.history_indptr[user_row + 1]]

    @property
    def index_splits_by_rows(self) -> bool:
        """A flat (exact) index on CPU over at least two shards' worth of rows: :meth:`search_index` scans it with
        :attr:`exact_search`, split over threads by rows for a lone batch (:func:`search_flat_in_shards`)."""
        return self.index_type == bf.INDEX_FLAT_IP and not self.index_on_gpu and len(self.item_vectors) >= 2 * SHARD_MIN_ROWS

    @cached_property
    def exact_search(self) -> ExactInnerProductSearch | None:
        """How a flat (exact) index on the CPU is scanned (:meth:`search_index`): :class:`ExactInnerProductSearch`
        over the item vectors (the index's own memory-mapped storage), which does not copy each item block into
        BLAS's layout as FAISS's flat search does. None for other indexes and for a GPU index."""
        if self.index_type != bf.INDEX_FLAT_IP or self.index_on_gpu:
            return None
        return ExactInnerProductSearch(self.item_vectors)

    def search_index(self, queries: np.ndarray, k: int, *, pool: Executor | None = None, shards: int = 1
                     ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """The index's best ``k`` trained rows for each query (B, dim): (scores, rows), both (B, k), best first,
        scores the inner products; rows -1 only where the index holds fewer than ``k`` rows.

        An exact index of at least two shards' rows (:attr:`index_splits_by_rows`) is scanned by
        :attr:`exact_search`: with a ``pool`` and ``shards`` > 1 (a lone batch) as ``shards`` row ranges at once on the
        pool's threads (:func:`search_flat_in_shards`); without, a batch of at most :data:`ONE_CALL_MAX_QUERIES`
        queries asking at most :data:`ONE_CALL_MAX_K` rows in one onnxruntime run
        (:meth:`ExactInnerProductSearch.search_whole`: one return to Python, which matters under load, when the other
        threads want the GIL). Larger batches or ``k`` (whose TopKs cost more than FAISS's heaps), and other indexes,
        are FAISS's. Equal scores come lowest row first; which of several rows tied at the last place are kept may
        differ between these paths.

        An IVF index probes ``nprobe`` lists, which can hold fewer than ``k`` rows between them (a large ``k``, small
        lists): such queries are searched again with twice the lists probed, up to every list (exact), so a caller
        that asks for ``k`` rows gets ``k`` whenever the index holds them."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.index_splits_by_rows and self.exact_search is not None:
            if pool is not None and shards > 1:
                return search_flat_in_shards(self.exact_search, queries, k, pool=pool, shards=shards)
            if len(queries) <= ONE_CALL_MAX_QUERIES and k <= ONE_CALL_MAX_K:
                return self.exact_search.search_whole(queries, k)
        scores, rows = self._search_index_once(queries, k, None)
        probe = self._ivf_probe
        if probe is None:
            return scores, rows
        nprobe, nlist = probe
        wanted = min(k, int(self.index.ntotal))
        short = np.flatnonzero((rows >= 0).sum(axis=1) < wanted)
        while len(short) and nprobe < nlist:
            nprobe = min(2 * nprobe, nlist)
            try:
                params: Any = faiss.SearchParametersIVF()
                params.nprobe = nprobe
                again_scores, again_rows = self._search_index_once(queries[short], k, params)
            except (RuntimeError, TypeError):  # an index that takes no search parameters (GPU): score them all
                again_scores, again_rows = faiss.knn(queries[short], self.item_vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
                nprobe = nlist
            scores[short], rows[short] = again_scores, again_rows
            short = short[(again_rows >= 0).sum(axis=1) < wanted]
        return scores, rows

    def _search_index_once(self, queries: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
        if self.index_type == bf.INDEX_IVF_MIPS:
            return search_mips_index(self.index, self.item_vectors, queries, k, params=params)
        scores, rows = self.index.search(queries, k, params=params)
        return scores, rows

    @cached_property
    def _ivf_probe(self) -> tuple[int, int] | None:
        """(nprobe, nlist) of an IVF index, from the manifest (read once, not on every search); None for other
        kinds."""
        if self.index_type not in (bf.INDEX_IVF_MIPS, bf.INDEX_IVF_IP):
            return None
        params = (self.manifest.get("index") or {}).get("params") or {}
        inner: Any = faiss.downcast_index(self.index.index) if not self.index_on_gpu else None
        nlist = int(params.get("nlist") or (inner.nlist if inner is not None else 0))
        nprobe = int(params.get("nprobe") or (inner.nprobe if inner is not None else 1))
        return (nprobe, nlist) if nlist > 0 else None

    @property
    def code_field(self) -> str | None:
        """The item field holding each item's semantic code (manifest ``semantic_codes``: QARM), else None."""
        section = self.manifest.get("semantic_codes")
        return str(section["field"]) if isinstance(section, dict) and section.get("field") else None

    @property
    def code_levels(self) -> int:
        section = self.manifest.get("semantic_codes")
        return int(section.get("levels", 0)) if isinstance(section, dict) else 0


def load_bundle(path: Path, *, plan: DevicePlan, verify_hashes: bool = True) -> Bundle:
    """Read and check a bundle; raises :class:`BundleError` naming the file or field at fault.

    With ``verify_hashes``, every file's sha256 is checked against the manifest before this returns (so before the
    service says it is ready), in one read of each file: the files the loader reads through anyway (item vectors,
    metadata) are hashed in that pass, the others on background threads while the loader works. A file that fails
    its hash is reported as such even when reading it failed first."""
    path = Path(path)
    manifest = _read_manifest(path)
    files = _bundle_files(path, manifest)
    digests = _Digests(files, manifest["files"], enabled=verify_hashes, inline=INLINE_HASHED)
    try:
        bundle = _load(path, manifest, files, plan, digests)
        digests.check()
        return bundle
    except BundleError:
        digests.check()  # a damaged file explains a failed read better than the read's own error
        raise
    finally:
        digests.close()


INLINE_HASHED = (bf.ITEM_VECTORS, bf.ITEM_METADATA)  # hashed by the pass that reads them


def _load(path: Path, manifest: dict[str, Any], files: dict[str, Path], plan: DevicePlan, digests: _Digests) -> Bundle:
    dim = _positive_int(manifest, "dim")
    if manifest.get("score", bf.SCORE) != bf.SCORE:
        raise BundleError(f"manifest.json: score {manifest['score']!r} is not supported (inner_product only)")

    item_ids = _read_ids(files, bf.ITEM_IDS)
    n_items = len(item_ids)
    index, index_type, index_on_gpu, item_vectors = _read_index(files, manifest, (n_items, dim), plan=plan,
                                                                digests=digests)  # fmt: skip
    user_ids = _read_ids(files, bf.USER_IDS) if bf.USER_IDS in files else IdTable.from_strings([])
    user_vectors = (
        _read_matrix(files, bf.USER_VECTORS, (len(user_ids), dim)) if bf.USER_VECTORS in files else None
    )
    popularity = _read_array(files, bf.POPULARITY).astype(np.float32, copy=False)
    if popularity.shape != (n_items,):
        raise BundleError(f"{bf.POPULARITY}: shape {popularity.shape}, expected ({n_items},)")
    indptr, indices = _read_history(files, n_users=len(user_ids), n_items=n_items)
    metadata = _read_metadata(files, item_ids, digests)

    sessions = _SessionFactory(files, plan)
    modalities = _read_modalities(manifest, sessions, files, n_items=n_items)
    item_encoder = _read_item_encoder(manifest, modalities, sessions)
    user_tower = _read_user_tower(manifest, sessions)

    return Bundle(
        path=path,
        manifest=manifest,
        version=str(manifest["bundle_version"]),
        dim=dim,
        item_ids=item_ids,
        user_ids=user_ids,
        item_vectors=item_vectors,
        user_vectors=user_vectors,
        popularity=popularity,
        history_indptr=indptr,
        history_indices=indices,
        item_metadata=metadata,
        index=index,
        index_type=index_type,
        index_on_gpu=index_on_gpu,
        modalities=modalities,
        item_encoder=item_encoder,
        user_tower=user_tower,
        plan=plan,
    )


# --- manifest and files -------------------------------------------------------------------------------------


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / bf.MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path}: no {bf.MANIFEST} (is this a bundle directory?)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"manifest.json: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise BundleError("manifest.json: expected a JSON object")
    if manifest.get("format") != bf.FORMAT:
        raise BundleError(f"manifest.json: format is {manifest.get('format')!r}, expected {bf.FORMAT!r}")
    version = manifest.get("format_version")
    if version not in bf.READABLE_FORMAT_VERSIONS:
        supported = ", ".join(str(v) for v in bf.READABLE_FORMAT_VERSIONS)
        raise BundleError(
            f"manifest.json: bundle format_version {version!r} is not supported by this service (supports {supported})"
        )
    for key in bf.REQUIRED_MANIFEST_FIELDS:
        if key not in manifest:
            raise BundleError(f"manifest.json: missing required field {key!r}")
    return manifest


def _bundle_files(path: Path, manifest: dict[str, Any]) -> dict[str, Path]:
    """The files the manifest lists, checked to exist (their sha256: :class:`_Digests`)."""
    listed = manifest["files"]
    if not isinstance(listed, dict):
        raise BundleError("manifest.json: 'files' must map file names to sha256 hex digests")
    root = path.resolve()
    files: dict[str, Path] = {}
    for name, digest in listed.items():
        file = (root / name).resolve()
        if root not in file.parents:
            raise BundleError(f"manifest.json: file {name!r} lies outside the bundle directory")
        if not file.is_file():
            raise BundleError(f"bundle file {name} is listed in manifest.json but missing")
        if not isinstance(digest, str):
            raise BundleError(f"manifest.json: the sha256 of {name} must be a hex string, got {digest!r}")
        files[name] = file
    for required in bf.REQUIRED_FILES:
        if required not in files:
            raise BundleError(f"manifest.json: required file {required} is not listed in 'files'")
    return files


READ_CHUNK = 8 << 20


class _Digests:
    """The sha256 of every bundle file against the manifest. Files in ``inline`` are hashed by the loader's own
    read of them (:meth:`hasher`, :meth:`record`); the others on two threads from the start. :meth:`check` waits for
    all and raises for the first file (in manifest order) that differs."""

    def __init__(self, files: dict[str, Path], expected: dict[str, str], *, enabled: bool, inline: Sequence[str]) -> None:
        self.files = files
        self.expected = {name: str(digest).lower() for name, digest in expected.items()}
        self.enabled = enabled
        self._inline: dict[str, str] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[str, Future[str]] = {}
        if enabled:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mmrec-sha256")
            by_size = sorted((n for n in files if n not in inline), key=lambda n: -files[n].stat().st_size)
            self._futures = {name: self._pool.submit(bf.file_sha256, files[name]) for name in by_size}

    def hasher(self, name: str) -> Any:
        """A fresh sha256 for the loader's read of ``name`` (None when hashes are not verified)."""
        return hashlib.sha256() if self.enabled else None

    def record(self, name: str, digest: Any) -> None:
        """The loader read all of ``name`` through ``digest`` (a :meth:`hasher`)."""
        if digest is not None:
            self._inline[name] = digest.hexdigest()

    def check(self) -> None:
        if not self.enabled:
            return
        for name, expected in self.expected.items():
            future = self._futures.get(name)
            # an inline file the loader did not read to its end (it failed first, or took another path) is hashed here
            actual = future.result() if future is not None else self._inline.get(name) or bf.file_sha256(self.files[name])
            if actual != expected:
                raise BundleError(f"bundle file {name}: sha256 differs from manifest.json (corrupted or modified)")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _require(files: dict[str, Path], name: str) -> Path:
    if name not in files:
        raise BundleError(f"manifest.json: file {name} is used by the bundle but not listed in 'files'")
    return files[name]


def _positive_int(obj: dict[str, Any], key: str, where: str = "manifest.json") -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise BundleError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _read_ids(files: dict[str, Path], name: str) -> IdTable:
    try:
        return IdTable.from_json(_require(files, name).read_bytes())
    except IdsError as exc:
        raise BundleError(f"{name}: {exc}") from exc


def _read_array(files: dict[str, Path], name: str) -> np.ndarray:
    """The array, memory-mapped read-only: pages are read when touched and shared by every process serving the
    bundle (several workers or replicas on one host hold one copy in the page cache)."""
    try:
        array: np.ndarray = np.load(_require(files, name), allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise BundleError(f"{name}: not a readable .npy array ({exc})") from exc
    return array


def _read_matrix(files: dict[str, Path], name: str, shape: tuple[int, int]) -> np.ndarray:
    array = _read_array(files, name)
    if array.shape != shape:
        raise BundleError(f"{name}: shape {array.shape}, expected {shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise BundleError(f"{name}: dtype {array.dtype}, expected float32")
    return np.ascontiguousarray(array, dtype=np.float32)  # a float32 file stays mapped: no copy


def _read_history(files: dict[str, Path], *, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    if bf.USER_HISTORY not in files:
        return np.zeros(n_users + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    try:
        with np.load(files[bf.USER_HISTORY], allow_pickle=False) as npz:
            indptr = np.asarray(npz[bf.HISTORY_INDPTR], dtype=np.int64)
            indices = np.asarray(npz[bf.HISTORY_INDICES], dtype=np.int64)
    except (KeyError, ValueError, OSError) as exc:
        raise BundleError(
            f"{bf.USER_HISTORY}: expected arrays {bf.HISTORY_INDPTR!r} and {bf.HISTORY_INDICES!r} ({exc})"
        ) from exc
    if indptr.shape != (n_users + 1,) or indptr[0] != 0 or indptr[-1] != len(indices) or np.any(np.diff(indptr) < 0):
        raise BundleError(f"{bf.USER_HISTORY}: indptr is not a CSR row pointer for {n_users} users")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_items):
        raise BundleError(f"{bf.USER_HISTORY}: item rows out of range [0, {n_items})")
    return indptr, indices


METADATA_FULL_CHECK_ROWS = 100_000  # above this, item_metadata.jsonl is checked on a sample at load (sha256 guards the rest)


class ItemMetadata(Sequence[dict[str, Any]]):
    """``item_metadata.jsonl`` kept as its mapped bytes and line offsets; a row is parsed when asked for. A million
    items cost 8 MB of offsets instead of a million dicts."""

    def __init__(self, data: bytes | mmap.mmap | None, starts: np.ndarray, item_ids: Sequence[str]) -> None:
        self._data = data
        self._starts = starts  # (n + 1,) int64: row r is data[starts[r]:starts[r + 1]]
        self._ids = item_ids

    def __len__(self) -> int:
        return len(self._ids)

    @overload
    def __getitem__(self, row: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, row: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, row: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(row, slice):
            return [self[r] for r in range(*row.indices(len(self)))]
        if self._data is None:
            return {"id": self._ids[row]}
        value = json.loads(self._data[int(self._starts[row]) : int(self._starts[row + 1])])
        return value if isinstance(value, dict) else {}


def _read_metadata(files: dict[str, Path], item_ids: Sequence[str], digests: _Digests) -> ItemMetadata:
    if bf.ITEM_METADATA not in files:
        return ItemMetadata(None, np.zeros(len(item_ids) + 1, dtype=np.int64), item_ids)
    file = files[bf.ITEM_METADATA]
    # Line ends from one streamed read (hashed on the way); rows are then read through a map, page by page as asked:
    # scanning the map instead would make all of it resident.
    hasher = digests.hasher(bf.ITEM_METADATA)
    found: list[np.ndarray] = []
    offset = 0
    with file.open("rb") as fh:
        for chunk in iter(lambda: fh.read(READ_CHUNK), b""):
            if hasher is not None:
                hasher.update(chunk)
            found.append(np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == ord("\n")) + (offset + 1))
            offset += len(chunk)
        data: bytes | mmap.mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if offset else b""
    digests.record(bf.ITEM_METADATA, hasher)
    ends = np.concatenate(found) if found else np.zeros(0, np.int64)
    if len(data) and data[-1:] != b"\n":
        ends = np.append(ends, len(data))
    starts = np.concatenate([[0], ends]).astype(np.int64)
    blank = np.flatnonzero(starts[1:] - starts[:-1] <= 1)  # empty lines (just "\n") are skipped, as before
    if len(blank):
        keep = np.setdiff1d(np.arange(len(starts) - 1), blank)
        lines = [bytes(data[starts[r] : starts[r + 1]]) for r in keep]
        data = b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines)
        starts = np.concatenate([[0], np.cumsum([len(line) + (not line.endswith(b"\n")) for line in lines])]).astype(np.int64)
    if len(starts) - 1 != len(item_ids):
        raise BundleError(f"item_metadata.jsonl: {len(starts) - 1} rows, expected {len(item_ids)} (one per item)")
    metadata = ItemMetadata(data, starts, item_ids)
    n = len(item_ids)
    rows = range(n) if n <= METADATA_FULL_CHECK_ROWS else sorted(
        {0, n - 1, *np.random.default_rng(0).choice(n, size=1000, replace=False).tolist()})  # fmt: skip
    for r in rows:
        try:
            row = metadata[r]
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"item_metadata.jsonl line {r + 1}: not valid JSON ({exc})") from exc
        if str(row.get("id", item_ids[r])) != item_ids[r]:
            raise BundleError(f"item_metadata.jsonl row {r}: id {row.get('id')!r} differs from item_ids.json {item_ids[r]!r}")
    return metadata


# --- ONNX graphs ---------------------------------------------------------------------------------------------


def shrinking_run_options() -> ort.RunOptions:
    """Options for every run of a content encoder: afterwards the CPU arena hands the chunks it no longer uses back.

    Without this, onnxruntime's arena keeps the high-water mark of every run for the process's lifetime (measured on
    MiniLM, 8 texts of 256 tokens: +190 MB peak, all of it still held after the run; with shrinkage, 15-35 MB held).
    Disabling the arena instead (``enable_cpu_mem_arena = False``) was slower and left glibc holding as much.
    """
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


class _SessionFactory:
    def __init__(self, files: dict[str, Path], plan: DevicePlan) -> None:
        self.files, self.plan = files, plan

    def open(self, name: str, *, role: str) -> ort.InferenceSession:
        file = _require(self.files, name)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT's info/warnings are noise at serving time
        # The CPU arena stays on (the default) with its default growth: runs pass shrinking_run_options(), which
        # returns what a run used; peak memory per run is bounded by encoding in chunks (service/encoding.py).
        # Intra-op threads wait without spinning: spinning doubled an item's CPU cost (54 ms against 27 ms) and
        # takes the cores from the event loop and the searches between runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if self.plan.onnx_threads > 0:
            options.intra_op_num_threads = self.plan.onnx_threads
        try:
            return ort.InferenceSession(str(file), sess_options=options, providers=list(self.plan.ort_providers))
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            raise BundleError(f"{name} ({role}): onnxruntime cannot open it ({exc})") from exc


def _check_names(session: ort.InferenceSession, names: list[str], *, kind: str, file: str) -> None:
    have = [x.name for x in (session.get_inputs() if kind == "input" else session.get_outputs())]
    missing = [n for n in names if n not in have]
    if missing:
        raise BundleError(f"{file}: the graph has no {kind} named {', '.join(missing)} (it has {', '.join(have)})")


def _encoder_kind(spec: dict[str, Any], *, format_version: int, where: str) -> bf.EncoderKind | None:
    try:
        return bf.modality_encoder_kind(spec, format_version=format_version)
    except ValueError as exc:
        raise BundleError(f"{where}: {exc}") from exc


def _encoder_precision(spec: dict[str, Any], *, where: str) -> bf.EncoderPrecision:
    try:
        return bf.modality_encoder_precision(spec)
    except ValueError as exc:
        raise BundleError(f"{where}: {exc}") from exc


def _read_modalities(
    manifest: dict[str, Any], sessions: _SessionFactory, files: dict[str, Path], *, n_items: int
) -> dict[str, Modality]:
    raw = manifest.get("modalities") or {}
    if not isinstance(raw, dict):
        raise BundleError("manifest.json: 'modalities' must be an object")
    modalities: dict[str, Modality] = {}
    for name, spec in raw.items():
        where = f"manifest.json modalities.{name}"
        if not isinstance(spec, dict):
            raise BundleError(f"{where}: expected an object")
        dim = _positive_int(spec, "dim", where)
        kind = _encoder_kind(spec, format_version=int(manifest["format_version"]), where=where)
        text = _read_text_spec(spec, sessions, files, where) if kind == bf.TEXT else None
        image = _read_image_spec(spec, sessions, where) if kind == bf.IMAGE else None
        encoder = spec.get("encoder")
        precision = None if kind is None else _encoder_precision(spec, where=where)
        modalities[name] = Modality(name=name, dim=dim, encoder=None if encoder is None else str(encoder), text=text,
                                    image=image, present=_read_presence(files, name, n_items=n_items),
                                    encoder_precision=precision)  # fmt: skip
    if sum(m.text is not None for m in modalities.values()) > 1:
        raise BundleError("manifest.json: more than one modality has a text encoder; the service supports one")
    if sum(m.image is not None for m in modalities.values()) > 1:
        raise BundleError("manifest.json: more than one modality has an image encoder; the service supports one")
    return modalities


def _read_presence(files: dict[str, Path], modality: str, *, n_items: int) -> np.ndarray | None:
    """Which trained items have ``modality`` (``item_features/<m>.mask.npy``), when the bundle ships it."""
    name = bf.item_features_mask_file(modality)
    if name not in files:
        return None
    mask = _read_array(files, name).reshape(-1)
    if mask.shape != (n_items,):
        raise BundleError(f"{name}: shape {mask.shape}, expected ({n_items},)")
    return mask


def _read_text_spec(spec: dict[str, Any], sessions: _SessionFactory, files: dict[str, Path], where: str) -> TextSpec:
    tokenizer_file = _require(files, spec["tokenizer"])
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise BundleError(f"{spec['tokenizer']}: not a readable tokenizers file ({exc})") from exc
    session = sessions.open(spec["encoder_onnx"], role="text encoder")
    inputs = tuple(spec.get("onnx_inputs") or ("input_ids", "attention_mask"))
    output = str(spec.get("onnx_output") or "sentence_embedding")
    _check_names(session, list(inputs), kind="input", file=spec["encoder_onnx"])
    _check_names(session, [output], kind="output", file=spec["encoder_onnx"])
    return TextSpec(
        tokenizer=tokenizer,
        session=session,
        max_length=_positive_int(spec, "max_length", where) if "max_length" in spec else 256,
        input_names=inputs,
        output_name=output,
    )


def _read_image_spec(spec: dict[str, Any], sessions: _SessionFactory, where: str) -> ImageSpec:
    for key in ("size", "resize", "mean", "std"):
        if key not in spec:
            raise BundleError(f"{where}: image encoder needs {key!r}")
    if spec["resize"] < spec["size"]:
        raise BundleError(f"{where}: resize ({spec['resize']}) must be at least size ({spec['size']})")
    mean, std = spec["mean"], spec["std"]
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise BundleError(f"{where}: mean and std must be 3 numbers (RGB), std positive")
    session = sessions.open(spec["encoder_onnx"], role="image encoder")
    inputs = list(spec.get("onnx_inputs") or ("pixels",))
    output = str(spec.get("onnx_output") or "features")
    _check_names(session, inputs, kind="input", file=spec["encoder_onnx"])
    _check_names(session, [output], kind="output", file=spec["encoder_onnx"])
    return ImageSpec(
        session=session,
        size=_positive_int(spec, "size", where),
        resize=_positive_int(spec, "resize", where),
        mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        std=(float(std[0]), float(std[1]), float(std[2])),
        input_name=inputs[0],
        output_name=output,
    )


def _read_item_encoder(
    manifest: dict[str, Any], modalities: dict[str, Modality], sessions: _SessionFactory
) -> ItemEncoderSpec | None:
    spec = manifest.get("item_encoder")
    if spec is None:
        return None
    where = "manifest.json item_encoder"
    if not isinstance(spec, dict) or "onnx" not in spec:
        raise BundleError(f"{where}: expected an object with 'onnx'")
    session = sessions.open(spec["onnx"], role="item encoder")
    inputs: list[EncoderInput] = []
    for raw in spec.get("inputs", []):
        modality = raw.get("modality")
        if modality not in modalities:
            raise BundleError(f"{where}: input {raw.get('name')!r} names modality {modality!r}, not in 'modalities'")
        mask = bool(raw.get("mask", False))
        if not mask and raw.get("dim", modalities[modality].dim) != modalities[modality].dim:
            raise BundleError(f"{where}: input {raw['name']!r} dim {raw['dim']} differs from modality {modality!r}")
        inputs.append(EncoderInput(name=str(raw["name"]), modality=modality, mask=mask))
    if not inputs:
        raise BundleError(f"{where}: 'inputs' is empty")
    vector_output = str((spec.get("outputs") or {}).get("item_vector", "item_vector"))
    extra = {str(k): str(v) for k, v in (spec.get("extra_outputs") or {}).items()}
    _check_names(session, [i.name for i in inputs], kind="input", file=spec["onnx"])
    _check_names(session, [vector_output, *extra], kind="output", file=spec["onnx"])
    labels: dict[str, tuple[str, ...]] = {}
    for name, raw_labels in (spec.get("extra_output_labels") or {}).items():
        if name not in extra:
            raise BundleError(f"{where}: extra_output_labels names {name!r}, which is not in extra_outputs")
        if not isinstance(raw_labels, list) or not raw_labels or not all(isinstance(x, str) for x in raw_labels):
            raise BundleError(f"{where}: extra_output_labels[{name!r}] must be a non-empty list of strings")
        labels[str(name)] = tuple(raw_labels)
    return ItemEncoderSpec(
        session=session,
        method=str(spec.get("method", "native")),
        inputs=tuple(inputs),
        vector_output=vector_output,
        extra_outputs=extra,
        extra_output_labels=labels,
    )


def _read_user_tower(manifest: dict[str, Any], sessions: _SessionFactory) -> UserTowerSpec | None:
    spec = manifest.get("user_tower")
    if not spec:
        return None
    where = "manifest.json user_tower"
    names = spec.get("inputs") or {}
    session = sessions.open(spec["onnx"], role="user tower")
    tower = UserTowerSpec(
        session=session,
        max_length=_positive_int(spec, "max_length", where),
        vectors_input=str(names.get("item_vectors", "item_vectors")),
        mask_input=str(names.get("mask", "mask")),
        output_name=str(spec.get("output", "user_vector")),
    )
    _check_names(session, [tower.vectors_input, tower.mask_input], kind="input", file=spec["onnx"])
    _check_names(session, [tower.output_name], kind="output", file=spec["onnx"])
    return tower


# --- index ---------------------------------------------------------------------------------------------------


def _read_index(files: dict[str, Path], manifest: dict[str, Any], shape: tuple[int, int], *, plan: DevicePlan,
                digests: _Digests) -> tuple[Any, str, bool, np.ndarray]:  # fmt: skip
    """The index, its type, whether it is on a GPU, and the item vectors (checked to be the index's, bit for bit).

    A flat or HNSW-flat index on the CPU holds the item vectors verbatim: they are served from the index's own
    (memory-mapped) storage, so they are held once; ``item_vectors.npy`` is only read through, once, to check them
    (and hash it). An IVF index stores them in list order, so the mapped file serves them."""
    n_items, dim = shape
    spec = manifest.get("index") or {}
    index_type = str(spec.get("type", bf.INDEX_FLAT_IP))
    if index_type not in bf.INDEX_TYPES:
        raise BundleError(f"manifest.json: index.type {index_type!r} is not supported (one of {', '.join(bf.INDEX_TYPES)})")
    params = spec.get("params") or {}
    max_norm = _mips_max_norm(params) if index_type == bf.INDEX_IVF_MIPS else None
    index_dim = dim + 1 if max_norm is not None else dim  # ivf_flat_mips: one coordinate appended
    try:
        # Flat codes are mapped, not copied (never modified: see service/catalogue.py); other indexes are read.
        index = faiss.read_index(str(files[bf.ITEM_INDEX]), faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError as exc:
        raise BundleError(f"item_index.faiss: FAISS cannot read it ({exc})") from exc
    # No downcast_index here: its proxy would not own the index, which the original proxy frees on collection.
    if not isinstance(index, faiss.IndexIDMap2):
        raise BundleError(f"item_index.faiss: expected an IndexIDMap2, got {type(index).__name__}")
    if index.d != index_dim or index.ntotal != n_items:
        raise BundleError(
            f"item_index.faiss: holds {index.ntotal} vectors of dim {index.d}, expected {n_items} of {index_dim}"
            + (f" (index type {index_type}: dim {dim} + 1)" if max_norm is not None else "")
        )
    if not np.array_equal(faiss.vector_to_array(index.id_map), np.arange(n_items, dtype=np.int64)):
        raise BundleError("item_index.faiss: FAISS ids must be the item row numbers 0..n_items-1 in order")
    inner = faiss.downcast_index(index.index)
    if max_norm is not None and not (isinstance(inner, faiss.IndexIVFFlat) and inner.metric_type == faiss.METRIC_L2):
        raise BundleError(f"item_index.faiss: index type {index_type} must be an L2 IndexIVFFlat, got {type(inner).__name__}")
    if max_norm is None and inner.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise BundleError(f"item_index.faiss: index type {index_type} ranks by inner product, but the index's metric is "
                          f"{'L2' if inner.metric_type == faiss.METRIC_L2 else inner.metric_type}")  # fmt: skip
    stored = _stored_vectors(inner, n_items, index_dim)
    if index_type == bf.INDEX_FLAT_IP and not isinstance(inner, faiss.IndexFlat):  # searched exactly, maybe in shards
        raise BundleError(f"item_index.faiss: index type {index_type} must be a flat index, got {type(inner).__name__}")
    if max_norm is not None:
        stored = _mips_stored_vectors(stored, dim, max_norm)
    item_vectors = _check_item_vectors(files, stored, shape, digests)
    ef_search = params.get("efSearch")
    if ef_search is not None and hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = int(ef_search)
    nprobe = params.get("nprobe")
    if nprobe is not None and hasattr(inner, "nprobe"):
        inner.nprobe = int(nprobe)
    if plan.faiss_gpu:
        try:
            gpu = faiss.index_cpu_to_all_gpus(index)
            return gpu, index_type, True, _read_matrix(files, bf.ITEM_VECTORS, shape)  # the CPU index goes
        except (RuntimeError, AttributeError) as exc:  # e.g. HNSW has no GPU version: stay on CPU
            log.warning("FAISS index stays on CPU: %s", exc)
    return index, index_type, False, item_vectors


SHARD_MIN_ROWS = 1 << 16  # a shard of fewer rows costs more in the hand-off between threads than it saves


def search_flat_in_shards(search: ExactInnerProductSearch, queries: np.ndarray, k: int, *, pool: Executor, shards: int
                          ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Exact top-``k`` by inner product of each query (B, dim) over ``search``'s vectors, split into ``shards``
    contiguous row ranges (each at least :data:`SHARD_MIN_ROWS` rows) searched at once on ``pool``'s threads, each
    shard's best ``k`` merged. Returns (scores, rows), (B, k), best first, equal scores lowest row first; rows -1
    (score -inf) where fewer than ``k`` rows exist: the answer of one :meth:`ExactInnerProductSearch.search`.

    A scan of a batch costs about one pass over the vectors plus the products, so splitting by rows divides its time
    by the threads while each thread still amortises its pass over the whole batch (splitting the batch by queries
    would make each thread pass over all the vectors)."""
    n_rows = search.n_rows
    shards = max(1, min(shards, n_rows // SHARD_MIN_ROWS))
    bounds = np.linspace(0, n_rows, shards + 1).astype(np.int64)
    return search_in_shards(search, queries, k, pool=pool,
                            bounds=[(int(bounds[s]), int(bounds[s + 1])) for s in range(shards)])  # fmt: skip


def search_mips_index(index: Any, item_vectors: np.ndarray, queries: np.ndarray, k: int, *, params: Any = None
                      ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Search an ``ivf_flat_mips`` index: each query (B, dim) with a 0 appended, then the candidates scored again by
    their exact inner products with ``item_vectors`` and ordered by them (the index's L2 distances are
    ‖q‖² + max_norm² − 2 q·x in float32). Returns (scores, rows), (B, k); rows -1 (score -inf) where it found fewer."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    augmented = np.zeros((len(queries), queries.shape[1] + 1), dtype=np.float32)
    augmented[:, :-1] = queries
    _, rows = index.search(augmented, k, params=params)
    found = rows >= 0
    scores = np.full(rows.shape, -np.inf, dtype=np.float32)
    gathered = item_vectors[rows[found]]  # (hits, dim)
    scores[found] = np.einsum("hd,hd->h", gathered, np.repeat(queries, found.sum(axis=1), axis=0))
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


def _mips_max_norm(params: dict[str, Any]) -> float:
    value = params.get("max_norm")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BundleError(f"manifest.json: index.params.max_norm must be a finite number >= 0 for "
                          f"{bf.INDEX_IVF_MIPS}, got {value!r}")  # fmt: skip
    return float(value)


def _mips_stored_vectors(stored: _StoredVectors, dim: int, max_norm: float) -> _StoredVectors:
    """The item vectors of an ``ivf_flat_mips`` index (its rows less the appended coordinate), checking on the way
    that each row's appended coordinate is ``sqrt(max_norm² − ‖x‖²)``: what makes its L2 order the inner-product
    order (docs/bundle-format.md). The coordinate is float32, so it is compared to within 1e-5 · max_norm²."""
    bound = max_norm * max_norm

    def rows(start: int, stop: int) -> np.ndarray:
        full = stored.rows(start, stop)
        vectors, extra = full[:, :dim], full[:, dim].astype(np.float64)
        total = (vectors.astype(np.float64) ** 2).sum(axis=1) + extra * extra
        bad = ~((extra >= 0) & (np.abs(total - bound) <= 1e-5 * max(bound, 1e-12)))
        if bad.any():
            raise BundleError(
                f"item_index.faiss: row {start + int(np.flatnonzero(bad)[0])}'s appended coordinate is not "
                f"sqrt(max_norm² − ‖x‖²) for max_norm {max_norm}: the index is damaged or the manifest's max_norm is wrong"
            )
        return vectors

    return _StoredVectors(rows, None)


@dataclass(frozen=True)
class _StoredVectors:
    """Rows of the vectors an index stores: ``view`` when they lie in one array in row order (flat, HNSW-flat; valid
    while the index lives, and the bundle holds it), else read back row range by row range (IVF-flat)."""

    rows: Callable[[int, int], np.ndarray]
    view: np.ndarray | None


def _stored_vectors(inner: Any, n: int, dim: int) -> _StoredVectors:
    """The index must hold exactly the bundle's item vectors: a sha256 recomputed over a damaged index would pass
    the hash check, then serve wrong neighbours.

    Flat, HNSW-flat and IVF-flat indexes store every vector verbatim as float32 (``mmrec export`` adds ``item_vectors.npy``
    as it is), so every row is compared bit for bit (:func:`_check_item_vectors`): not a sample, since one damaged row
    is enough to serve a wrong item. Other index types (quantising ones) are refused: they cannot be checked this
    way, and the bundle format does not write them."""
    if isinstance(inner, (faiss.IndexHNSWFlat, faiss.IndexFlat)):
        storage = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSWFlat) else inner
        if not isinstance(storage, faiss.IndexFlat) or storage.ntotal != n or storage.d != dim:
            raise BundleError("item_index.faiss: its vector storage does not hold the item vectors")
        view = faiss.rev_swig_ptr(storage.get_xb(), n * dim).reshape(n, dim) if n else np.empty((0, dim), np.float32)
        view.flags.writeable = False  # the index's own (mapped, shared) storage
        return _StoredVectors(lambda start, stop: view[start:stop], view)
    if isinstance(inner, faiss.IndexIVFFlat):  # full vectors in the inverted lists, read back through the direct map
        try:
            inner.make_direct_map()
        except RuntimeError as exc:
            raise BundleError(f"item_index.faiss: its IVF lists cannot be read back ({exc})") from exc
        return _StoredVectors(lambda start, stop: inner.reconstruct_n(start, stop - start), None)
    raise BundleError(
        f"item_index.faiss: an index of type {type(inner).__name__} cannot be checked against item_vectors.npy "
        "(supported: flat, HNSW-flat and IVF-flat indexes, as docs/bundle-format.md says)"
    )


def _check_item_vectors(files: dict[str, Path], stored: _StoredVectors, shape: tuple[int, int],
                        digests: _Digests) -> np.ndarray:  # fmt: skip
    """Compare ``item_vectors.npy`` with the index's vectors as bits (uint32: a verbatim copy, nothing less; NaN
    equals NaN, -0.0 differs from 0.0) in one streamed read that also hashes the file; returns the vectors to serve:
    the index's own where it holds them in row order, else the file, mapped."""
    file = _require(files, bf.ITEM_VECTORS)
    n, dim = shape
    hasher = digests.hasher(bf.ITEM_VECTORS)
    with file.open("rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            header = np.lib.format.read_array_header_2_0(fh) if version >= (2, 0) else np.lib.format.read_array_header_1_0(fh)
        except ValueError as exc:
            raise BundleError(f"item_vectors.npy: not a readable .npy array ({exc})") from exc
        file_shape, fortran, dtype = header
        if file_shape != shape:
            raise BundleError(f"item_vectors.npy: shape {file_shape}, expected {shape}")
        if not np.issubdtype(dtype, np.floating):
            raise BundleError(f"item_vectors.npy: dtype {dtype}, expected float32")
        if dtype != np.dtype("<f4") or fortran:  # not the exporter's layout: map it, convert, compare in memory
            vectors = _read_matrix(files, bf.ITEM_VECTORS, shape)
            for rows in _row_chunks(n, dim):
                _compare_rows(stored.rows(rows.start, rows.stop), vectors[rows], rows.start)
            return vectors
        data_start = fh.tell()
        if hasher is not None:
            fh.seek(0)
            hasher.update(fh.read(data_start))
        buffer = np.empty((_row_chunk(dim), dim), dtype="<f4")
        for rows in _row_chunks(n, dim):
            chunk = buffer[: len(rows)]
            if fh.readinto(chunk.data.cast("B")) != chunk.nbytes:
                raise BundleError(f"item_vectors.npy: the file ends before row {n} (truncated)")
            if hasher is not None:
                hasher.update(chunk)
            _compare_rows(stored.rows(rows.start, rows.stop), chunk, rows.start)
        if hasher is not None:
            for rest in iter(lambda: fh.read(READ_CHUNK), b""):
                hasher.update(rest)
    digests.record(bf.ITEM_VECTORS, hasher)
    return stored.view if stored.view is not None else _read_matrix(files, bf.ITEM_VECTORS, shape)


def _row_chunk(dim: int) -> int:
    return max(1, (16 << 20) // (4 * max(dim, 1)))  # 16 MiB of float32 per comparison


def _row_chunks(n: int, dim: int) -> Iterator[range]:
    step = _row_chunk(dim)
    return (range(start, min(n, start + step)) for start in range(0, n, step))


def _compare_rows(stored: np.ndarray, expected: np.ndarray, start: int) -> None:
    if not np.array_equal(stored.view(np.uint32), expected.view(np.uint32)):
        differ = np.flatnonzero((stored.view(np.uint32) != expected.view(np.uint32)).any(axis=1))
        raise BundleError(
            f"item_index.faiss: its vectors differ from item_vectors.npy (first at row {start + int(differ[0])}): "
            "the index is damaged or was built from other vectors"
        )
