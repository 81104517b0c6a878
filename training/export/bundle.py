"""Export a training run as a versioned bundle (docs/bundle-format.md): the one thing serving reads.

The bundle holds the model's item vectors in a FAISS index keyed by row, its user vectors, id maps, popularity,
user histories, the raw content features of trained items, an ONNX item encoder (content → item vector) and the
ONNX modality encoders (MiniLM, EfficientNet-Lite0) so the service can turn raw text and images of NEW items into
item vectors. Models without their own content encoder (ID models) get the ridge map of ``training.export.ridge``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import bundle_format as bf
from models.base import ContentEncoder, UserTower
from models.config import config_to_dict
from training.data.dataset import TEST, InteractionDataset
from training.export.item_index import IndexConfig, build_index
from training.export.ridge import fit_ridge_map
from training.runs import LoadedRun, load_run


@dataclass(frozen=True)
class ExportConfig:
    index: IndexConfig = IndexConfig()  # exact below a size threshold, else IVF/HNSW tuned to a recall target
    include_modality_encoders: bool = True  # export MiniLM / EfficientNet-Lite0 so raw text and images can be ingested
    ridge_holdout: float = 0.1  # share of trained items held out to choose the ridge strength


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def staged_file_hashes(staging: Path) -> dict[str, str]:
    """The manifest's ``files``: every file of a bundle being written, by relative path, to its sha256."""
    return {p.relative_to(staging).as_posix(): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()}


def publish_bundle(staging: Path, out: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest last and move the finished bundle to ``out`` (replacing one there): a reader never
    sees a half-written bundle at ``out``."""
    (staging / bf.MANIFEST).write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def export_item_encoder(encoder: ContentEncoder, dims: dict[str, int], path: Path) -> list[dict[str, Any]]:
    """Write the item encoder as ONNX with inputs ``<modality>`` (N, d) and ``<modality>_mask`` (N, 1)."""
    from training.export.onnx_export import export_onnx

    names: list[str] = []
    example: list[torch.Tensor] = []
    spec: list[dict[str, Any]] = []
    batch = torch.export.Dim("batch", min=1)
    for modality in encoder.modality_names:
        names += [modality, f"{modality}_mask"]
        example += [torch.zeros(2, dims[modality]), torch.ones(2, 1)]
        spec += [{"name": modality, "modality": modality, "dim": dims[modality]},
                 {"name": f"{modality}_mask", "modality": modality, "mask": True}]  # fmt: skip
    export_onnx(_PositionalInputs(encoder, names).eval(), tuple(example), path, input_names=names,
                output_name="item_vector", extra_output_names=tuple(encoder.extra_output_names),
                dynamic_shapes={"tensors": tuple({0: batch} for _ in names)})  # fmt: skip
    return spec


def export_user_tower(tower: UserTower, dim: int, path: Path) -> dict[str, Any]:
    """Write a sequence model's user tower as ONNX, ``item_vectors`` (B, max_length, dim) and ``mask``
    (B, max_length) float32 → ``user_vector`` (B, dim); returns the manifest's ``user_tower`` entry."""
    from training.export.onnx_export import export_onnx

    length = tower.max_length
    vectors = torch.randn(2, length, dim, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, length)
    mask[0, : length - 1] = 0.0  # a left-padded history of one item, and a full one
    batch = torch.export.Dim("batch", min=1)
    export_onnx(tower.eval(), (vectors * mask[..., None], mask), path, input_names=["item_vectors", "mask"],
                output_name="user_vector", dynamic_shapes={"item_vectors": {0: batch}, "mask": {0: batch}})  # fmt: skip
    return {"onnx": path.name, "max_length": length, "inputs": {"item_vectors": "item_vectors", "mask": "mask"},
            "output": "user_vector"}  # fmt: skip


class _PositionalInputs(nn.Module):
    """Gives the exporter named positional arguments (the encoder takes *args)."""

    def __init__(self, encoder: ContentEncoder, names: list[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs: torch.Tensor | tuple[torch.Tensor, ...] = self.encoder(*tensors)
        return outputs


def _modality_encoder_entries(dataset: InteractionDataset, out: Path, config: ExportConfig) -> dict[str, Any]:
    """Manifest "modalities": dims of every modality, plus the ONNX encoder of a modality whose features came from
    one of the pretrained encoders (recognised by the encoder named in the prepared dataset, not by dimension)."""
    entries: dict[str, Any] = {}
    for name, m in sorted(dataset.modalities.items()):
        entry: dict[str, Any] = {"dim": m.dim, "encoder": m.encoder}
        if config.include_modality_encoders:
            from training.data.encoders import encoder_kind

            kind = encoder_kind(m.encoder)
            if kind == bf.TEXT:
                from training.export.onnx_export import export_text_encoder

                entry = {**export_text_encoder(out), "encoder": m.encoder}
            elif kind == bf.IMAGE:
                from training.export.onnx_export import export_image_encoder

                entry = {**export_image_encoder(out), "encoder": m.encoder}
        entries[name] = entry
    return entries


def export_run(run_dir: Path, out: Path, *, config: ExportConfig = ExportConfig(), run: LoadedRun | None = None) -> Path:
    """Write the bundle of ``run_dir`` into ``out`` (replaced if it exists). Returns ``out``."""
    import faiss

    run = run or load_run(run_dir)
    dataset, model = run.dataset, run.model
    with torch.no_grad():
        reps = model.representations()
        item_vectors = reps.items.detach().float().cpu().numpy()
        user_vectors = None if reps.users is None else reps.users.detach().float().cpu().numpy()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / bf.ITEM_FEATURES_DIR).mkdir(parents=True)

    np.save(staging / bf.ITEM_VECTORS, item_vectors)
    if user_vectors is not None:
        np.save(staging / bf.USER_VECTORS, user_vectors)
    (staging / bf.ITEM_IDS).write_text(json.dumps(dataset.item_ids))
    (staging / bf.USER_IDS).write_text(json.dumps(dataset.user_ids))
    np.save(staging / bf.POPULARITY,
            np.bincount(dataset.edges(0)[1], minlength=dataset.n_items).astype(np.float32))  # fmt: skip
    tower = model.user_tower()
    if tower is None:
        history = dataset.matrix(0) + dataset.matrix(1) + dataset.matrix(2)  # serving excludes everything seen
        history = history.tocsr()
        history.sort_indices()
        indptr, indices = history.indptr, history.indices
    else:  # the user tower reads each user's interactions in time order, oldest first (repeats kept)
        sequences = dataset.chronological_history(through=TEST)
        indptr = np.concatenate([[0], np.cumsum([s.size for s in sequences])])
        indices = np.concatenate([*sequences, np.zeros(0, dtype=np.int64)])
    np.savez(staging / bf.USER_HISTORY,
             **{bf.HISTORY_INDPTR: indptr.astype(np.int64), bf.HISTORY_INDICES: indices.astype(np.int64)})  # fmt: skip
    native = model.content_encoder() if dataset.modalities else None
    labels = {} if native is None else {field: list(names) for field, names in native.extra_output_labels.items()}
    with torch.no_grad():
        extras = {name: values.detach().cpu().numpy().tolist() for name, values in model.item_extras().items()}
    for field, names in labels.items():  # codes of named categories are stored as their labels, as served
        extras[field] = [names[int(code)] for code in extras[field]]
    with (staging / bf.ITEM_METADATA).open("w") as f:
        for row, (item_id, text) in enumerate(zip(dataset.item_ids, dataset.item_text, strict=True)):
            f.write(json.dumps({"id": item_id, "text": text, **{k: v[row] for k, v in extras.items()}}) + "\n")
    sections: dict[str, Any] = {}
    for section in model.bundle_sections():
        if section.name in bf.MANIFEST_FIELDS:
            raise ValueError(f"bundle section {section.name!r} would overwrite a manifest field")
        (staging / section.name).mkdir()
        paths = {}
        for key, array in section.arrays.items():
            paths[key] = bf.section_array_file(section.name, key)
            np.save(staging / paths[key], array.detach().cpu().numpy())
        sections[section.name] = {**section.description, "arrays": paths}
    for name, m in dataset.modalities.items():
        np.save(staging / bf.item_features_file(name), m.features.astype(np.float32))
        np.save(staging / bf.item_features_mask_file(name), m.present.astype(bool))
    index, index_info = build_index(item_vectors, config.index, user_vectors=user_vectors)
    faiss.write_index(index, str(staging / bf.ITEM_INDEX))

    item_encoder: dict[str, Any] | None = None
    modalities: dict[str, Any] = {}
    if dataset.modalities:
        ridge_report: dict[str, Any] = {}
        if native is None:
            native, ridge_report = fit_ridge_map(dataset, item_vectors, holdout=config.ridge_holdout)
        native.eval()
        dims = {name: m.dim for name, m in dataset.modalities.items()}
        inputs = export_item_encoder(native, dims, staging / bf.ITEM_ENCODER)
        item_encoder = {
            "onnx": bf.ITEM_ENCODER,
            "method": "ridge-map" if ridge_report else "native",
            "inputs": inputs,
            "outputs": {"item_vector": "item_vector"},
            "extra_outputs": {name: name for name in native.extra_output_names},
            **({"extra_output_labels": labels} if labels else {}),
            **({"fit": ridge_report} if ridge_report else {}),
        }
        modalities = _modality_encoder_entries(dataset, staging, config)

    user_tower = None if tower is None else export_user_tower(tower, item_vectors.shape[1], staging / bf.USER_TOWER)

    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    files = staged_file_hashes(staging)
    content_hash = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:8]
    metrics = run.metrics
    manifest = {
        "format": bf.FORMAT,
        "format_version": bf.FORMAT_VERSION,
        "bundle_version": f"{run.model_name}-{dataset.name}-{created.replace('-', '').replace(':', '')}-{content_hash}",
        "created": created,
        "model": {"name": run.model_name, "kind": "sequential" if reps.users is None else "collaborative",
                  "config": config_to_dict(model.config) if hasattr(model, "config") else {}},  # fmt: skip
        "dataset": {"name": dataset.name, "split": dataset.split_name, "n_users": dataset.n_users,
                    "n_items": dataset.n_items},  # fmt: skip
        "dim": int(item_vectors.shape[1]),
        "score": bf.SCORE,
        "index": index_info,
        "modalities": modalities,
        "item_encoder": item_encoder,
        "user_tower": user_tower,
        "fallback": {"unknown_user": bf.FALLBACK_UNKNOWN_USER},
        "metrics": {"valid": metrics.get("valid", {}), "test": metrics.get("test", {}),
                    "best_epoch": metrics.get("best_epoch"), "run_dir": str(run_dir)},  # fmt: skip
        **sections,
        "files": files,
    }
    return publish_bundle(staging, out, manifest)
