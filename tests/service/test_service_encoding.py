"""service.encoding: text, image and item encoders against numpy references of the synthetic graphs."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from bundle_factory import IMAGE_MEAN, IMAGE_STD, SyntheticBundle
from PIL import Image

from service.bundle import ImageSpec, load_bundle, plan_device
from service.encoding import (
    EncodingLimits,
    ItemContent,
    ItemEncoder,
    image_pixels,
    open_image,
    preprocess_image,
)
from service.errors import InvalidInput
from service.settings import ServiceSettings

TOLERANCE = 1e-5  # float32 graphs vs float32/64 numpy
LIMITS = EncodingLimits.from_settings(ServiceSettings(bundle_dir="unused"))  # the defaults


@pytest.fixture(scope="module")
def content_encoder(content_bundle: SyntheticBundle) -> ItemEncoder:
    return ItemEncoder(load_bundle(content_bundle.path, plan=plan_device("cpu")), limits=LIMITS)


@pytest.fixture(scope="module")
def features_encoder(features_bundle: SyntheticBundle) -> ItemEncoder:
    return ItemEncoder(load_bundle(features_bundle.path, plan=plan_device("cpu")), limits=LIMITS)


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _spec(content_encoder: ItemEncoder) -> ImageSpec:
    modality = content_encoder.bundle.image_modality
    assert modality is not None and modality.image is not None
    return modality.image


def test_preprocess_image_of_a_solid_colour_is_the_normalised_colour(content_encoder: ItemEncoder) -> None:
    spec = _spec(content_encoder)
    pixels = preprocess_image(Image.new("RGB", (23, 13), (255, 0, 128)), spec)
    expected = (np.array([255, 0, 128]) / 255.0 - np.array(IMAGE_MEAN)) / np.array(IMAGE_STD)
    assert pixels.shape == (3, spec.size, spec.size) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, np.broadcast_to(expected[:, None, None], pixels.shape), atol=TOLERANCE)


def test_preprocess_image_crops_the_centre_with_floor_offsets(content_encoder: ItemEncoder) -> None:
    spec = _spec(content_encoder)  # resize 10, size 8
    # 31x10: the shorter side is already 10 (no resampling); crop left = (31 - 8) // 2 = 11, top = (10 - 8) // 2 = 1
    array = np.zeros((10, 31, 3), dtype=np.uint8)
    array[:, :, 0] = np.arange(31)[None, :] * 8  # red encodes x
    array[:, :, 1] = np.arange(10)[:, None] * 20  # green encodes y
    pixels = preprocess_image(Image.fromarray(array), spec)
    red = pixels[0] * IMAGE_STD[0] + IMAGE_MEAN[0]
    green = pixels[1] * IMAGE_STD[1] + IMAGE_MEAN[1]
    np.testing.assert_allclose(red[0], np.arange(11, 19) * 8 / 255.0, atol=TOLERANCE)
    np.testing.assert_allclose(green[:, 0], np.arange(1, 9) * 20 / 255.0, atol=TOLERANCE)


def test_preprocess_image_converts_grey_and_alpha_to_rgb(content_encoder: ItemEncoder) -> None:
    spec = _spec(content_encoder)
    for image in (Image.new("L", (12, 12), 77), Image.new("RGBA", (12, 12), (77, 77, 77, 10))):
        pixels = preprocess_image(image, spec)
        expected = (77 / 255.0 - np.array(IMAGE_MEAN)) / np.array(IMAGE_STD)
        np.testing.assert_allclose(pixels[:, 0, 0], expected, atol=TOLERANCE)


def test_encode_image_matches_the_numpy_reference(content_encoder: ItemEncoder, content_bundle: SyntheticBundle) -> None:
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, size=(17, 25, 3), dtype=np.uint8))
    encoded = content_encoder.encode([ItemContent(image_base64=_png(image))])[0]
    expected = content_bundle.encode_pixels(preprocess_image(image, _spec(content_encoder)))
    np.testing.assert_allclose(encoded.features["image"], expected, atol=TOLERANCE)
    np.testing.assert_allclose(encoded.vector, content_bundle.encode({"image": expected}), atol=TOLERANCE)


@pytest.mark.parametrize(
    "text",
    ["quiet film", "The LIGHTHOUSE keeper, unknownword", "", " ".join(["dog"] * 10 + ["cat"] * 10)],  # last: truncated at 16
)
def test_encode_text_matches_the_numpy_reference(content_encoder: ItemEncoder, content_bundle: SyntheticBundle, text: str) -> None:
    encoded = content_encoder.encode([ItemContent(text=text), ItemContent(text="robot")])  # a batch pads the shorter
    np.testing.assert_allclose(encoded[0].features["text"], content_bundle.encode_text(text), atol=TOLERANCE)
    np.testing.assert_allclose(encoded[1].features["text"], content_bundle.encode_text("robot"), atol=TOLERANCE)


def test_item_encoder_masks_missing_modalities(features_encoder: ItemEncoder, features_bundle: SyntheticBundle) -> None:
    rng = np.random.default_rng(4)
    tags, audio = rng.normal(size=8).tolist(), rng.normal(size=12).tolist()
    cases = [{"tags": tags}, {"audio": audio}, {"tags": tags, "audio": audio}]
    encoded = features_encoder.encode([ItemContent(features=c) for c in cases])
    for case, item in zip(cases, encoded, strict=True):
        expected = features_bundle.encode({m: np.asarray(v, dtype=np.float32) for m, v in case.items()})
        np.testing.assert_allclose(item.vector, expected, atol=TOLERANCE)
        assert item.extra["quality"] == pytest.approx([features_bundle.quality_of({m: np.asarray(v) for m, v in case.items()})], abs=1e-4)


def test_item_encoder_reproduces_trained_item_vectors(features_encoder: ItemEncoder, features_bundle: SyntheticBundle) -> None:
    """The bundle's item vectors came from the same encoder: re-encoding trained features gives them back."""
    feats = {m: np.load(features_bundle.path / "item_features" / f"{m}.npy") for m in ("tags", "audio")}
    masks = {m: np.load(features_bundle.path / "item_features" / f"{m}.mask.npy") for m in ("tags", "audio")}
    rows = range(10)
    contents = [ItemContent(features={m: feats[m][r].tolist() for m in feats if masks[m][r]}) for r in rows]
    vectors = np.stack([e.vector for e in features_encoder.encode(contents)])
    np.testing.assert_allclose(vectors, features_bundle.item_vectors[list(rows)], atol=1e-5)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("not base64 !!", "image_base64: not valid base64"),
        (base64.b64encode(b"definitely not an image").decode(), "image_base64: not a readable image"),
        (_png(Image.new("RGB", (4, 4)))[:40], "image_base64: not a readable image"),  # truncated
    ],
)
def test_open_image_refuses_unreadable_input(payload: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        open_image(payload, LIMITS)


def test_truncated_image_is_refused_when_decoded(content_encoder: ItemEncoder) -> None:
    noise = Image.fromarray(np.random.default_rng(5).integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    image = open_image(_png(noise)[:400], LIMITS)  # the header is intact, the pixels are not
    with pytest.raises(InvalidInput, match="image_base64: not a readable image"):
        image_pixels(image, _spec(content_encoder))


def test_open_image_accepts_a_data_url() -> None:
    image = open_image("data:image/png;base64," + _png(Image.new("RGB", (5, 3), (1, 2, 3))), LIMITS)
    assert image.size == (5, 3)
