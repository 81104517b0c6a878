"""Turn an item's content into its vector: text through the tokenizer and text ONNX graph, images through the
bundle's preprocessing and image ONNX graph, then all modality features through the item encoder graph.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tokenizers import Tokenizer

from service.bundle import Bundle, BundleError, ImageSpec, TextSpec
from service.errors import InvalidInput

MAX_IMAGE_PIXELS = 40_000_000  # refuse larger images before decoding them (decompression bombs)
MAX_VECTOR_NORM = 1e12  # item vectors beyond this are surely a client bug, and would overflow float32 scores


@dataclass(frozen=True)
class ItemContent:
    """What a client sent for one item, before encoding."""

    text: str | None = None
    image_base64: str | None = None
    features: Mapping[str, Sequence[float]] | None = None


@dataclass(frozen=True)
class EncodedItem:
    features: dict[str, np.ndarray]  # modality -> (d_m,) float32, present modalities only
    vector: np.ndarray  # (dim,) float32
    extra: dict[str, Any]  # extra_outputs of the item encoder, by response field


# --- images --------------------------------------------------------------------------------------------------


def decode_image(image_base64: str) -> Image.Image:
    """Base64 (optionally a ``data:`` URL) -> a decoded PIL image; :class:`InvalidInput` when unreadable."""
    payload = image_base64.split(",", 1)[1] if image_base64.startswith("data:") else image_base64
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"image_base64: not valid base64 ({exc})") from exc
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise InvalidInput(f"image_base64: image is {width}x{height}, more than {MAX_IMAGE_PIXELS} pixels")
        image.load()
    except InvalidInput:
        raise
    except UnidentifiedImageError as exc:
        raise InvalidInput("image_base64: not a readable image (unknown or unsupported image format)") from exc
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"image_base64: not a readable image ({exc})") from exc
    return image


def preprocess_image(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """The bundle's image recipe (docs/bundle-format.md), as training applies it: RGB; bilinear resize so the
    shorter side is ``resize`` and the longer ``long * resize // short``; centre crop ``size`` at
    ``((width - size) // 2, (height - size) // 2)``; ``/ 255``; ``(x - mean) / std`` in float32; HWC -> CHW.

    Returns float32 (3, size, size).
    """
    image = image.convert("RGB")
    width, height = image.size
    if width <= height:
        new_w, new_h = spec.resize, height * spec.resize // width
    else:
        new_w, new_h = width * spec.resize // height, spec.resize
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - spec.size) // 2, (new_h - spec.size) // 2
    image = image.crop((left, top, left + spec.size, top + spec.size))
    scaled = np.asarray(image, dtype=np.float32) / np.float32(255.0)  # (H, W, 3) in [0, 1]
    normalised = (scaled - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)  # (3, H, W)


def encode_images(spec: ImageSpec, images: Sequence[Image.Image]) -> np.ndarray:
    batch = np.stack([preprocess_image(image, spec) for image in images])  # (N, 3, size, size)
    features = spec.session.run([spec.output_name], {spec.input_name: batch})[0]
    return np.asarray(features, dtype=np.float32).reshape(len(images), -1)


# --- text ----------------------------------------------------------------------------------------------------


class TextEncoder:
    """Tokenise (truncating to ``max_length``; padding as the tokenizer file says, else to the longest text) and
    run the sentence-embedding graph."""

    def __init__(self, spec: TextSpec) -> None:
        self.spec = spec
        # A private copy: truncation is tokenizer state, and the bundle's tokenizer may be shared.
        self.tokenizer = Tokenizer.from_str(spec.tokenizer.to_str())
        self.tokenizer.enable_truncation(spec.max_length)
        padding = self.tokenizer.padding
        self.pad_id = int(padding["pad_id"]) if padding else 0
        types = {i.name: i.type for i in spec.session.get_inputs()}
        self.dtypes = {name: np.int32 if types.get(name) == "tensor(int32)" else np.int64 for name in spec.input_names}
        unknown = [n for n in spec.input_names if n not in ("input_ids", "attention_mask", "token_type_ids")]
        if unknown:
            raise BundleError(f"text encoder input {unknown[0]!r} is not one of input_ids, attention_mask, token_type_ids")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(list(texts))
        length = max(1, max(len(e.ids) for e in encodings))
        arrays = {
            "input_ids": np.full((len(texts), length), self.pad_id, dtype=np.int64),
            "attention_mask": np.zeros((len(texts), length), dtype=np.int64),
            "token_type_ids": np.zeros((len(texts), length), dtype=np.int64),
        }
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            arrays["input_ids"][row, :n] = enc.ids
            arrays["attention_mask"][row, :n] = enc.attention_mask
            arrays["token_type_ids"][row, :n] = enc.type_ids
        feeds = {name: arrays[name].astype(self.dtypes[name]) for name in self.spec.input_names}
        output = self.spec.session.run([self.spec.output_name], feeds)[0]
        return np.asarray(output, dtype=np.float32).reshape(len(texts), -1)


# --- the item encoder ----------------------------------------------------------------------------------------


class ItemEncoder:
    """Content -> item vector in the bundle's space, per the manifest's ``item_encoder`` (docs/bundle-format.md)."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.spec = bundle.item_encoder
        text, image = bundle.text_modality, bundle.image_modality
        self.text_modality = text.name if text else None
        self.image_modality = image.name if image else None
        self.text_encoder = TextEncoder(text.text) if text and text.text else None
        self._self_check()

    def encode(self, contents: Sequence[ItemContent]) -> list[EncodedItem]:
        """Validate and encode a batch; :class:`InvalidInput` names the item (by position) and the problem."""
        if self.spec is None:
            raise InvalidInput(
                f"bundle {self.bundle.version} has no item encoder (model trained without content features): "
                "it cannot ingest new items"
            )
        features = [self._given_features(c, position=i, batch=len(contents)) for i, c in enumerate(contents)]
        self._encode_texts(contents, features)
        self._encode_images(contents, features)
        for i, f in enumerate(features):
            if not f:
                raise InvalidInput(f"{_where(i, len(contents))}item has no content: give text, image_base64 or features")
        vectors, extras = self.run(features)
        for i, vector in enumerate(vectors):
            if not np.isfinite(vector).all() or float(np.linalg.norm(vector)) > MAX_VECTOR_NORM:
                raise InvalidInput(f"{_where(i, len(contents))}features give a non-finite or huge item vector")
        return [EncodedItem(features=f, vector=v, extra=e) for f, v, e in zip(features, vectors, extras, strict=True)]

    def run(self, features: Sequence[Mapping[str, np.ndarray]]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Run the item encoder graph: missing modalities are zeros with mask 0. Returns (N, dim) and extras."""
        if self.spec is None:
            raise InvalidInput(f"bundle {self.bundle.version} has no item encoder")
        n = len(features)
        feeds: dict[str, np.ndarray] = {}
        for inp in self.spec.inputs:
            if inp.mask:
                feeds[inp.name] = np.array([[1.0 if inp.modality in f else 0.0] for f in features], dtype=np.float32)
            else:
                dim = self.bundle.modalities[inp.modality].dim
                zeros = np.zeros(dim, dtype=np.float32)
                feeds[inp.name] = np.stack([f.get(inp.modality, zeros) for f in features]).astype(np.float32)
        names = [self.spec.vector_output, *self.spec.extra_outputs]
        outputs = self.spec.session.run(names, feeds)
        vectors = np.asarray(outputs[0], dtype=np.float32).reshape(n, -1)
        extras: list[dict[str, Any]] = [{} for _ in range(n)]
        for (name, field), out in zip(self.spec.extra_outputs.items(), outputs[1:], strict=True):
            labels = self.spec.extra_output_labels.get(name)
            for i in range(n):
                value = _json_safe(np.asarray(out)[i])
                extras[i][field] = _label(value, labels, name) if labels is not None else value
        return vectors, extras

    def _given_features(self, content: ItemContent, *, position: int, batch: int) -> dict[str, np.ndarray]:
        where = _where(position, batch)
        features: dict[str, np.ndarray] = {}
        for modality, values in (content.features or {}).items():
            if modality not in self.bundle.modalities:
                known = ", ".join(sorted(self.bundle.modalities)) or "none"
                raise InvalidInput(f"{where}features.{modality}: unknown modality (this bundle has: {known})")
            expected = self.bundle.modalities[modality].dim
            if len(values) != expected:
                raise InvalidInput(f"{where}features.{modality}: {len(values)} values, expected {expected}")
            array = np.asarray(values, dtype=np.float64)
            if not np.isfinite(array).all() or np.abs(array).max(initial=0.0) > 1e30:
                raise InvalidInput(f"{where}features.{modality}: values must be finite and below 1e30 in magnitude")
            features[modality] = array.astype(np.float32)
        if content.text is not None and self.text_modality is None:
            raise InvalidInput(f"{where}text: this bundle has no text encoder; send features instead")
        if content.text is not None and self.text_modality in features:
            raise InvalidInput(f"{where}give either text or features.{self.text_modality}, not both")
        if content.image_base64 is not None and self.image_modality is None:
            raise InvalidInput(f"{where}image_base64: this bundle has no image encoder; send features instead")
        if content.image_base64 is not None and self.image_modality in features:
            raise InvalidInput(f"{where}give either image_base64 or features.{self.image_modality}, not both")
        return features

    def _encode_texts(self, contents: Sequence[ItemContent], features: list[dict[str, np.ndarray]]) -> None:
        rows = [i for i, c in enumerate(contents) if c.text is not None]
        if not rows or self.text_encoder is None or self.text_modality is None:
            return
        encoded = self.text_encoder.encode([contents[i].text or "" for i in rows])
        for i, vector in zip(rows, encoded, strict=True):
            features[i][self.text_modality] = vector

    def _encode_images(self, contents: Sequence[ItemContent], features: list[dict[str, np.ndarray]]) -> None:
        image = self.bundle.image_modality
        rows = [i for i, c in enumerate(contents) if c.image_base64 is not None]
        if not rows or image is None or image.image is None:
            return
        images = []
        for i in rows:
            try:
                images.append(decode_image(contents[i].image_base64 or ""))
            except InvalidInput as exc:
                raise InvalidInput(_where(i, len(contents)) + exc.message) from exc
        for i, vector in zip(rows, encode_images(image.image, images), strict=True):
            features[i][image.name] = vector

    def _self_check(self) -> None:
        """Run each graph once on dummy input so a bundle with wrong output shapes fails at load, not per request."""
        probe: dict[str, np.ndarray] = {}
        for modality in self.bundle.modalities.values():
            if modality.text is not None and self.text_encoder is not None:
                probe[modality.name] = self.text_encoder.encode(["probe"])[0]
            elif modality.image is not None:
                blank = Image.new("RGB", (modality.image.resize, modality.image.resize))
                probe[modality.name] = encode_images(modality.image, [blank])[0]
            else:
                probe[modality.name] = np.zeros(modality.dim, dtype=np.float32)
            if probe[modality.name].shape != (modality.dim,):
                raise BundleError(
                    f"modality {modality.name}: encoder gives {probe[modality.name].shape[0]} values, manifest says {modality.dim}"
                )
        if self.spec is None:
            return
        vectors, _ = self.run([probe])
        if vectors.shape != (1, self.bundle.dim):
            raise BundleError(f"item encoder: output {self.spec.vector_output} has shape {vectors.shape}, expected (N, {self.bundle.dim})")


def _where(position: int, batch: int) -> str:
    return f"items[{position}]: " if batch > 1 else ""


def _json_safe(value: np.ndarray) -> Any:
    """numpy -> JSON values; non-finite floats -> None (JSON has no NaN)."""
    if value.ndim:
        return [_json_safe(v) for v in value]
    item = value.item()
    return None if isinstance(item, float) and not math.isfinite(item) else item


def _label(code: Any, labels: Sequence[str], output: str) -> str:
    """The label of an integer category code the item encoder output (R2MR's quality_state)."""
    if not isinstance(code, int) or not 0 <= code < len(labels):
        raise BundleError(f"item encoder output {output!r} gave {code!r}, not a code of {list(labels)}")
    return labels[code]
