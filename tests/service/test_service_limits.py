"""What one POST /v1/items may cost (issue 12, "Memory and CPU"): every limit answers 413 or 422 naming its setting
and value, checked from image headers and character counts before anything is decoded or encoded; only JPEG, PNG,
WebP and GIF are ever decoded; encoding in chunks gives the same vectors as one batch."""

from __future__ import annotations

import base64
import dataclasses
import io
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import pytest
from bundle_factory import WORDS, SyntheticBundle
from fastapi.testclient import TestClient
from PIL import EpsImagePlugin, Image

from service.bundle import ImageSpec, load_bundle, plan_device
from service.encoding import (
    EncodingLimits,
    ItemContent,
    ItemEncoder,
    image_pixels,
    open_image,
    preprocess_image,
)
from service.settings import ServiceSettings

Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]
DEFAULTS = ServiceSettings(bundle_dir="unused")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header(width: int, height: int) -> bytes:
    """Signature and IHDR of an 8-bit greyscale PNG of that size."""
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))


def _grey_png(width: int, height: int) -> bytes:
    """A valid all-black 8-bit greyscale PNG, compressed row by row (Pillow takes seconds for 1x20,000,000)."""
    row = b"\x00" * (width + 1)  # filter byte 0, then the row's pixels
    compressor = zlib.compressobj(9)
    rows_per_piece = max(1, (1 << 20) // len(row))
    pieces = [compressor.compress(row * min(rows_per_piece, height - done)) for done in range(0, height, rows_per_piece)]
    idat = b"".join(pieces) + compressor.flush()
    return _png_header(width, height) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _png_without_pixels(width: int, height: int) -> bytes:
    """A PNG of that size whose pixel data stops after 64 bytes: only its header can be read."""
    return _png_header(width, height) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def _encoded(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _photo(width: int, height: int) -> Image.Image:
    """Smooth gradients with some texture: what a downscaled photo looks like, deterministic."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 128 + 100 * np.sin(x / 97.0) * np.cos(y / 131.0)
    green = 255 * x / width
    blue = 128 + 60 * np.sin((x + y) / 41.0)
    return Image.fromarray(np.stack([red, green, blue], axis=-1).clip(0, 255).astype(np.uint8))


@pytest.fixture
def serve_content(make_settings: Callable[..., ServiceSettings], serve: Serve, content_bundle: SyntheticBundle) -> Callable[..., AbstractContextManager[TestClient]]:
    """``with serve_content(max_...=...) as client``: embedded mode on the content bundle (text and image encoders)."""

    def run(**overrides: Any) -> AbstractContextManager[TestClient]:
        return serve(make_settings(bundle_dir=content_bundle.path, **overrides))

    return run


@pytest.fixture
def content_client(serve_content: Callable[..., AbstractContextManager[TestClient]]) -> Iterator[TestClient]:
    with serve_content() as client:
        yield client


def _refused(client: TestClient, body: Any, status: int, detail: str) -> None:
    """The request gets ``status`` with exactly ``detail``, and the catalogue is unchanged."""
    size = client.get("/v1/models").json()["index_size"]
    response = client.post("/v1/items", json=body)
    assert response.status_code == status, response.text
    assert response.json()["detail"] == detail
    assert client.get("/v1/models").json()["index_size"] == size


# --- the reproduced cases of issue 12 ----------------------------------------------------------------------------


def test_256_items_of_3800_words_are_refused_by_max_text_chars(content_client: TestClient) -> None:
    rng = np.random.default_rng(12)
    text = " ".join(rng.choice(WORDS, size=3800))  # ~21,000 characters; 256 of them make a 5.5 MB body
    batch = [{"id": f"long-{n}", "text": text} for n in range(256)]
    _refused(content_client, batch, 422, f"items[0]: text has {len(text)} characters, above max_text_chars=20000")


def test_1x10000_png_is_refused_by_max_image_aspect_ratio(content_client: TestClient) -> None:
    body = {"id": "strip", "image_base64": _b64(_grey_png(1, 10_000))}
    _refused(content_client, body, 422, "image_base64: 1x10000 has aspect ratio 10000:1, above max_image_aspect_ratio=20")


def test_1x20000000_png_is_422_not_a_500_from_the_resize(content_client: TestClient) -> None:
    data = _grey_png(1, 20_000_000)
    assert len(data) < 100_000  # the 77 KB file: tiny on the wire, 20 million pixels once decoded
    body = {"id": "needle", "image_base64": _b64(data)}
    _refused(content_client, body, 422, "image_base64: 1x20000000 has aspect ratio 20000000:1, above max_image_aspect_ratio=20")


def test_eight_6000x6000_pngs_are_refused_by_max_image_pixels(content_client: TestClient) -> None:
    image = _b64(_grey_png(6000, 6000))
    batch = [{"id": f"big-{n}", "image_base64": image} for n in range(8)]
    _refused(content_client, batch, 422, "items[0]: image_base64: 6000x6000 is 36000000 pixels, above max_image_pixels=25000000")


def test_eps_is_refused_without_calling_ghostscript(content_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_ghostscript(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the service handed an upload to Ghostscript")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    body = {"id": "eps", "image_base64": _b64(_encoded(Image.new("RGB", (10, 10)), "EPS"))}
    _refused(content_client, body, 422, "image_base64: not a readable image (accepted formats: JPEG, PNG, WebP, GIF)")


@pytest.mark.parametrize("image_format", ["TIFF", "BMP", "ICO"])
def test_formats_outside_the_documented_four_are_refused(content_client: TestClient, image_format: str) -> None:
    body = {"id": "other", "image_base64": _b64(_encoded(Image.new("RGB", (16, 16)), image_format))}
    _refused(content_client, body, 422, "image_base64: not a readable image (accepted formats: JPEG, PNG, WebP, GIF)")


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP", "GIF"])
def test_the_documented_formats_are_ingested(content_client: TestClient, image_format: str) -> None:
    body = {"id": f"ok-{image_format}", "image_base64": _b64(_encoded(_photo(40, 60), image_format))}
    response = content_client.post("/v1/items", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["modalities"] == ["image"]


# --- each limit, at a small value ----------------------------------------------------------------------------------


def test_image_longer_than_max_image_side_is_422(serve_content: Callable[..., AbstractContextManager[TestClient]]) -> None:
    with serve_content(max_image_side=100) as client:
        body = {"id": "wide", "image_base64": _b64(_grey_png(150, 100))}
        _refused(client, body, 422, "image_base64: 150x100 has a side of 150 pixels, above max_image_side=100")


def test_image_size_is_checked_from_the_header_before_decoding(content_client: TestClient) -> None:
    body = {"id": "header-only", "image_base64": _b64(_png_without_pixels(6000, 6000))}
    _refused(content_client, body, 422, "image_base64: 6000x6000 is 36000000 pixels, above max_image_pixels=25000000")


def test_image_over_pillows_own_bound_is_422_naming_max_image_pixels(content_client: TestClient) -> None:
    body = {"id": "bomb", "image_base64": _b64(_png_without_pixels(20_000, 20_000))}  # Pillow refuses it while opening
    _refused(content_client, body, 422, "image_base64: image is 400000000 pixels, above max_image_pixels=25000000")


def test_fractional_aspect_ratio_is_shown_with_one_decimal(serve_content: Callable[..., AbstractContextManager[TestClient]]) -> None:
    with serve_content(max_image_aspect_ratio=2) as client:
        body = {"id": "pano", "image_base64": _b64(_grey_png(50, 20))}
        _refused(client, body, 422, "image_base64: 50x20 has aspect ratio 2.5:1, above max_image_aspect_ratio=2")


def test_images_over_max_request_pixels_are_413(serve_content: Callable[..., AbstractContextManager[TestClient]]) -> None:
    with serve_content(max_request_pixels=1000) as client:
        batch = [{"id": f"px-{n}", "image_base64": _b64(_grey_png(20, 20))} for n in range(3)]  # 3 x 400 pixels
        _refused(client, batch, 413, "the images of this request have 1200 pixels together, above max_request_pixels=1000")


def test_images_over_max_request_images_are_413(serve_content: Callable[..., AbstractContextManager[TestClient]]) -> None:
    with serve_content(max_request_images=2) as client:
        batch = [{"id": f"img-{n}", "image_base64": _b64(_grey_png(8, 8))} for n in range(3)]
        _refused(client, batch, 413, "this request has 3 images, above max_request_images=2")


def test_texts_over_max_request_text_chars_are_413(serve_content: Callable[..., AbstractContextManager[TestClient]]) -> None:
    with serve_content(max_request_text_chars=100) as client:
        batch = [{"id": f"t-{n}", "text": "quiet film " * 5} for n in range(2)]  # 2 x 55 characters
        _refused(client, batch, 413, "the texts of this request have 110 characters together, above max_request_text_chars=100")


def test_texts_over_max_request_tokens_are_413(serve_content: Callable[..., AbstractContextManager[TestClient]]) -> None:
    with serve_content(max_request_tokens=20) as client:
        batch = [{"id": "t-long", "text": "dog " * 40}, {"id": "t-short", "text": "a quiet film"}]  # 16 (truncated) + 3
        response = client.post("/v1/items", json=batch)
        assert response.status_code == 201, response.text
        batch = [{"id": "t-long-2", "text": "dog " * 40}, {"id": "t-mid", "text": "a quiet film about a dog"}]  # 16 + 6
        _refused(client, batch, 413, "the texts of this request are 22 tokens together (each truncated to 16), above max_request_tokens=20")


def test_refused_request_stores_nothing(serve_content: Callable[..., AbstractContextManager[TestClient]]) -> None:
    with serve_content(max_request_images=1) as client:
        batch = [{"id": "new-first", "text": "a film"}, {"id": "new-i1", "image_base64": _b64(_grey_png(8, 8))},
                 {"id": "new-i2", "image_base64": _b64(_grey_png(8, 8))}]  # fmt: skip
        assert client.post("/v1/items", json=batch).status_code == 413
        assert client.get("/v1/items/new-first").status_code == 404


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [("max_text_chars", 200_000, "less than or equal to 100000"),  # the request schema's own bound on a text
     ("max_image_pixels", 100_000_000, "less than or equal to 89478485"),  # Pillow's decompression-bomb bound
     ("encode_chunk_size", 0, "greater than or equal to 1")],
)
def test_limit_settings_refuse_values_the_service_cannot_honour(tmp_path: Any, setting: str, value: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServiceSettings(bundle_dir=tmp_path, **{setting: value})


# --- chunks and early reduction ------------------------------------------------------------------------------------


def _encoder(bundle: SyntheticBundle, chunk_size: int = 4, concurrent: int = 1) -> ItemEncoder:
    settings = DEFAULTS.model_copy(update={"encode_chunk_size": chunk_size, "max_concurrent_encodes": concurrent})
    return ItemEncoder(load_bundle(bundle.path, plan=plan_device("cpu")), limits=EncodingLimits.from_settings(settings))


@pytest.mark.parametrize("concurrent", [1, 2])
def test_at_most_max_concurrent_encodes_requests_encode_at_once(content_bundle: SyntheticBundle, monkeypatch: pytest.MonkeyPatch, concurrent: int) -> None:
    encoder = _encoder(content_bundle, concurrent=concurrent)
    assert encoder.text_encoder is not None
    run, lock, inside, most = encoder.text_encoder.run, threading.Lock(), [0], [0]
    together = threading.Barrier(concurrent, timeout=10)  # passes only once `concurrent` requests are encoding

    def observed_run(encodings: Sequence[Any]) -> np.ndarray:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        together.wait()
        time.sleep(0.05)  # long enough for the other threads to pile in, were they let through
        with lock:
            inside[0] -= 1
        return run(encodings)

    monkeypatch.setattr(encoder.text_encoder, "run", observed_run)
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda n: encoder.encode([ItemContent(text=f"dog {n}")]), range(4)))
    assert most[0] == concurrent


def test_encoding_in_chunks_gives_the_vectors_of_one_batch(content_bundle: SyntheticBundle) -> None:
    rng = np.random.default_rng(7)
    contents = [
        ItemContent(
            text=" ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))),  # lengths on both sides of max_length 16
            image_base64=_b64(_encoded(Image.fromarray(rng.integers(0, 256, size=(12 + n, 20, 3), dtype=np.uint8)), "PNG")),
        )
        for n in range(11)
    ]
    whole, chunked = _encoder(content_bundle, 64).encode(contents), _encoder(content_bundle, 3).encode(contents)
    for content, a, b in zip(contents, whole, chunked, strict=True):
        np.testing.assert_allclose(b.vector, a.vector, atol=1e-5)
        np.testing.assert_allclose(b.features["image"], a.features["image"], atol=1e-5)
        np.testing.assert_allclose(b.features["text"], content_bundle.encode_text(content.text or ""), atol=1e-5)


def test_text_chunks_hold_at_most_chunk_size_full_length_texts_of_tokens(content_bundle: SyntheticBundle) -> None:
    encoder = _encoder(content_bundle, chunk_size=2).text_encoder  # max_length 16: at most 32 padded tokens a run
    assert encoder is not None
    texts = ["dog " * 20, "cat", "dog cat", "a quiet film", "dog " * 20, "robot " * 9, "cat"]  # 16, 1, 2, 3, 16, 9, 1 tokens
    encodings = encoder.tokenize(texts)
    chunks = list(encoder._chunks(encodings))
    # by length: the 4 short ones (4 x 3 = 12; a 9 would make 5 x 9 > 32), then 9 and 16 (2 x 16), then 16 alone
    assert chunks == [[1, 6, 2, 3], [5, 0], [4]]
    assert sorted(row for chunk in chunks for row in chunk) == list(range(len(texts)))


def _spec(content_bundle: SyntheticBundle) -> ImageSpec:
    modality = load_bundle(content_bundle.path, plan=plan_device("cpu")).image_modality
    assert modality is not None and modality.image is not None
    return modality.image


def test_large_jpeg_is_decoded_reduced_and_stays_close_to_the_full_recipe(content_bundle: SyntheticBundle) -> None:
    spec = _spec(content_bundle)  # resize 10: a 400x300 JPEG is decoded at 1/8 scale (50x38)
    data = _encoded(_photo(400, 300), "JPEG", quality=95)
    full = Image.open(io.BytesIO(data))
    full.load()
    exact = preprocess_image(full, spec)
    opened = open_image(_b64(data), EncodingLimits.from_settings(DEFAULTS))
    reduced = image_pixels(opened, spec)
    assert reduced.shape == exact.shape
    assert float(np.abs(reduced - exact).mean()) < 0.05  # normalised units (std ~0.23 of [0, 1]): a few grey levels


def test_small_jpeg_follows_the_training_recipe_exactly(content_bundle: SyntheticBundle) -> None:
    spec = _spec(content_bundle)  # resize 10: a 19x15 JPEG cannot be halved without its short side going under 10
    data = _encoded(_photo(19, 15), "JPEG", quality=95)
    exact = preprocess_image(Image.open(io.BytesIO(data)).convert("RGB"), spec)
    np.testing.assert_array_equal(image_pixels(open_image(_b64(data), EncodingLimits.from_settings(DEFAULTS)), spec), exact)


def test_decoded_image_is_released_after_preprocessing(content_bundle: SyntheticBundle) -> None:
    opened = open_image(_b64(_grey_png(30, 20)), EncodingLimits.from_settings(DEFAULTS))
    image_pixels(opened, _spec(content_bundle))
    with pytest.raises(ValueError, match="closed image"):
        opened.getpixel((0, 0))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "1"])
def test_preprocess_image_without_a_full_size_copy_equals_the_training_recipe(content_bundle: SyntheticBundle, mode: str) -> None:
    """Bands resized one at a time give exactly convert("RGB") then resize, as training does it."""
    spec = dataclasses.replace(_spec(content_bundle), resize=24, size=20)
    rng = np.random.default_rng(11)
    image = Image.fromarray(rng.integers(0, 256, size=(307, 211, 4), dtype=np.uint8), "RGBA").convert(mode)
    rgb = image.convert("RGB")
    width, height = rgb.size  # the recipe of training/data/encoders.py: shorter side to `resize`, centre crop `size`
    new_w, new_h = (spec.resize, height * spec.resize // width) if width <= height else (width * spec.resize // height, spec.resize)
    resized = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - spec.size) // 2, (new_h - spec.size) // 2
    pixels = np.asarray(resized.crop((left, top, left + spec.size, top + spec.size)), dtype=np.float32) / np.float32(255.0)
    expected = ((pixels - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)).transpose(2, 0, 1)
    np.testing.assert_array_equal(preprocess_image(image, spec), expected)
