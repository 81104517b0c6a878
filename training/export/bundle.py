"""Export a training run as a versioned bundle (docs/bundle-format.md): the one thing serving reads.

The bundle holds the model's item vectors in a FAISS index keyed by row, its user vectors, id maps, popularity,
user histories, the raw content features of trained items, an ONNX item encoder (content → item vector) and the
ONNX modality encoders (MiniLM, EfficientNet-Lite0) so the service can turn raw text and images of NEW items into
item vectors. Models without their own content encoder (ID models) get the ridge map of ``training.export.ridge``.

The writer is a list of steps (:data:`BUNDLE_STEPS`): each writes its artefacts into the staging directory and
returns the manifest fields it describes. Adding an artefact to the bundle is adding a step; the manifest's common
fields (format, version, model, dataset, metrics, files) are written last, by :func:`export_run`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

import bundle_format as bf
from models.base import ContentEncoder, Representations
from models.config import config_to_dict
from training.data.dataset import TEST
from training.data.user_profile import user_profile_cosine
from training.export.item_index import IndexConfig, build_index
from training.export.ridge import fit_ridge_map
from training.export.staging import publish_bundle, staged_file_hashes
from training.runs import LoadedRun, load_run


@dataclass(frozen=True)
class ExportConfig:
    index: IndexConfig = IndexConfig()  # exact below a size threshold, else IVF/HNSW tuned to a recall target
    include_modality_encoders: bool = True  # export MiniLM / EfficientNet-Lite0 so raw text and images can be ingested
    ridge_holdout: float = 0.1  # share of trained items held out to choose the ridge strength
    # MiniLM's MatMuls in int8: half the CPU of ingesting a text (the service's largest cost), cosine 0.993 to fp32
    text_encoder_precision: bf.EncoderPrecision = bf.INT8_DYNAMIC
    # EfficientNet-Lite0 in fp32 unless asked: int8-static (0.68x the CPU, feature cosine 0.990) moves ridge-map item
    # vectors by cosine 0.984 on average, 0.87 at worst (bench/results/image-encoder-int8.json): opt-in
    image_encoder_precision: bf.EncoderPrecision = bf.FP32


class StagedBundle:
    """A bundle being written into ``staging``: the run, what the steps share (vectors, the content encoder)."""

    def __init__(self, run: LoadedRun, staging: Path, config: ExportConfig) -> None:
        self.run, self.staging, self.config = run, staging, config
        self.dataset, self.model = run.dataset, run.model
        with torch.no_grad():
            self.representations: Representations = self.model.representations()
            self.item_vectors = self.representations.items.detach().float().cpu().numpy()  # (I, d)
            users = self.representations.users
            self.user_vectors = None if users is None else users.detach().float().cpu().numpy()  # (U, d)

    @cached_property
    def native_encoder(self) -> ContentEncoder | None:
        """The model's own content encoder (built once: R2MR's fits its ridge heads when built)."""
        return self.model.content_encoder() if self.dataset.modalities else None

    @property
    def extra_output_labels(self) -> dict[str, list[str]]:
        native = self.native_encoder
        return {} if native is None else {field: list(names) for field, names in native.extra_output_labels.items()}


BundleStep = Callable[[StagedBundle], Mapping[str, Any]]  # writes its files, returns its manifest fields


def write_vectors(bundle: StagedBundle) -> Mapping[str, Any]:
    np.save(bundle.staging / bf.ITEM_VECTORS, bundle.item_vectors)
    if bundle.user_vectors is not None:
        np.save(bundle.staging / bf.USER_VECTORS, bundle.user_vectors)
    return {"dim": int(bundle.item_vectors.shape[1])}


def write_ids(bundle: StagedBundle) -> Mapping[str, Any]:
    (bundle.staging / bf.ITEM_IDS).write_text(json.dumps(bundle.dataset.item_ids))
    (bundle.staging / bf.USER_IDS).write_text(json.dumps(bundle.dataset.user_ids))
    return {}


def write_popularity(bundle: StagedBundle) -> Mapping[str, Any]:
    """Training interactions per item: the unknown user's fallback ranking."""
    dataset = bundle.dataset
    np.save(bundle.staging / bf.POPULARITY,
            np.bincount(dataset.edges(0)[1], minlength=dataset.n_items).astype(np.float32))  # fmt: skip
    return {}


def write_user_history(bundle: StagedBundle) -> Mapping[str, Any]:
    """Each user's item rows as a CSR: everything seen (serving excludes it), or for a model with a user tower the
    interactions in time order, oldest first, repeats kept (what the tower reads)."""
    dataset = bundle.dataset
    if bundle.model.user_tower() is None:
        history = (dataset.matrix(0) + dataset.matrix(1) + dataset.matrix(2)).tocsr()
        history.sort_indices()
        indptr, indices = history.indptr, history.indices
    else:
        sequences = dataset.chronological_history(through=TEST)
        indptr = np.concatenate([[0], np.cumsum([s.size for s in sequences])])
        indices = np.concatenate([*sequences, np.zeros(0, dtype=np.int64)])
    np.savez(bundle.staging / bf.USER_HISTORY,
             **{bf.HISTORY_INDPTR: indptr.astype(np.int64), bf.HISTORY_INDICES: indices.astype(np.int64)})  # fmt: skip
    return {}


def write_item_metadata(bundle: StagedBundle) -> Mapping[str, Any]:
    """One JSON line per item: id, text, the model's per-item extras (codes of named categories as labels) and the
    user-profile cosine ``profile_<m>`` of every content modality (``training.data.user_profile``; null where
    undefined), which ``GET /v1/audit?by=profile`` ranks. Declares the cosines in the manifest."""
    labels = bundle.extra_output_labels
    with torch.no_grad():
        extras = {name: values.detach().cpu().numpy().tolist() for name, values in bundle.model.item_extras().items()}
    for field, names in labels.items():
        extras[field] = [names[int(code)] for code in extras[field]]
    dataset = bundle.dataset
    modalities = sorted(dataset.modalities)
    for m in modalities:
        cosine = user_profile_cosine(dataset, m)
        extras[bf.profile_field(m)] = [None if np.isnan(c) else float(c) for c in cosine]
    with (bundle.staging / bf.ITEM_METADATA).open("w") as f:
        for row, (item_id, text) in enumerate(zip(dataset.item_ids, dataset.item_text, strict=True)):
            f.write(json.dumps({"id": item_id, "text": text, **{k: v[row] for k, v in extras.items()}}) + "\n")
    if not modalities:
        return {}
    return {bf.PROFILE_COSINE: bf.profile_cosine_entry(modalities)}


def write_bundle_sections(bundle: StagedBundle) -> Mapping[str, Any]:
    """The model's own sections (QARM's codebooks): arrays under ``<section>/``, a manifest field each."""
    sections: dict[str, Any] = {}
    for section in bundle.model.bundle_sections():
        if section.name in bf.MANIFEST_FIELDS:
            raise ValueError(f"bundle section {section.name!r} would overwrite a manifest field")
        (bundle.staging / section.name).mkdir()
        paths = {}
        for key, array in section.arrays.items():
            paths[key] = bf.section_array_file(section.name, key)
            np.save(bundle.staging / paths[key], array.detach().cpu().numpy())
        sections[section.name] = {**section.description, "arrays": paths}
    return sections


def write_item_features(bundle: StagedBundle) -> Mapping[str, Any]:
    """The trained items' raw features and presence masks per modality (what the item encoder reads)."""
    for name, m in bundle.dataset.modalities.items():
        np.save(bundle.staging / bf.item_features_file(name), m.features.astype(np.float32))
        np.save(bundle.staging / bf.item_features_mask_file(name), m.present.astype(bool))
    return {}


def write_item_index(bundle: StagedBundle) -> Mapping[str, Any]:
    import faiss

    index, index_info = build_index(bundle.item_vectors, bundle.config.index, user_vectors=bundle.user_vectors)
    faiss.write_index(index, str(bundle.staging / bf.ITEM_INDEX))
    return {"index": index_info}


def write_item_encoder(bundle: StagedBundle) -> Mapping[str, Any]:
    """The ONNX item encoder: the model's own, or for an ID model the ridge map fitted here. None without content."""
    dataset = bundle.dataset
    if not dataset.modalities:
        return {"item_encoder": None}
    from training.export.onnx_export import export_item_encoder

    encoder = bundle.native_encoder
    ridge_report: dict[str, Any] = {}
    if encoder is None:
        encoder, ridge_report = fit_ridge_map(dataset, bundle.item_vectors, holdout=bundle.config.ridge_holdout)
    encoder.eval()
    dims = {name: m.dim for name, m in dataset.modalities.items()}
    inputs = export_item_encoder(encoder, dims, bundle.staging / bf.ITEM_ENCODER)
    labels = bundle.extra_output_labels
    return {"item_encoder": {
        "onnx": bf.ITEM_ENCODER,
        "method": "ridge-map" if ridge_report else "native",
        "inputs": inputs,
        "outputs": {"item_vector": "item_vector"},
        "extra_outputs": {name: name for name in encoder.extra_output_names},
        **({"extra_output_labels": labels} if labels else {}),
        **({"fit": ridge_report} if ridge_report else {}),
    }}  # fmt: skip


def write_modality_encoders(bundle: StagedBundle) -> Mapping[str, Any]:
    """Manifest "modalities": dims of every modality, plus the ONNX encoder of a modality whose features came from
    one of the pretrained encoders (recognised by the encoder named in the prepared dataset, not by dimension)."""
    entries: dict[str, Any] = {}
    if not bundle.dataset.modalities:
        return {"modalities": entries}
    from training.data.encoders import encoder_kind

    for name, m in sorted(bundle.dataset.modalities.items()):
        entry: dict[str, Any] = {"dim": m.dim, "encoder": m.encoder}
        kind = encoder_kind(m.encoder) if bundle.config.include_modality_encoders else None
        if kind == bf.TEXT:
            from training.export.onnx_export import export_text_encoder

            entry = {**export_text_encoder(bundle.staging, precision=bundle.config.text_encoder_precision),
                     "encoder": m.encoder}  # fmt: skip
        elif kind == bf.IMAGE:
            from training.export.onnx_export import export_image_encoder, image_calibration_sample

            precision = bundle.config.image_encoder_precision
            calibration = image_calibration_sample(bundle.dataset.item_image) if precision == bf.INT8_STATIC else []
            entry = {**export_image_encoder(bundle.staging, precision=precision, calibration_images=calibration),
                     "encoder": m.encoder}  # fmt: skip
        entries[name] = entry
    return {"modalities": entries}


def write_user_tower(bundle: StagedBundle) -> Mapping[str, Any]:
    """A sequence model's ONNX user tower; None for a model with a user table."""
    tower = bundle.model.user_tower()
    if tower is None:
        return {"user_tower": None}
    from training.export.onnx_export import export_user_tower

    return {"user_tower": export_user_tower(tower, bundle.item_vectors.shape[1], bundle.staging / bf.USER_TOWER)}


BUNDLE_STEPS: tuple[BundleStep, ...] = (
    write_vectors,
    write_ids,
    write_popularity,
    write_user_history,
    write_item_metadata,
    write_bundle_sections,
    write_item_features,
    write_item_index,
    write_item_encoder,
    write_modality_encoders,
    write_user_tower,
)


def common_manifest_fields(bundle: StagedBundle, files: Mapping[str, str], run_dir: Path) -> dict[str, Any]:
    """What every manifest says whatever the steps wrote: format, a version naming the content, model, dataset,
    metrics of the run."""
    run, dataset, model = bundle.run, bundle.dataset, bundle.model
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    content_hash = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:8]
    metrics = run.metrics
    return {
        "format": bf.FORMAT,
        "format_version": bf.FORMAT_VERSION,
        "bundle_version": f"{run.model_name}-{dataset.name}-{created.replace('-', '').replace(':', '')}-{content_hash}",
        "created": created,
        "model": {"name": run.model_name,
                  "kind": "sequential" if bundle.representations.users is None else "collaborative",
                  "config": config_to_dict(model.config) if hasattr(model, "config") else {}},  # fmt: skip
        "dataset": {"name": dataset.name, "split": dataset.split_name, "n_users": dataset.n_users,
                    "n_items": dataset.n_items},  # fmt: skip
        "score": bf.SCORE,
        "fallback": {"unknown_user": bf.FALLBACK_UNKNOWN_USER},
        "metrics": {"valid": metrics.get("valid", {}), "test": metrics.get("test", {}),
                    "best_epoch": metrics.get("best_epoch"), "run_dir": str(run_dir)},  # fmt: skip
    }


def export_run(run_dir: Path, out: Path, *, config: ExportConfig = ExportConfig(), run: LoadedRun | None = None,
               steps: tuple[BundleStep, ...] = BUNDLE_STEPS) -> Path:  # fmt: skip
    """Write the bundle of ``run_dir`` into ``out`` (replaced if it exists), one step per artefact. Returns ``out``."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / bf.ITEM_FEATURES_DIR).mkdir(parents=True)
    bundle = StagedBundle(run or load_run(run_dir), staging, config)
    described: dict[str, Any] = {}
    for step in steps:
        described.update(step(bundle))
    files = staged_file_hashes(staging)
    manifest = {**common_manifest_fields(bundle, files, run_dir), **described, "files": files}
    return publish_bundle(staging, out, manifest)
