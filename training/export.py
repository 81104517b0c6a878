"""Export a training run as a versioned bundle (docs/bundle-format.md): the one thing serving reads.

The bundle holds the model's item vectors in a FAISS index keyed by row, its user vectors, id maps, popularity,
user histories, the raw content features of trained items, an ONNX item encoder (content → item vector) and the
ONNX modality encoders (MiniLM, EfficientNet-Lite0) so the service can turn raw text and images of NEW items into
item vectors. Models without their own content encoder (ID models) get a ridge map from content features to
their item vectors, fitted at export time with the ridge strength chosen on held-out trained items.
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

from models.base import ContentEncoder, UserTower
from models.config import config_to_dict
from training.dataset import TEST, InteractionDataset
from training.item_index import IndexConfig, build_index
from training.runs import LoadedRun, load_run

BUNDLE_FORMAT = "mmrec-bundle"
BUNDLE_FORMAT_VERSION = 1
RIDGE_STRENGTHS = (0.01, 0.1, 1.0, 10.0, 100.0)
_MANIFEST_KEYS = frozenset({"format", "format_version", "bundle_version", "created", "model", "dataset", "dim", "score",
                            "index", "modalities", "item_encoder", "user_tower", "fallback", "metrics", "files"})


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
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def content_inputs(dataset: InteractionDataset) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, features (I, d), mask (I, 1) float32) per modality, in sorted order: the item encoder's inputs."""
    return [
        (name, m.features.astype(np.float32), m.present.astype(np.float32)[:, None])
        for name, m in sorted(dataset.modalities.items())
    ]


class RidgeContentMap(ContentEncoder):
    """x = [f_m · mask_m, mask_m for each modality, 1] → x W: a linear cold-start map for ID models."""

    weight: torch.Tensor

    def __init__(self, modality_names: tuple[str, ...], weight: np.ndarray) -> None:
        super().__init__()
        self.modality_names = modality_names
        self.register_buffer("weight", torch.from_numpy(weight.astype(np.float32)))  # (F + 1, dim)

    def forward(self, *features_and_masks: torch.Tensor) -> torch.Tensor:
        parts = []
        for k in range(len(self.modality_names)):
            features, mask = features_and_masks[2 * k], features_and_masks[2 * k + 1]
            parts += [features * mask, mask]
        x = torch.cat([*parts, torch.ones_like(parts[-1])], dim=1)  # (N, F + 1)
        return x @ self.weight


def fit_ridge_map(dataset: InteractionDataset, item_vectors: np.ndarray, *, holdout: float, seed: int = 0
                  ) -> tuple[RidgeContentMap, dict[str, Any]]:  # fmt: skip
    """Least squares with an L2 penalty from content to item vectors; strength chosen by held-out cosine."""
    inputs = content_inputs(dataset)
    x = np.concatenate([np.concatenate([f * m, m], axis=1) for _, f, m in inputs] + [np.ones((dataset.n_items, 1))],
                       axis=1).astype(np.float64)  # fmt: skip
    y = item_vectors.astype(np.float64)
    rng = np.random.default_rng(seed)
    held = rng.random(dataset.n_items) < holdout
    fit, check = ~held, held

    def solve(rows: np.ndarray, strength: float) -> np.ndarray:
        a = x[rows]
        gram = a.T @ a + strength * np.eye(a.shape[1])
        return np.linalg.solve(gram, a.T @ y[rows])

    def mean_cosine(w: np.ndarray, rows: np.ndarray) -> float:
        pred, true = x[rows] @ w, y[rows]
        denom = np.linalg.norm(pred, axis=1) * np.linalg.norm(true, axis=1) + 1e-12
        return float(((pred * true).sum(axis=1) / denom).mean())

    scores = {s: mean_cosine(solve(fit, s), check) for s in RIDGE_STRENGTHS}
    best = max(scores, key=lambda s: scores[s])
    weight = solve(np.ones(dataset.n_items, dtype=bool), best)
    names = tuple(name for name, _, _ in inputs)
    report = {"ridge_strength": best, "holdout_cosine": {str(k): round(v, 4) for k, v in scores.items()}}
    return RidgeContentMap(names, weight), report


def export_item_encoder(encoder: ContentEncoder, dims: dict[str, int], path: Path) -> list[dict[str, Any]]:
    """Write the item encoder as ONNX with inputs ``<modality>`` (N, d) and ``<modality>_mask`` (N, 1)."""
    from training.onnx_export import export_onnx

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
    from training.onnx_export import export_onnx

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
    """Manifest "modalities": dims of every modality, plus the ONNX encoder for text (MiniLM) and image."""
    entries: dict[str, Any] = {}
    for name, m in sorted(dataset.modalities.items()):
        entry: dict[str, Any] = {"dim": m.dim, "encoder": m.encoder}
        if config.include_modality_encoders and name == "text" and m.dim == 384 and "MiniLM" in m.encoder:
            from training.onnx_export import export_text_encoder

            entry = {**export_text_encoder(out), "encoder": m.encoder}
        elif config.include_modality_encoders and name == "image" and m.dim == 1280:
            from training.onnx_export import export_image_encoder

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
    (staging / "item_features").mkdir(parents=True)

    np.save(staging / "item_vectors.npy", item_vectors)
    if user_vectors is not None:
        np.save(staging / "user_vectors.npy", user_vectors)
    (staging / "item_ids.json").write_text(json.dumps(dataset.item_ids))
    (staging / "user_ids.json").write_text(json.dumps(dataset.user_ids))
    np.save(staging / "popularity.npy",
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
    np.savez(staging / "user_history.npz", indptr=indptr.astype(np.int64), indices=indices.astype(np.int64))
    native = model.content_encoder() if dataset.modalities else None
    labels = {} if native is None else {field: list(names) for field, names in native.extra_output_labels.items()}
    with torch.no_grad():
        extras = {name: values.detach().cpu().numpy().tolist() for name, values in model.item_extras().items()}
    for field, names in labels.items():  # codes of named categories are stored as their labels, as served
        extras[field] = [names[int(code)] for code in extras[field]]
    with (staging / "item_metadata.jsonl").open("w") as f:
        for row, (item_id, text) in enumerate(zip(dataset.item_ids, dataset.item_text, strict=True)):
            f.write(json.dumps({"id": item_id, "text": text, **{k: v[row] for k, v in extras.items()}}) + "\n")
    sections: dict[str, Any] = {}
    for section in model.bundle_sections():
        if section.name in _MANIFEST_KEYS:
            raise ValueError(f"bundle section {section.name!r} would overwrite a manifest field")
        (staging / section.name).mkdir()
        paths = {}
        for key, array in section.arrays.items():
            paths[key] = f"{section.name}/{key}.npy"
            np.save(staging / paths[key], array.detach().cpu().numpy())
        sections[section.name] = {**section.description, "arrays": paths}
    for name, m in dataset.modalities.items():
        np.save(staging / "item_features" / f"{name}.npy", m.features.astype(np.float32))
        np.save(staging / "item_features" / f"{name}.mask.npy", m.present.astype(bool))
    index, index_info = build_index(item_vectors, config.index, user_vectors=user_vectors)
    faiss.write_index(index, str(staging / "item_index.faiss"))

    item_encoder: dict[str, Any] | None = None
    modalities: dict[str, Any] = {}
    if dataset.modalities:
        ridge_report: dict[str, Any] = {}
        if native is None:
            native, ridge_report = fit_ridge_map(dataset, item_vectors, holdout=config.ridge_holdout)
        native.eval()
        dims = {name: m.dim for name, m in dataset.modalities.items()}
        inputs = export_item_encoder(native, dims, staging / "item_encoder.onnx")
        item_encoder = {
            "onnx": "item_encoder.onnx",
            "method": "ridge-map" if ridge_report else "native",
            "inputs": inputs,
            "outputs": {"item_vector": "item_vector"},
            "extra_outputs": {name: name for name in native.extra_output_names},
            **({"extra_output_labels": labels} if labels else {}),
            **({"fit": ridge_report} if ridge_report else {}),
        }
        modalities = _modality_encoder_entries(dataset, staging, config)

    user_tower = None if tower is None else export_user_tower(tower, item_vectors.shape[1], staging / "user_tower.onnx")

    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    files = staged_file_hashes(staging)
    content_hash = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:8]
    metrics = run.metrics
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "bundle_version": f"{run.model_name}-{dataset.name}-{created.replace('-', '').replace(':', '')}-{content_hash}",
        "created": created,
        "model": {"name": run.model_name, "kind": "sequential" if reps.users is None else "collaborative",
                  "config": config_to_dict(model.config) if hasattr(model, "config") else {}},  # fmt: skip
        "dataset": {"name": dataset.name, "split": dataset.split_name, "n_users": dataset.n_users,
                    "n_items": dataset.n_items},  # fmt: skip
        "dim": int(item_vectors.shape[1]),
        "score": "inner_product",
        "index": index_info,
        "modalities": modalities,
        "item_encoder": item_encoder,
        "user_tower": user_tower,
        "fallback": {"unknown_user": "history-mean, else popularity"},
        "metrics": {"valid": metrics.get("valid", {}), "test": metrics.get("test", {}),
                    "best_epoch": metrics.get("best_epoch"), "run_dir": str(run_dir)},  # fmt: skip
        **sections,
        "files": files,
    }
    return publish_bundle(staging, out, manifest)
