"""Synthetic bundles that follow docs/bundle-format.md exactly, built with numpy, faiss and onnx.helper.

The graphs are tiny but real ONNX, and every one has a numpy twin here (``SyntheticBundle.encode`` etc.), so tests
can check the service's outputs against a reference:
- item encoder: ``concat(features and masks, in manifest input order) @ W + b`` (+ an extra output ``x @ q``; or,
  with ``quality=True``, R2MR's quality fields: ``quality_<m> = sigmoid(x_m @ q_m) * mask_m`` per modality and
  ``quality_state`` = 2 − (number of modalities scoring ≥ 0.5), labelled high-quality / disparity / low-quality);
- text encoder: mean of token embeddings over the attention mask, tokenised by a WordLevel ``tokenizer.json``;
- image encoder: per-channel mean of the normalised pixels, times a (3, d) matrix;
- user tower (sequence bundles): masked mean of the recent item vectors, times a (dim, dim) matrix.

With ``profile=True`` the trained items' metadata also carries the user-profile cosines ``profile_<m>`` (computed by
loops over the bundle's histories, :func:`profile_cosines`) and the manifest declares them (``profile_cosine``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

OPSET = 17
WORDS = ["the", "a", "film", "quiet", "loud", "lighthouse", "keeper", "space", "war", "love", "story", "dog", "cat", "robot", "city", "night", "day", "music"]
IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]
QUALITY_STATES = ("high-quality", "disparity", "low-quality")


@dataclass
class SyntheticBundle:
    path: Path
    manifest: dict[str, Any]
    item_ids: list[str]
    user_ids: list[str]
    item_vectors: np.ndarray  # (n_items, dim)
    user_vectors: np.ndarray | None  # (n_users, dim)
    popularity: np.ndarray  # (n_items,)
    history: list[list[int]]  # item rows per user, oldest first
    modality_dims: dict[str, int]
    inputs: list[tuple[str, str, bool]]  # item encoder inputs (name, modality, is_mask) in manifest order
    weight: np.ndarray  # (sum of input widths, dim)
    bias: np.ndarray  # (dim,)
    quality: np.ndarray | None = None  # (sum of input widths, 1): the extra output's weights
    modality_quality: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (d_m, 1): quality_<m> weights
    vocab: dict[str, int] = field(default_factory=dict)
    embedding: np.ndarray | None = None  # (vocab, d_text)
    image_projection: np.ndarray | None = None  # (3, d_image)
    tower_weight: np.ndarray | None = None  # (dim, dim)
    tower_length: int = 0
    text_max_length: int = 16

    @property
    def version(self) -> str:
        return str(self.manifest["bundle_version"])

    def encode(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """Numpy twin of item_encoder.onnx for one item: (dim,)."""
        return self._input_row(features) @ self.weight + self.bias

    def quality_of(self, features: dict[str, np.ndarray]) -> float:
        assert self.quality is not None
        return float((self._input_row(features) @ self.quality)[0])

    def quality_fields(self, features: dict[str, np.ndarray]) -> dict[str, Any]:
        """Numpy twin of the quality outputs for one item: quality_<m> (float32) and quality_state (its label)."""
        out: dict[str, Any] = {}
        for m, weights in self.modality_quality.items():
            if m in features:
                logit = np.asarray(features[m], dtype=np.float32) @ weights
                out[f"quality_{m}"] = float(np.float32(1.0 / (1.0 + np.exp(-logit[0]))))
            else:
                out[f"quality_{m}"] = 0.0
        n_good = sum(out[f"quality_{m}"] >= 0.5 for m in self.modality_quality)
        out["quality_state"] = QUALITY_STATES[2 - n_good]
        return out

    def encode_text(self, text: str) -> np.ndarray:
        """Numpy twin of the tokenizer + text_encoder.onnx: (d_text,)."""
        assert self.embedding is not None
        ids = [self.vocab.get(w, self.vocab["[UNK]"]) for w in text.lower().split()][: self.text_max_length]
        return self.embedding[ids].mean(axis=0) if ids else np.zeros(self.embedding.shape[1], dtype=np.float32)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Numpy twin of image_encoder.onnx on preprocessed (3, S, S) pixels: (d_image,)."""
        assert self.image_projection is not None
        return pixels.mean(axis=(1, 2)) @ self.image_projection

    def tower(self, rows: list[int]) -> np.ndarray:
        assert self.tower_weight is not None
        recent = rows[-self.tower_length :]
        return self.item_vectors[recent].mean(axis=0) @ self.tower_weight

    def _input_row(self, features: dict[str, np.ndarray]) -> np.ndarray:
        parts = []
        for _, modality, is_mask in self.inputs:
            present = modality in features
            if is_mask:
                parts.append(np.array([1.0 if present else 0.0], dtype=np.float32))
            else:
                parts.append(np.asarray(features[modality], dtype=np.float32) if present else np.zeros(self.modality_dims[modality], dtype=np.float32))
        return np.concatenate(parts)


def profile_cosines(features: np.ndarray, present: np.ndarray, history: list[list[int]]) -> list[float | None]:
    """The user-profile cosine of every item as the exporter writes it (``training.data.user_profile``), by loops
    over the histories, rounded to 2 decimals so that some items tie: cos(x̂_i, Σ over the item's users, Σ over
    their other items j with the modality, x̂_j), x̂ centred over the items that have it and L2-normalised; None where
    the item lacks the modality or the sum is zero."""
    x = features.astype(np.float64) - features[present].mean(axis=0)
    x = np.where(present[:, None], x / np.linalg.norm(x, axis=1, keepdims=True), 0.0)
    out: list[float | None] = []
    for i in range(len(features)):
        p = np.zeros(features.shape[1])
        for items in history:
            if i in items:
                p += sum((x[j] for j in items if j != i), np.zeros(features.shape[1]))
        norm = float(np.linalg.norm(p))
        out.append(round(float(x[i] @ p) / norm, 2) if present[i] and norm > 1e-12 else None)
    return out


def make_bundle(
    out: Path,
    *,
    seed: int = 0,
    n_users: int = 40,
    n_items: int = 120,
    dim: int = 16,
    feature_modalities: dict[str, int] | None = None,
    text: bool = False,
    image: bool = False,
    extra_outputs: bool = False,
    quality: bool = False,
    profile: bool = False,
    user_tower: bool = False,
    index_type: str = "flat_ip",
    model_name: str = "toy-mf",
    version: str | None = None,
    item_ids: list[str] | None = None,
    user_ids: list[str] | None = None,
) -> SyntheticBundle:
    """Write a bundle to ``out`` (created) and return it with its numpy reference."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "item_features").mkdir(exist_ok=True)
    dims = dict(feature_modalities if feature_modalities is not None else {"tags": 8, "audio": 12})
    modalities: dict[str, dict[str, Any]] = {name: {"dim": d, "encoder": None} for name, d in dims.items()}
    item_ids = list(item_ids) if item_ids is not None else [f"i{r}" for r in range(n_items)]
    user_ids = list(user_ids) if user_ids is not None else [f"u{r}" for r in range(n_users)]
    n_items, n_users = len(item_ids), len(user_ids)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 7)))) for _ in range(n_items)]
    bundle = SyntheticBundle(
        path=out, manifest={}, item_ids=item_ids, user_ids=user_ids, item_vectors=np.zeros(0), user_vectors=None,
        popularity=np.zeros(0), history=[], modality_dims=dims, inputs=[], weight=np.zeros(0), bias=np.zeros(0),
    )

    if text:
        dims["text"] = 10
        bundle.vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
        bundle.embedding = rng.normal(size=(len(bundle.vocab), dims["text"])).astype(np.float32)
        modalities["text"] = {
            "dim": dims["text"], "encoder": "toy-mean-embedding", "encoder_kind": "text", "encoder_onnx": "text_encoder.onnx",
            "tokenizer": "tokenizer.json", "max_length": bundle.text_max_length,
            "onnx_inputs": ["input_ids", "attention_mask"], "onnx_output": "sentence_embedding",
        }
        _word_level_tokenizer(bundle.vocab).save(str(out / "tokenizer.json"))
        onnx.save(_text_encoder_graph(bundle.embedding), out / "text_encoder.onnx")
    if image:
        dims["image"] = 6
        bundle.image_projection = rng.normal(size=(3, dims["image"])).astype(np.float32)
        modalities["image"] = {
            "dim": dims["image"], "encoder": "toy-gap", "encoder_kind": "image", "encoder_onnx": "image_encoder.onnx",
            "size": 8, "resize": 10, "mean": IMAGE_MEAN, "std": IMAGE_STD,
            "onnx_inputs": ["pixels"], "onnx_output": "features",
        }
        onnx.save(_image_encoder_graph(bundle.image_projection), out / "image_encoder.onnx")

    # item encoder: features then mask, per modality in manifest order. Without modalities (a pure ID model)
    # there is none, as the exporter writes it: item_encoder null.
    for name in modalities:
        bundle.inputs += [(name, name, False), (f"{name}_mask", name, True)]
    width = sum(dims[m] if not is_mask else 1 for _, m, is_mask in bundle.inputs)
    bundle.weight = (rng.normal(size=(width, dim)) / np.sqrt(max(width, 1))).astype(np.float32)
    bundle.bias = (0.1 * rng.normal(size=dim)).astype(np.float32)
    if extra_outputs:
        bundle.quality = rng.normal(size=(width, 1)).astype(np.float32)
    if quality:
        assert len(dims) == 2, "quality fields: R2MR judges exactly two modalities"
        bundle.modality_quality = {m: rng.normal(size=(d, 1)).astype(np.float32) for m, d in sorted(dims.items())}
    if modalities:
        onnx.save(_item_encoder_graph(bundle, dims), out / "item_encoder.onnx")

    # trained items: features per modality (some missing), vectors from the encoder so both agree
    features: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    for name, d in dims.items():
        if name == "text":
            features[name] = np.stack([bundle.encode_text(t) for t in texts]).astype(np.float32)
        else:
            features[name] = rng.normal(size=(n_items, d)).astype(np.float32)
        masks[name] = rng.random(n_items) < 0.8
    if dims:
        first = list(dims)[0]
        masks[first] |= ~np.any(np.stack(list(masks.values())), axis=0)  # at least one modality per item
        bundle.item_vectors = np.stack(
            [bundle.encode({m: features[m][r] for m in dims if masks[m][r]}) for r in range(n_items)]
        ).astype(np.float32)
    else:
        bundle.item_vectors = rng.normal(size=(n_items, dim)).astype(np.float32)
    for name in dims:
        np.save(out / "item_features" / f"{name}.npy", features[name] * masks[name][:, None])
        np.save(out / "item_features" / f"{name}.mask.npy", masks[name])

    bundle.history = [
        rng.choice(n_items, size=int(rng.integers(3, 9)), replace=False).tolist() for _ in range(n_users)
    ]
    indptr = np.cumsum([0] + [len(h) for h in bundle.history]).astype(np.int64)
    indices = np.array([r for h in bundle.history for r in h], dtype=np.int64)
    np.savez(out / "user_history.npz", indptr=indptr, indices=indices)
    bundle.popularity = np.bincount(indices, minlength=n_items).astype(np.float32)
    np.save(out / "popularity.npy", bundle.popularity)

    if user_tower:
        bundle.tower_length = 5
        bundle.tower_weight = (rng.normal(size=(dim, dim)) / np.sqrt(dim)).astype(np.float32)
        onnx.save(_user_tower_graph(bundle.tower_weight), out / "user_tower.onnx")
    else:
        bundle.user_vectors = rng.normal(size=(n_users, dim)).astype(np.float32)
        np.save(out / "user_vectors.npy", bundle.user_vectors)
    np.save(out / "item_vectors.npy", bundle.item_vectors)
    (out / "item_ids.json").write_text(json.dumps(item_ids))
    (out / "user_ids.json").write_text(json.dumps(user_ids))
    profiles = {m: profile_cosines(features[m], masks[m], bundle.history) for m in sorted(dims)} if profile else {}
    with (out / "item_metadata.jsonl").open("w") as fh:
        for r, (item_id, t) in enumerate(zip(item_ids, texts, strict=True)):
            quality_fields = bundle.quality_fields({m: features[m][r] for m in dims if masks[m][r]}) if quality else {}
            profile_fields = {f"profile_{m}": c[r] for m, c in profiles.items()}
            fh.write(json.dumps({"id": item_id, "text": t, "codes": [r % 4, r % 3], **quality_fields,
                                 **profile_fields}) + "\n")  # fmt: skip
    faiss.write_index(_index(bundle.item_vectors, index_type), str(out / "item_index.faiss"))

    bundle.manifest = {
        "format": "mmrec-bundle",
        "format_version": 2,
        "bundle_version": version or f"{model_name}-synthetic-seed{seed}",
        "created": "2026-01-01T00:00:00Z",
        "model": {"name": model_name, "kind": "sequential" if user_tower else "collaborative", "config": {"dim": dim}},
        "dataset": {"name": "synthetic", "split": f"seed{seed}", "n_users": n_users, "n_items": n_items},
        "dim": dim,
        "score": "inner_product",
        "index": {"type": index_type, "approximate": index_type != "flat_ip",
                  "params": {"M": 8, "efSearch": 64} if index_type == "hnsw_ip" else {}},
        "modalities": modalities,
        "item_encoder": {
            "onnx": "item_encoder.onnx",
            "method": "native",
            "inputs": [
                {"name": n, "modality": m, "mask": True} if is_mask else {"name": n, "modality": m, "dim": dims[m]}
                for n, m, is_mask in bundle.inputs
            ],
            "outputs": {"item_vector": "item_vector"},
            "extra_outputs": {**({"quality_logit": "quality"} if extra_outputs else {}),
                              **{f"quality_{m}": f"quality_{m}" for m in bundle.modality_quality},
                              **({"quality_state": "quality_state"} if quality else {})},
            **({"extra_output_labels": {"quality_state": list(QUALITY_STATES)}} if quality else {}),
        } if modalities else None,
        "user_tower": (
            {"onnx": "user_tower.onnx", "max_length": bundle.tower_length,
             "inputs": {"item_vectors": "item_vectors", "mask": "mask"}, "output": "user_vector"}
            if user_tower else None
        ),
        "fallback": {"unknown_user": "history-mean, else popularity"},
        "metrics": {"valid": {"recall@20": 0.1}, "test": {"recall@20": 0.1}, "best_epoch": 1},
        **({"profile_cosine": {"modalities": sorted(profiles), "interactions": "train"}} if profile else {}),
    }
    write_manifest(bundle.path, bundle.manifest)
    return bundle


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """(Re)write manifest.json with the sha256 of every other file of the bundle."""
    manifest["files"] = {
        f.relative_to(path).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != "manifest.json"
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))


# --- graphs --------------------------------------------------------------------------------------------------


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "synthetic", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name=name)


def _item_encoder_graph(bundle: SyntheticBundle, dims: dict[str, int]) -> onnx.ModelProto:
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 1 if is_mask else dims[m]])
        for n, m, is_mask in bundle.inputs
    ]
    nodes = [
        helper.make_node("Concat", [n for n, _, _ in bundle.inputs], ["x"], axis=1),
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["item_vector"]),
    ]
    outputs = [helper.make_tensor_value_info("item_vector", TensorProto.FLOAT, ["N", bundle.weight.shape[1]])]
    initializers = [_const("W", bundle.weight), _const("b", bundle.bias)]
    if bundle.quality is not None:
        nodes.append(helper.make_node("MatMul", ["x", "Q"], ["quality_logit"]))
        outputs.append(helper.make_tensor_value_info("quality_logit", TensorProto.FLOAT, ["N", 1]))
        initializers.append(_const("Q", bundle.quality))
    if bundle.modality_quality:
        good = []
        for m, weights in bundle.modality_quality.items():
            nodes += [
                helper.make_node("MatMul", [m, f"Q_{m}"], [f"logit_{m}"]),  # (N, 1)
                helper.make_node("Sigmoid", [f"logit_{m}"], [f"sigmoid_{m}"]),
                helper.make_node("Mul", [f"sigmoid_{m}", f"{m}_mask"], [f"masked_{m}"]),
                helper.make_node("Squeeze", [f"masked_{m}", "axis_1"], [f"quality_{m}"]),  # (N,)
                helper.make_node("GreaterOrEqual", [f"quality_{m}", "eta"], [f"good_{m}"]),
                helper.make_node("Cast", [f"good_{m}"], [f"good_int_{m}"], to=TensorProto.INT64),
            ]
            outputs.append(helper.make_tensor_value_info(f"quality_{m}", TensorProto.FLOAT, ["N"]))
            initializers.append(_const(f"Q_{m}", weights))
            good.append(f"good_int_{m}")
        nodes += [helper.make_node("Add", good, ["n_good"]), helper.make_node("Sub", ["two", "n_good"], ["quality_state"])]
        outputs.append(helper.make_tensor_value_info("quality_state", TensorProto.INT64, ["N"]))
        initializers += [_const("axis_1", np.array([1], dtype=np.int64)), _const("eta", np.array(0.5, dtype=np.float32)),
                         _const("two", np.array(2, dtype=np.int64))]  # fmt: skip
    return _model(nodes, inputs, outputs, initializers)


def _masked_mean(values: str, mask: str, out: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes for ``out = sum_L(values * mask) / max(sum_L(mask), 1)``: values (N, L, d), mask float (N, L)."""
    nodes = [
        helper.make_node("Unsqueeze", [mask, "axis2"], ["mask3"]),  # (N, L, 1)
        helper.make_node("Mul", [values, "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),  # (N, d)
        helper.make_node("ReduceSum", [mask, "axis1"], ["count"], keepdims=1),  # (N, 1)
        helper.make_node("Max", ["count", "one"], ["safe_count"]),
        helper.make_node("Div", ["summed", "safe_count"], [out]),
    ]
    constants = [
        _const("axis1", np.array([1], dtype=np.int64)),
        _const("axis2", np.array([2], dtype=np.int64)),
        _const("one", np.array(1.0, dtype=np.float32)),
    ]
    return nodes, constants


def _text_encoder_graph(embedding: np.ndarray) -> onnx.ModelProto:
    pooling, constants = _masked_mean("tokens", "mask", "sentence_embedding")
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["tokens"], axis=0),  # (N, L, d)
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),  # (N, L)
        *pooling,
    ]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "L"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "L"]),
    ]
    outputs = [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["N", embedding.shape[1]])]
    return _model(nodes, inputs, outputs, [_const("E", embedding), *constants])


def _image_encoder_graph(projection: np.ndarray) -> onnx.ModelProto:
    nodes = [
        helper.make_node("ReduceMean", ["pixels"], ["pooled"], axes=[2, 3], keepdims=0),  # (N, 3)
        helper.make_node("MatMul", ["pooled", "P"], ["features"]),
    ]
    inputs = [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, "H", "W"])]
    outputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", projection.shape[1]])]
    return _model(nodes, inputs, outputs, [_const("P", projection)])


def _user_tower_graph(weight: np.ndarray) -> onnx.ModelProto:
    pooling, constants = _masked_mean("item_vectors", "mask", "mean")  # (B, dim)
    nodes = [*pooling, helper.make_node("MatMul", ["mean", "T"], ["user_vector"])]
    inputs = [
        helper.make_tensor_value_info("item_vectors", TensorProto.FLOAT, ["B", "L", weight.shape[0]]),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", "L"]),
    ]
    outputs = [helper.make_tensor_value_info("user_vector", TensorProto.FLOAT, ["B", weight.shape[1]])]
    return _model(nodes, inputs, outputs, [_const("T", weight), *constants])


def _word_level_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def _index(vectors: np.ndarray, index_type: str) -> faiss.Index:
    dim = vectors.shape[1]
    if index_type == "flat_ip":
        inner = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw_ip":
        inner = faiss.IndexHNSWFlat(dim, 8, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown index type {index_type}")
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    return index
