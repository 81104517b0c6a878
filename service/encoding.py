"""Turn an item's content into its vector: text through the tokenizer and text ONNX graph, images through the
bundle's preprocessing and image ONNX graph, then all modality features through the item encoder graph.

What one request may cost is bounded (:class:`EncodingLimits`, the limits group of ``ServiceSettings``): texts are
measured in characters, then in tokens; images from their header, before any pixel is decoded. Both run through
onnxruntime in chunks of ``encode_chunk_size``, and each image is decoded, reduced and released one at a time; at
most ``max_concurrent_encodes`` requests do so at once (with batching: tokenise at once, and decode at once images of
at most ``max_concurrent_encodes * max_image_pixels`` pixels together).

With ``encode_batch_max_wait_ms > 0`` the encoder runs of concurrent requests are batched (service/microbatching.py):
one thread per model runs what the requests handed it, so the text and image encoders of different requests run
side by side on the cores while the request threads tokenise and decode.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import functools
import io
import math
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image, UnidentifiedImageError
from tokenizers import Encoding, Tokenizer

from service.bundle import Bundle, BundleError, ImageSpec, TextSpec, shrinking_run_options
from service.errors import InvalidInput, RequestTooLarge
from service.microbatching import MicroBatcher
from service.settings import ServiceSettings

# Only these decoders ever see client bytes: Pillow would otherwise hand EPS to Ghostscript, among other plugins.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
MAX_VECTOR_NORM = 1e12  # item vectors beyond this are surely a client bug, and would overflow float32 scores
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombWarning)
# Runs at most this large leave onnxruntime's arena as it is; larger ones shrink it afterwards (shrinking_run_options).
# Shrinking after every run made a run of 4 posters cost 13 ms of CPU an image instead of 10 (the next run faults its
# memory in again); what a run this size keeps is ~25 MB (2 images, EfficientNet-Lite0) or ~45 MB (MiniLM, 512 tokens).
ARENA_KEEP_IMAGES = 2
ARENA_KEEP_TOKENS = 512
TRIM_ABOVE_PIXELS = 1_000_000  # requests over this many image pixels or text characters give free heap pages back
TRIM_ABOVE_CHARS = 20_000
TEXT_LENGTH_SLACK = 1.25  # a text chunk's longest text has at most 1.25x the tokens of its shortest, plus 8


@dataclass(frozen=True)
class EncodingLimits:
    """What one request may cost; the fields are the settings of the same names (``ServiceSettings``)."""

    max_text_chars: int
    max_request_text_chars: int
    max_request_tokens: int
    max_image_side: int
    max_image_aspect_ratio: float
    max_image_pixels: int
    max_request_pixels: int
    max_request_images: int
    encode_chunk_size: int
    max_concurrent_encodes: int

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> EncodingLimits:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


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


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another libc, another OS)."""
    if not sys.platform.startswith("linux"):
        return None
    trim: Callable[[int], int] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)
    return trim


def release_free_memory() -> None:
    """Give the C heap's free pages back to the OS. After a large request, glibc keeps what the tokenizer, Pillow
    and numpy freed (measured: 20-130 MB after the worst allowed requests, none of it in use); ``malloc_trim(0)``
    returns it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _chunks(count: int, size: int) -> Iterator[range]:
    for start in range(0, count, size):
        yield range(start, min(start + size, count))


# --- images --------------------------------------------------------------------------------------------------


def open_image(image_base64: str, limits: EncodingLimits) -> Image.Image:
    """Base64 (optionally a ``data:`` URL) -> an opened image whose header passed the per-image limits; its pixels
    are not decoded yet (:func:`image_pixels` does that). :class:`InvalidInput` when unreadable or too large."""
    payload = image_base64.split(",", 1)[1] if image_base64.startswith("data:") else image_base64
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"image_base64: not valid base64 ({exc})") from exc
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError as exc:
        raise InvalidInput("image_base64: not a readable image (accepted formats: JPEG, PNG, WebP, GIF)") from exc
    except Image.DecompressionBombError as exc:  # Pillow's own bound (2 x Image.MAX_IMAGE_PIXELS), checked at open
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{found.group(1)} pixels" if found else "too many pixels"
        raise InvalidInput(f"image_base64: image is {pixels}, above max_image_pixels={limits.max_image_pixels}") from exc
    except _PIL_ERRORS as exc:
        raise InvalidInput(f"image_base64: not a readable image ({exc})") from exc
    _check_image_size(*image.size, limits)
    return image


def _check_image_size(width: int, height: int, limits: EncodingLimits) -> None:
    size = f"image_base64: {width}x{height}"
    if min(width, height) < 1:
        raise InvalidInput(f"{size} is not a readable image (empty)")
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_image_aspect_ratio:
        shown = f"{ratio:.0f}" if ratio >= 100 or ratio.is_integer() else f"{ratio:.1f}"
        raise InvalidInput(f"{size} has aspect ratio {shown}:1, above max_image_aspect_ratio={limits.max_image_aspect_ratio:g}")
    if max(width, height) > limits.max_image_side:
        raise InvalidInput(f"{size} has a side of {max(width, height)} pixels, above max_image_side={limits.max_image_side}")
    if width * height > limits.max_image_pixels:
        raise InvalidInput(f"{size} is {width * height} pixels, above max_image_pixels={limits.max_image_pixels}")


def image_pixels(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Decode an opened image and apply the bundle's recipe (:func:`preprocess_image`), then release it.

    A JPEG at least twice the size the recipe needs is decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``, DCT
    scaling, its shorter side staying at least ``resize``), so its full-size pixels never exist; smaller images,
    like the posters the models are trained on, follow the training recipe exactly. Returns float32 (3, size, size).
    """
    try:
        width, height = image.size
        if image.format == "JPEG":
            short = min(width, height)
            image.draft("RGB", (math.ceil(width * spec.resize / short), math.ceil(height * spec.resize / short)))
        image.load()
        return preprocess_image(image, spec)
    except _PIL_ERRORS as exc:
        raise InvalidInput(f"image_base64: not a readable image ({exc})") from exc
    finally:
        image.close()  # frees the decoded pixels now, not when the request's objects are collected


def preprocess_image(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """The bundle's image recipe (docs/bundle-format.md), as training applies it: RGB; bilinear resize so the
    shorter side is ``resize`` and the longer ``long * resize // short``; centre crop ``size`` at
    ``((width - size) // 2, (height - size) // 2)``; ``/ 255``; ``(x - mean) / std`` in float32; HWC -> CHW.

    Returns float32 (3, size, size).
    """
    width, height = image.size
    if width <= height:
        new_w, new_h = spec.resize, height * spec.resize // width
    else:
        new_w, new_h = width * spec.resize // height, spec.resize
    resized = _resized_rgb(image, (new_w, new_h))
    left, top = (new_w - spec.size) // 2, (new_h - spec.size) // 2
    cropped = resized.crop((left, top, left + spec.size, top + spec.size))
    scaled = np.asarray(cropped, dtype=np.float32) / np.float32(255.0)  # (H, W, 3) in [0, 1]
    normalised = (scaled - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)  # (3, H, W)


def _resized_rgb(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image.convert("RGB").resize(size, BILINEAR)``, pixel for pixel, without a full-size RGB copy: Pillow
    resamples each 8-bit band alone with the same weights, so RGB bands of an RGBA image (what convert keeps) and
    the grey band of an L image (which convert repeats) can be resized first (tests/service/test_service_limits.py)."""
    bilinear = Image.Resampling.BILINEAR
    if image.mode == "RGB":
        return image.resize(size, bilinear)
    if image.mode in ("RGBA", "RGBX"):
        return Image.merge("RGB", [image.getchannel(band).resize(size, bilinear) for band in "RGB"])
    if image.mode in ("L", "LA"):
        return image.getchannel("L").resize(size, bilinear).convert("RGB")
    return image.convert("RGB").resize(size, bilinear)  # palette, CMYK, 1-bit, 16/32-bit: convert's own rules


class ImageEncoder:
    """Opened images -> features, ``chunk_size`` images per onnxruntime run, each decoded only for its chunk."""

    def __init__(self, spec: ImageSpec, *, chunk_size: int) -> None:
        self.spec = spec
        self.chunk_size = chunk_size
        self.run_options = shrinking_run_options()
        self.keep_options = ort.RunOptions()

    def encode(self, images: Sequence[Image.Image], *, prefixes: Sequence[str] | None = None) -> np.ndarray:
        """Returns float32 (N, d). An image that does not decode raises :class:`InvalidInput`, its message
        starting with ``prefixes[i]`` (where the caller has it: ``items[3]: ``)."""
        out: list[np.ndarray] = []
        for chunk in _chunks(len(images), self.chunk_size):
            batch = np.stack([self.pixels(images[i], prefixes[i] if prefixes else "") for i in chunk])  # (n, 3, S, S)
            out.append(self.run(batch))
        return np.concatenate(out)

    def run(self, pixels: np.ndarray) -> np.ndarray:
        options = self.run_options if len(pixels) > ARENA_KEEP_IMAGES else self.keep_options
        features = self.spec.session.run([self.spec.output_name], {self.spec.input_name: pixels}, options)[0]
        return np.asarray(features, dtype=np.float32).reshape(len(pixels), -1)

    def run_pixels(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Preprocessed images, each (3, S, S), in chunks of ``chunk_size``: float32 (N, d)."""
        return np.concatenate([self.run(np.stack([pixels[i] for i in chunk])) for chunk in _chunks(len(pixels), self.chunk_size)])

    def pixels(self, image: Image.Image, prefix: str) -> np.ndarray:
        """Decode and preprocess one opened image (:func:`image_pixels`); a failure's message starts with ``prefix``."""
        try:
            return image_pixels(image, self.spec)
        except InvalidInput as exc:
            raise InvalidInput(prefix + exc.message) from exc


class PixelBudget:
    """Images decoded at once, bounded by their pixels: an image waits while the images being decoded and it would
    go over ``budget`` (one image alone always may). Posters decode side by side; the largest allowed images one at
    a time, so decoding never holds more than ``budget`` pixels."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self.used == 0 or self.used + pixels <= self.budget)
            self.used += pixels
        try:
            yield
        finally:
            with self._changed:
                self.used -= pixels
                self._changed.notify_all()


# --- text ----------------------------------------------------------------------------------------------------


class TextEncoder:
    """Tokenise (truncating to ``max_length``), then run the sentence-embedding graph chunk by chunk (at most
    ``chunk_size * max_length`` padded tokens a run), texts of similar length together, each chunk padded to its
    longest text."""

    def __init__(self, spec: TextSpec, *, chunk_size: int) -> None:
        self.spec = spec
        self.chunk_size = chunk_size
        self.run_options = shrinking_run_options()
        self.keep_options = ort.RunOptions()
        # A private copy: truncation and padding are tokenizer state, and the bundle's tokenizer may be shared.
        self.tokenizer = Tokenizer.from_str(spec.tokenizer.to_str())
        self.tokenizer.enable_truncation(spec.max_length)
        padding = self.tokenizer.padding
        self.pad_id = int(padding["pad_id"]) if padding else 0
        self.tokenizer.no_padding()  # each chunk is padded here, to its own longest text
        types = {i.name: i.type for i in spec.session.get_inputs()}
        self.dtypes = {name: np.int32 if types.get(name) == "tensor(int32)" else np.int64 for name in spec.input_names}
        unknown = [n for n in spec.input_names if n not in ("input_ids", "attention_mask", "token_type_ids")]
        if unknown:
            raise BundleError(f"text encoder input {unknown[0]!r} is not one of input_ids, attention_mask, token_type_ids")

    def tokenize(self, texts: Sequence[str]) -> list[Encoding]:
        """Token ids of each text, truncated to ``max_length``: ``len(encoding.ids)`` is what the graph runs on."""
        return list(self.tokenizer.encode_batch(list(texts)))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.run(self.tokenize(texts))

    def run(self, encodings: Sequence[Encoding]) -> np.ndarray:
        """Returns float32 (N, d) in the order of ``encodings``."""
        out: np.ndarray | None = None
        for rows in self._chunks(encodings):
            vectors = self._run_chunk([encodings[r] for r in rows])
            if out is None:
                out = np.empty((len(encodings), vectors.shape[1]), dtype=np.float32)
            out[rows] = vectors
        assert out is not None, "run() needs at least one text"
        return out

    def _chunks(self, encodings: Sequence[Encoding]) -> Iterator[list[int]]:
        """Rows by increasing length, a chunk holding at most the padded tokens of ``chunk_size`` full-length texts
        (``chunk_size * max_length``): many short texts share a run, long ones take ``chunk_size`` each. Texts of
        similar length only (``TEXT_LENGTH_SLACK``): padding a chunk to its longest text costs its shorter ones."""
        budget = self.chunk_size * self.spec.max_length
        chunk: list[int] = []
        for row in sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids)):
            length = max(1, len(encodings[row].ids))
            shortest = max(1, len(encodings[chunk[0]].ids)) if chunk else length
            if chunk and ((len(chunk) + 1) * length > budget or length > TEXT_LENGTH_SLACK * shortest + 8):
                yield chunk
                chunk = []
            chunk.append(row)
        if chunk:
            yield chunk

    def _run_chunk(self, encodings: Sequence[Encoding]) -> np.ndarray:
        length = max(1, max(len(e.ids) for e in encodings))
        arrays = {
            "input_ids": np.full((len(encodings), length), self.pad_id, dtype=np.int64),
            "attention_mask": np.zeros((len(encodings), length), dtype=np.int64),
            "token_type_ids": np.zeros((len(encodings), length), dtype=np.int64),
        }
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            arrays["input_ids"][row, :n] = enc.ids
            arrays["attention_mask"][row, :n] = enc.attention_mask
            arrays["token_type_ids"][row, :n] = enc.type_ids
        feeds = {name: arrays[name].astype(self.dtypes[name]) for name in self.spec.input_names}
        options = self.run_options if len(encodings) * length > ARENA_KEEP_TOKENS else self.keep_options
        output = self.spec.session.run([self.spec.output_name], feeds, options)[0]
        return np.asarray(output, dtype=np.float32).reshape(len(encodings), -1)


# --- the item encoder ----------------------------------------------------------------------------------------


class ItemEncoder:
    """Content -> item vector in the bundle's space, per the manifest's ``item_encoder`` (docs/bundle-format.md)."""

    def __init__(self, bundle: Bundle, *, limits: EncodingLimits, batch_max_wait_ms: float = 0.0,
                 batch_max_items: int = 32, batch_workers: int = 2) -> None:  # fmt: skip
        """``batch_max_wait_ms > 0``: the encoder runs of concurrent requests are batched (:mod:`service.microbatching`),
        gathered for at most that long, up to ``batch_max_items`` rows a batch (each batch still runs in chunks of
        ``encode_chunk_size``), ``batch_workers`` batches of each model at once; 0: every request runs its own."""
        self.bundle = bundle
        self.limits = limits
        self.spec = bundle.item_encoder
        self.run_options = shrinking_run_options()
        # Unbatched: held while tokenising, decoding and encoding. Batched: held while tokenising, while images are
        # decoded within a pixel budget of as many full-size images (a batcher runs one batch at a time).
        self.encoding = threading.BoundedSemaphore(limits.max_concurrent_encodes)
        self.decoding = PixelBudget(limits.max_concurrent_encodes * limits.max_image_pixels)
        text, image = bundle.text_modality, bundle.image_modality
        self.text_modality = text.name if text else None
        self.image_modality = image.name if image else None
        chunk = limits.encode_chunk_size
        self.text_encoder = TextEncoder(text.text, chunk_size=chunk) if text and text.text else None
        self.image_encoder = ImageEncoder(image.image, chunk_size=chunk) if image and image.image else None
        self.batched = batch_max_wait_ms > 0
        wait, rows, workers = batch_max_wait_ms, batch_max_items, batch_workers
        text_encoder, image_encoder = self.text_encoder, self.image_encoder
        self.text_batcher: MicroBatcher[Encoding, np.ndarray] | None = None
        self.image_batcher: MicroBatcher[np.ndarray, np.ndarray] | None = None
        if text_encoder is not None:
            self.text_batcher = MicroBatcher(lambda e: list(text_encoder.run(e)), name="text", max_wait_ms=wait,
                                             max_rows=rows, workers=workers)  # fmt: skip
        if image_encoder is not None:
            self.image_batcher = MicroBatcher(lambda p: list(image_encoder.run_pixels(p)), name="image",
                                              max_wait_ms=wait, max_rows=rows, workers=workers)  # fmt: skip
        self.item_batcher: MicroBatcher[Mapping[str, np.ndarray], tuple[np.ndarray, dict[str, Any]]] = MicroBatcher(
            self._run_rows, name="item", max_wait_ms=wait, max_rows=rows, workers=workers)  # fmt: skip
        self._self_check()

    def encode(self, contents: Sequence[ItemContent]) -> list[EncodedItem]:
        """Validate and encode a batch; :class:`InvalidInput` (422) names the item (by position) and the problem,
        :class:`RequestTooLarge` (413) the request-wide limit. Every check that needs no decoding or tokenising
        runs before any of it; then at most ``max_concurrent_encodes`` requests tokenise, decode and encode at once.
        Nothing is encoded before the text limits have passed."""
        if self.spec is None:
            raise InvalidInput(
                f"bundle {self.bundle.version} has no item encoder (model trained without content features): "
                "it cannot ingest new items"
            )
        features = [self._given_features(c, position=i, batch=len(contents)) for i, c in enumerate(contents)]
        for i, (content, given) in enumerate(zip(contents, features, strict=True)):
            if not given and content.text is None and content.image_base64 is None:
                raise InvalidInput(f"{_where(i, len(contents))}item has no content: give text, image_base64 or features")
        text_rows = self._check_texts(contents)
        image_rows, images = self._open_images(contents)
        pixels = sum(image.size[0] * image.size[1] for image in images)
        chars = sum(len(contents[i].text or "") for i in text_rows)
        with _releasing_memory(pixels > TRIM_ABOVE_PIXELS or chars > TRIM_ABOVE_CHARS):
            if self.batched:
                self._encode_batched(contents, features, text_rows, image_rows, images)
            else:
                with self.encoding:
                    self._encode_alone(contents, features, text_rows, image_rows, images)
        outputs = self.item_batcher.run(features)
        for i, (vector, _) in enumerate(outputs):
            if not np.isfinite(vector).all() or float(np.linalg.norm(vector.astype(np.float64))) > MAX_VECTOR_NORM:
                raise InvalidInput(f"{_where(i, len(contents))}features give a non-finite or huge item vector")
        return [EncodedItem(features=f, vector=v, extra=e) for f, (v, e) in zip(features, outputs, strict=True)]

    def _encode_alone(self, contents: Sequence[ItemContent], features: list[dict[str, np.ndarray]], text_rows: list[int],
                      image_rows: list[int], images: list[Image.Image]) -> None:  # fmt: skip
        """This request's texts and images through their encoders, on this thread."""
        if text_rows and self.text_encoder is not None and self.text_modality is not None:
            encodings = self._tokenize([contents[i].text or "" for i in text_rows])
            for i, vector in zip(text_rows, self.text_encoder.run(encodings), strict=True):
                features[i][self.text_modality] = vector
        if images and self.image_encoder is not None and self.image_modality is not None:
            encoded = self.image_encoder.encode(images, prefixes=[_where(i, len(contents)) for i in image_rows])
            for i, vector in zip(image_rows, encoded, strict=True):
                features[i][self.image_modality] = vector

    def _encode_batched(self, contents: Sequence[ItemContent], features: list[dict[str, np.ndarray]], text_rows: list[int],
                        image_rows: list[int], images: list[Image.Image]) -> None:  # fmt: skip
        """The same through the batchers: the texts are handed over first, then the images chunk by chunk as they
        are decoded (so a request holds at most ``encode_chunk_size`` decoded images), both modalities encoding at
        once with other requests' rows."""
        text_vectors: Future[Sequence[np.ndarray]] | None = None
        if text_rows and self.text_batcher is not None and self.text_modality is not None:
            with self.encoding:
                encodings = self._tokenize([contents[i].text or "" for i in text_rows])
            text_vectors = self.text_batcher.submit(encodings)
        if images and self.image_encoder is not None and self.image_batcher is not None and self.image_modality is not None:
            for chunk in _chunks(len(images), self.limits.encode_chunk_size):
                pixels = []
                for n in chunk:
                    with self.decoding.hold(images[n].size[0] * images[n].size[1]):
                        pixels.append(self.image_encoder.pixels(images[n], _where(image_rows[n], len(contents))))
                for n, vector in zip(chunk, self.image_batcher.run(pixels), strict=True):
                    features[image_rows[n]][self.image_modality] = vector
        if text_vectors is not None and self.text_modality is not None:
            for i, vector in zip(text_rows, text_vectors.result(), strict=True):
                features[i][self.text_modality] = vector

    def _run_rows(self, features: Sequence[Mapping[str, np.ndarray]]) -> list[tuple[np.ndarray, dict[str, Any]]]:
        vectors, extras = self.run(features)
        return list(zip(vectors, extras, strict=True))

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
        outputs = self.spec.session.run(names, feeds, self.run_options)
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

    def _check_texts(self, contents: Sequence[ItemContent]) -> list[int]:
        """Rows with text, after the character limits (per text: 422; per request: 413)."""
        rows = [i for i, c in enumerate(contents) if c.text is not None]
        limits, total = self.limits, 0
        for i in rows:
            chars = len(contents[i].text or "")
            if chars > limits.max_text_chars:
                raise InvalidInput(
                    f"{_where(i, len(contents))}text has {chars} characters, above max_text_chars={limits.max_text_chars}"
                )
            total += chars
        if total > limits.max_request_text_chars:
            raise RequestTooLarge(
                f"the texts of this request have {total} characters together, "
                f"above max_request_text_chars={limits.max_request_text_chars}"
            )
        return rows

    def _open_images(self, contents: Sequence[ItemContent]) -> tuple[list[int], list[Image.Image]]:
        """Rows with an image and the opened (undecoded) images, after the size limits: per image from its header
        (422), then per request (413)."""
        rows = [i for i, c in enumerate(contents) if c.image_base64 is not None]
        limits = self.limits
        if not rows or self.image_encoder is None:  # without an image encoder, _given_features refused image_base64
            return [], []
        if len(rows) > limits.max_request_images:
            raise RequestTooLarge(f"this request has {len(rows)} images, above max_request_images={limits.max_request_images}")
        images: list[Image.Image] = []
        for i in rows:
            try:
                images.append(open_image(contents[i].image_base64 or "", limits))
            except InvalidInput as exc:
                raise InvalidInput(_where(i, len(contents)) + exc.message) from exc
        total = sum(image.size[0] * image.size[1] for image in images)
        if total > limits.max_request_pixels:
            raise RequestTooLarge(
                f"the images of this request have {total} pixels together, above max_request_pixels={limits.max_request_pixels}"
            )
        return rows, images

    def _tokenize(self, texts: Sequence[str]) -> list[Encoding]:
        """Token ids of each text (truncated to the bundle's max_length), after the request's token limit (413)."""
        assert self.text_encoder is not None
        encodings = self.text_encoder.tokenize(texts)
        tokens = sum(len(e.ids) for e in encodings)
        if tokens > self.limits.max_request_tokens:
            raise RequestTooLarge(
                f"the texts of this request are {tokens} tokens together (each truncated to "
                f"{self.text_encoder.spec.max_length}), above max_request_tokens={self.limits.max_request_tokens}"
            )
        return encodings

    def _self_check(self) -> None:
        """Run each graph once on dummy input so a bundle with wrong output shapes fails at load, not per request."""
        probe: dict[str, np.ndarray] = {}
        for modality in self.bundle.modalities.values():
            if modality.text is not None and self.text_encoder is not None:
                probe[modality.name] = self.text_encoder.encode(["probe"])[0]
            elif modality.image is not None and self.image_encoder is not None:
                blank = Image.new("RGB", (modality.image.resize, modality.image.resize))
                probe[modality.name] = self.image_encoder.run(preprocess_image(blank, modality.image)[None])[0]
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


@contextlib.contextmanager
def _releasing_memory(large: bool) -> Iterator[None]:
    """After a large request, the C heap's free pages go back to the OS (small ones free too little to be worth a
    walk of the heap on every request)."""
    try:
        yield
    finally:
        if large:
            release_free_memory()


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
