"""The bundle's names (docs/bundle-format.md): file names, manifest fields and the format version.

Training writes bundles with these names (``training/export``), the service reads them (``service/bundle.py``):
one spelling of the contract, with no dependency beyond the standard library (the service imports no torch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

FORMAT: Final = "mmrec-bundle"
# 2: a modality that ships an encoder names its kind ("encoder_kind": "text" | "image"); 1 told them apart by
# which keys the entry had (a "tokenizer" meant text).
FORMAT_VERSION: Final = 2
READABLE_FORMAT_VERSIONS: Final = (1, 2)

# --- files --------------------------------------------------------------------------------------------------
MANIFEST: Final = "manifest.json"
ITEM_IDS: Final = "item_ids.json"
USER_IDS: Final = "user_ids.json"
ITEM_VECTORS: Final = "item_vectors.npy"
USER_VECTORS: Final = "user_vectors.npy"
ITEM_INDEX: Final = "item_index.faiss"
POPULARITY: Final = "popularity.npy"
USER_HISTORY: Final = "user_history.npz"
HISTORY_INDPTR: Final = "indptr"  # the arrays of USER_HISTORY: a CSR of item rows per user row
HISTORY_INDICES: Final = "indices"
ITEM_METADATA: Final = "item_metadata.jsonl"
ITEM_FEATURES_DIR: Final = "item_features"
ITEM_ENCODER: Final = "item_encoder.onnx"
USER_TOWER: Final = "user_tower.onnx"
TEXT_ENCODER: Final = "text_encoder.onnx"
TEXT_TOKENIZER: Final = "tokenizer.json"
IMAGE_ENCODER: Final = "image_encoder.onnx"

REQUIRED_FILES: Final = (ITEM_IDS, ITEM_VECTORS, ITEM_INDEX, POPULARITY)


def item_features_file(modality: str) -> str:
    """float32 (n_items, d) raw features of the trained items for ``modality``."""
    return f"{ITEM_FEATURES_DIR}/{modality}.npy"


def item_features_mask_file(modality: str) -> str:
    """bool (n_items,): whether each trained item has ``modality``."""
    return f"{ITEM_FEATURES_DIR}/{modality}.mask.npy"


def profile_field(modality: str) -> str:
    """The ``item_metadata.jsonl`` key of a trained item's user-profile cosine of ``modality`` (float in [−1, 1], or
    null where undefined), present when the manifest's ``profile_cosine.modalities`` lists the modality."""
    return f"profile_{modality}"


def section_array_file(section: str, array: str) -> str:
    """A model-specific section's array (QARM: ``semantic_codes/codebooks.npy``)."""
    return f"{section}/{array}.npy"


def file_sha256(path: Path) -> str:
    """The digest the manifest's ``files`` lists for a bundle file: sha256 of its bytes, in hex."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- manifest -----------------------------------------------------------------------------------------------
MANIFEST_FIELDS: Final = frozenset({
    "format", "format_version", "bundle_version", "created", "model", "dataset", "dim", "score", "index",
    "modalities", "item_encoder", "user_tower", "fallback", "metrics", "files", "profile_cosine",
})  # fmt: skip
PROFILE_COSINE: Final = "profile_cosine"  # manifest: {"modalities": [...], "interactions": "train"}


def profile_cosine_entry(modalities: Sequence[str]) -> dict[str, Any]:
    """The manifest's ``profile_cosine`` entry declaring the ``profile_<m>`` metadata keys of ``modalities``."""
    return {"modalities": sorted(modalities), "interactions": "train"}


def profile_modalities(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """The modalities whose ``profile_<m>`` the manifest declares (``profile_cosine``), sorted; empty when it declares
    none or the entry is malformed."""
    declared = manifest.get(PROFILE_COSINE)
    names = declared.get("modalities") if isinstance(declared, dict) else None
    if not isinstance(names, list) or not all(isinstance(m, str) for m in names):
        return ()
    return tuple(sorted(names))
REQUIRED_MANIFEST_FIELDS: Final = ("bundle_version", "model", "dim", "files")
SCORE: Final = "inner_product"

# The manifest's "index.type" (docs/bundle-format.md, "Index"). Every kind ranks by inner product.
INDEX_FLAT_IP: Final = "flat_ip"  # exact
INDEX_IVF_MIPS: Final = "ivf_flat_mips"  # IVF-Flat, L2 over the vectors with sqrt(max_norm² − ‖x‖²) appended
INDEX_IVF_IP: Final = "ivf_flat_ip"  # IVF-Flat under the inner product (bundles written before ivf_flat_mips)
INDEX_HNSW_IP: Final = "hnsw_ip"
INDEX_TYPES: Final = (INDEX_FLAT_IP, INDEX_IVF_MIPS, INDEX_IVF_IP, INDEX_HNSW_IP)
FALLBACK_UNKNOWN_USER: Final = "history-mean, else popularity"

EncoderKind = Literal["text", "image"]
TEXT: Final = "text"
IMAGE: Final = "image"
ENCODER_KINDS: Final[tuple[EncoderKind, ...]] = ("text", "image")

# A shipped encoder graph's arithmetic (a modality entry's "onnx_precision"): "fp32" is the exported graph as is;
# "int8-dynamic" has its MatMul weights quantised to int8 per output channel and its activations quantised at run
# time (onnxruntime.quantization.quantize_dynamic); "int8-static" has int8 weights per output channel and int8
# activations with scales fixed at export by calibration on the dataset's own images (quantize_static, QDQ
# operators). An entry without the field (bundles written before it) is fp32. Optional and read-only for the service
# (it runs every graph alike), so no format version is bumped for it; a reader that predates a value refuses it by
# name rather than guessing. Which values an exporter writes depends on the encoder (text: dynamic; image: static).
EncoderPrecision = Literal["fp32", "int8-dynamic", "int8-static"]
FP32: Final = "fp32"
INT8_DYNAMIC: Final = "int8-dynamic"
INT8_STATIC: Final = "int8-static"
ENCODER_PRECISIONS: Final[tuple[EncoderPrecision, ...]] = ("fp32", "int8-dynamic", "int8-static")
TEXT_ENCODER_PRECISIONS: Final[tuple[EncoderPrecision, ...]] = ("fp32", "int8-dynamic")
IMAGE_ENCODER_PRECISIONS: Final[tuple[EncoderPrecision, ...]] = ("fp32", "int8-static")


def modality_encoder_kind(entry: Mapping[str, Any], *, format_version: int) -> EncoderKind | None:
    """Which pretrained encoder a manifest "modalities" entry ships: None when it ships none (no ``encoder_onnx``);
    else its ``encoder_kind`` (format 2), and for a format-1 entry that names none, "text" if it has a
    ``tokenizer``, else "image". A kind outside ENCODER_KINDS is a ValueError."""
    if not entry.get("encoder_onnx"):
        return None
    if format_version == 1 and "encoder_kind" not in entry:
        return TEXT if "tokenizer" in entry else IMAGE
    kind = entry.get("encoder_kind")
    if kind == TEXT:
        return TEXT
    if kind == IMAGE:
        return IMAGE
    raise ValueError(f"encoder_kind must be one of {', '.join(ENCODER_KINDS)}, got {kind!r}")


def modality_encoder_precision(entry: Mapping[str, Any]) -> EncoderPrecision:
    """The arithmetic of a modality entry's shipped encoder graph ("onnx_precision"): "fp32" where the entry names
    none; a value outside ENCODER_PRECISIONS is a ValueError."""
    precision = entry.get("onnx_precision", FP32)
    for known in ENCODER_PRECISIONS:
        if precision == known:
            return known
    raise ValueError(f"onnx_precision must be one of {', '.join(ENCODER_PRECISIONS)}, got {precision!r}")
