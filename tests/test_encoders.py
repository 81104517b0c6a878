"""Content encoders, feature cache and encoder ONNX export.

References: sentence-transformers' own ``encode`` for the text encoder (1e-5); the torch encoders for their ONNX
graphs run by onnxruntime (1e-4), the text graph fed by the ``tokenizers`` package as the service feeds it; the
int8-dynamic text graph (the export default) against torch by cosine (>= 0.98 each non-empty text, >= 0.99 on
average: measured 0.984 / 0.993 over all ml100k-posters texts, bench/results/text-encoder-int8.json; the empty
text, [CLS] [SEP] alone, 0.968).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from training.data.encoders import (
    IMAGE_DIM,
    IMAGE_ENCODER_VERSION,
    IMAGE_MEAN,
    IMAGE_RESIZE,
    IMAGE_SIZE,
    IMAGE_STD,
    TEXT_DIM,
    TEXT_ENCODER_VERSION,
    ImageEncoder,
    TextEncoder,
    UnreadableImageError,
    encoder_kind,
    preprocess_image,
    text_model_dir,
)
from training.data.feature_cache import FeatureCache, feature_key
from training.data.features import encode_images, encode_texts
from training.export.onnx_export import export_image_encoder, export_text_encoder, image_calibration_sample
from training.settings import default_paths

ort = pytest.importorskip("onnxruntime")
tokenizers = pytest.importorskip("tokenizers")

SENTENCES = [
    "Toy Story (1995). Animation, Children's, Comedy. Led by Woody, Andy's toys live happily in his room.",
    "GoldenEye",
    "",  # [CLS] [SEP] only
    "A plot that goes on and on, twisting and turning through every genre imaginable. " * 40,  # > 256 tokens
]


# -- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    return TextEncoder(device="cpu")


@pytest.fixture(scope="module")
def image_encoder() -> ImageEncoder:
    return ImageEncoder(device="cpu")


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory, text_encoder: TextEncoder, image_encoder: ImageEncoder
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    out = tmp_path_factory.mktemp("bundle")
    text = export_text_encoder(out, encoder=text_encoder, precision="fp32")
    image = export_image_encoder(out, encoder=image_encoder)
    return out, text, image


@pytest.fixture(scope="module")
def exported_int8(tmp_path_factory: pytest.TempPathFactory, text_encoder: TextEncoder) -> tuple[Path, dict[str, Any]]:
    """The text encoder as the exporter writes it by default (int8-dynamic)."""
    out = tmp_path_factory.mktemp("bundle-int8")
    return out, export_text_encoder(out, encoder=text_encoder)


def synthetic_image_bytes(width: int = 150, height: int = 220, *, fmt: str = "PNG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], axis=-1)
    pixels = np.clip(pixels + rng.integers(-20, 21, size=pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format=fmt)
    return buffer.getvalue()


@dataclass
class CountingEncoder:
    """A fake encoder: a deterministic vector per input, and a count of inputs it was asked to encode."""

    version: str
    dim: int = 8
    n_inputs: int = 0
    n_calls: int = 0

    def _vector(self, content: bytes) -> NDArray[np.float32]:
        seed = int.from_bytes(hashlib.sha256(content).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)

    def encode(self, batch: Sequence[str] | NDArray[np.float32]) -> NDArray[np.float32]:
        self.n_calls += 1
        self.n_inputs += len(batch)
        if isinstance(batch, np.ndarray):
            return np.stack([self._vector(x.tobytes()) for x in batch])
        return np.stack([self._vector(x.encode()) for x in batch]).reshape(len(batch), self.dim)


def run_session(path: Path, feeds: dict[str, NDArray[Any]]) -> NDArray[np.float32]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, feeds)
    return np.asarray(output)


# -- the torch encoders ---------------------------------------------------------------------------------------


def test_text_encoder_equals_sentence_transformers(text_encoder: TextEncoder) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(text_model_dir()), device="cpu")
    assert reference.max_seq_length == text_encoder.max_length
    expected = reference.encode(SENTENCES, convert_to_numpy=True, batch_size=len(SENTENCES))
    got = text_encoder.encode(SENTENCES)
    assert got.dtype == np.float32 and got.shape == (len(SENTENCES), TEXT_DIM)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_text_encoder_truncates_to_max_length(text_encoder: TextEncoder) -> None:
    input_ids, attention_mask = text_encoder.tokenize(SENTENCES)
    assert input_ids.shape == attention_mask.shape == (len(SENTENCES), 256)
    lengths = attention_mask.sum(dim=1).tolist()
    assert lengths[2] == 2  # [CLS] [SEP]
    assert all(length < 256 for length in lengths[:3]) and lengths[3] == 256
    assert input_ids[3, -1].item() == text_encoder.tokenizer.token_to_id("[SEP]")
    assert input_ids[2, 2:].eq(0).all()  # padded with [PAD] = 0


def test_image_encoder_output_shape(image_encoder: ImageEncoder) -> None:
    pixels = np.stack([preprocess_image(synthetic_image_bytes(seed=s)) for s in range(3)])
    features = image_encoder.encode(pixels)
    assert features.dtype == np.float32 and features.shape == (3, IMAGE_DIM)
    assert np.isfinite(features).all()


def test_image_encoder_rejects_wrong_pixel_shape(image_encoder: ImageEncoder) -> None:
    with pytest.raises(ValueError, match=r"pixels must be \(N, 3, 224, 224\), got \(1, 3, 100, 100\)"):
        image_encoder.encode(np.zeros((1, 3, 100, 100), dtype=np.float32))


# -- preprocessing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(92, 138), (138, 92), (300, 300), (1, 1), (640, 227)])
def test_preprocess_image_shape_and_dtype(width: int, height: int) -> None:
    pixels = preprocess_image(synthetic_image_bytes(width, height))
    assert pixels.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert pixels.dtype == np.float32 and pixels.flags.c_contiguous


def test_preprocess_image_normalises_with_inception_mean_and_std() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (120, 90), (127, 0, 255)).save(buffer, format="PNG")
    pixels = preprocess_image(buffer.getvalue())
    # (x / 255 - 127/255) / (128/255) == (x - 127) / 128
    np.testing.assert_allclose(pixels[0], 0.0, atol=1e-6)
    np.testing.assert_allclose(pixels[1], -127 / 128, atol=1e-6)
    np.testing.assert_allclose(pixels[2], 1.0, atol=1e-6)


def test_preprocess_image_centre_crops_the_resized_image() -> None:
    # 100 wide x 200 high, top half black, bottom half white: resized to 256 x 512, the centre 224 rows straddle
    # the boundary at row 256, so crop rows 0..111 are black and 112..223 white (bilinear blurs one row each).
    buffer = io.BytesIO()
    array = np.zeros((200, 100, 3), dtype=np.uint8)
    array[100:] = 255
    Image.fromarray(array).save(buffer, format="PNG")
    pixels = preprocess_image(buffer.getvalue())
    np.testing.assert_allclose(pixels[:, :110], -127 / 128, atol=1e-6)
    np.testing.assert_allclose(pixels[:, 114:], 128 / 128, atol=1e-6)


@pytest.mark.parametrize("data", [b"", b"not an image", synthetic_image_bytes(fmt="JPEG")[:200]])
def test_preprocess_image_raises_unreadable_image_error(data: bytes) -> None:
    with pytest.raises(UnreadableImageError, match="cannot decode image"):
        preprocess_image(data)


# -- ONNX export ----------------------------------------------------------------------------------------------


def test_export_text_encoder_manifest(exported: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    out, text, _ = exported
    assert text == {
        "dim": 384,
        "encoder": "all-MiniLM-L6-v2",
        "encoder_kind": "text",
        "encoder_onnx": "text_encoder.onnx",
        "tokenizer": "tokenizer.json",
        "max_length": 256,
        "onnx_inputs": ["input_ids", "attention_mask"],
        "onnx_output": "sentence_embedding",
        "onnx_precision": "fp32",
    }
    assert (out / "text_encoder.onnx").is_file() and (out / "tokenizer.json").is_file()
    assert not list(out.glob("*.data")), "weights must be inside the .onnx files"


def test_export_text_encoder_int8_by_default_with_its_matmuls_quantised(
    exported: tuple[Path, dict[str, Any], dict[str, Any]], exported_int8: tuple[Path, dict[str, Any]]
) -> None:
    import onnx

    out, entry = exported_int8
    _, fp32_entry, _ = exported
    assert entry == {**fp32_entry, "onnx_precision": "int8-dynamic"}
    assert sorted(p.name for p in out.iterdir()) == ["text_encoder.onnx", "tokenizer.json"]  # no fp32 graph left behind
    graph = onnx.load(str(out / "text_encoder.onnx")).graph
    ops = [node.op_type for node in graph.node]
    weights = {init.name for init in graph.initializer}
    assert ops.count("MatMulInteger") >= 36  # 6 layers x (q, k, v, out, 2 feed-forward)
    assert not [n for n in graph.node if n.op_type == "MatMul" and any(i in weights for i in n.input)], \
        "every MatMul with a weight is quantised"  # fmt: skip


def _ml100k_texts(n: int) -> list[str]:
    from training.data.sources import read_ml100k_posters

    if not (default_paths().data_root / "ml100k-posters").is_dir():
        return []
    return [t for t in read_ml100k_posters(default_paths()).item_text if t][:n]


def test_int8_text_onnx_is_close_to_torch(exported_int8: tuple[Path, dict[str, Any]], text_encoder: TextEncoder) -> None:
    out, manifest = exported_int8
    texts = SENTENCES + _ml100k_texts(64)  # the real texts where the shared data is there
    tokenizer = tokenizers.Tokenizer.from_file(str(out / manifest["tokenizer"]))
    tokenizer.enable_truncation(max_length=manifest["max_length"])
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(texts)
    feeds = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
             "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64)}  # fmt: skip
    got = run_session(out / manifest["encoder_onnx"], feeds)
    want = text_encoder.encode(texts)
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    real = np.array([bool(t) for t in texts])
    # Measured: >= 0.984 for every ml100k-posters text (mean 0.993); the empty text (only [CLS] [SEP]) 0.968-0.972.
    # The mean is over the real texts: without the shared data there are only 4 texts, one of them empty.
    assert cosine[real].min() >= 0.98 and cosine.min() >= 0.95 and cosine[real].mean() >= 0.99, cosine
    assert np.abs(got - want).max() > 1e-4  # it is the quantised graph, not the fp32 one


def test_export_image_encoder_manifest(exported: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    out, _, image = exported
    assert image == {
        "dim": 1280,
        "encoder": "efficientnet-lite0",
        "encoder_kind": "image",
        "encoder_onnx": "image_encoder.onnx",
        "size": IMAGE_SIZE,
        "resize": IMAGE_RESIZE,
        "mean": list(IMAGE_MEAN),
        "std": list(IMAGE_STD),
        "onnx_inputs": ["pixels"],
        "onnx_output": "features",
        "onnx_precision": "fp32",
    }
    assert image["size"] == 224 and image["resize"] == 256
    np.testing.assert_allclose(image["mean"], [127 / 255] * 3)
    np.testing.assert_allclose(image["std"], [128 / 255] * 3)
    assert (out / "image_encoder.onnx").is_file()


@pytest.mark.parametrize("texts", [SENTENCES, SENTENCES[:1], ["one", "two", "three"]])
def test_text_onnx_with_tokenizers_equals_torch(
    exported: tuple[Path, dict[str, Any], dict[str, Any]], text_encoder: TextEncoder, texts: list[str]
) -> None:
    out, manifest, _ = exported
    # What the service does: the tokenizers package, the manifest's max_length, padding on.
    tokenizer = tokenizers.Tokenizer.from_file(str(out / manifest["tokenizer"]))
    tokenizer.enable_truncation(max_length=manifest["max_length"])
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(texts)
    input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
    attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    names = manifest["onnx_inputs"]
    got = run_session(out / manifest["encoder_onnx"], {names[0]: input_ids, names[1]: attention_mask})
    assert got.shape == (len(texts), TEXT_DIM) and got.dtype == np.float32
    np.testing.assert_allclose(got, text_encoder.encode(texts), atol=1e-4, rtol=0)


def test_exported_tokenizer_is_usable_without_configuration(
    exported: tuple[Path, dict[str, Any], dict[str, Any]], text_encoder: TextEncoder
) -> None:
    out, manifest, _ = exported
    tokenizer = tokenizers.Tokenizer.from_file(str(out / manifest["tokenizer"]))
    encodings = tokenizer.encode_batch(SENTENCES)
    input_ids, attention_mask = text_encoder.tokenize(SENTENCES)
    assert [e.ids for e in encodings] == input_ids.tolist()
    assert [e.attention_mask for e in encodings] == attention_mask.tolist()


def test_image_onnx_equals_torch_on_synthetic_images(
    exported: tuple[Path, dict[str, Any], dict[str, Any]], image_encoder: ImageEncoder
) -> None:
    out, _, manifest = exported
    pixels = np.stack([preprocess_image(synthetic_image_bytes(fmt="JPEG", seed=s)) for s in range(2)])
    got = run_session(out / manifest["encoder_onnx"], {manifest["onnx_inputs"][0]: pixels})
    assert got.shape == (2, IMAGE_DIM)
    np.testing.assert_allclose(got, image_encoder.encode(pixels), atol=1e-4, rtol=0)


@pytest.mark.shared_data
def test_image_onnx_equals_torch_on_a_real_poster(
    exported: tuple[Path, dict[str, Any], dict[str, Any]], image_encoder: ImageEncoder
) -> None:
    poster = default_paths().data_root / "ml100k-posters" / "posters" / "1.jpg"
    if not poster.is_file():
        pytest.skip(f"shared data absent: {poster} (set MMREC_DATA_ROOT)")
    out, _, manifest = exported
    pixels = preprocess_image(poster.read_bytes())[None]
    got = run_session(out / manifest["encoder_onnx"], {manifest["onnx_inputs"][0]: pixels})
    np.testing.assert_allclose(got, image_encoder.encode(pixels), atol=1e-4, rtol=0)


def _cosine(a: NDArray[np.float32], b: NDArray[np.float32]) -> NDArray[np.float64]:
    return np.asarray((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)), dtype=np.float64)


def test_export_image_encoder_int8_static_is_close_to_fp32_on_images_it_was_not_calibrated_on(
    tmp_path: Path, exported: tuple[Path, dict[str, Any], dict[str, Any]], image_encoder: ImageEncoder
) -> None:
    import onnx

    fp32_dir, _, fp32_entry = exported
    calibration = []
    for seed in range(8):
        calibration.append(tmp_path / f"calibration-{seed}.jpg")
        calibration[-1].write_bytes(synthetic_image_bytes(fmt="JPEG", seed=seed))
    out = tmp_path / "int8"
    entry = export_image_encoder(out, encoder=image_encoder, precision="int8-static", calibration_images=calibration)
    assert entry == {**fp32_entry, "onnx_precision": "int8-static"}
    assert sorted(p.name for p in out.iterdir()) == ["image_encoder.onnx"]  # no fp32 graph or scratch left behind
    graph = onnx.load(str(out / "image_encoder.onnx")).graph
    convolutions = [node for node in graph.node if node.op_type == "Conv"]
    dequantised = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    int8_weights = [conv.input[1] in dequantised for conv in convolutions]
    assert len(convolutions) == 49 and int8_weights == [False] * 6 + [True] * 43  # the first six stay fp32
    pixels = np.stack([preprocess_image(synthetic_image_bytes(180, 240, fmt="JPEG", seed=100 + s)) for s in range(4)])
    fp32 = run_session(fp32_dir / "image_encoder.onnx", {"pixels": pixels})
    int8 = run_session(out / "image_encoder.onnx", {"pixels": pixels})
    assert int8.shape == (4, IMAGE_DIM) and int8.dtype == np.float32
    # On 1,363 real posters the cosine is 0.99 on average (bench/results/image-encoder-int8.json); full-range int8
    # weights on a CPU without VNNI, or every convolution quantised, fall to 0.83-0.96 on average.
    cosine = _cosine(int8, fp32)
    assert cosine.min() >= 0.97, cosine


def test_export_image_encoder_int8_static_needs_calibration_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="an int8-static image encoder needs calibration images; none were given"):
        export_image_encoder(tmp_path / "out", precision="int8-static")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("precision", ["int8-dynamic", "int4", "FP32"])
def test_export_image_encoder_refuses_a_precision_it_does_not_write(tmp_path: Path, precision: str) -> None:
    with pytest.raises(ValueError, match=f"precision must be one of fp32, int8-static, got {precision!r}"):
        export_image_encoder(tmp_path / "out", precision=precision)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_image_calibration_sample_is_seeded_and_skips_absent_files(tmp_path: Path) -> None:
    files = [tmp_path / f"{i}.jpg" for i in range(10)]
    for f in files:
        f.write_bytes(b"x")
    images: list[str | None] = [str(f) for f in files] + [None, str(tmp_path / "absent.jpg")]
    sample = image_calibration_sample(images, count=4, seed=3)
    assert len(sample) == 4 and len(set(sample)) == 4 and set(sample) <= set(files)
    assert sample == image_calibration_sample(list(reversed(images)), count=4, seed=3)  # the same draw, any order
    assert sample != image_calibration_sample(images, count=4, seed=4)
    assert image_calibration_sample(images, count=50) == sorted(files, key=str)  # fewer than count: all of them


# -- feature cache --------------------------------------------------------------------------------------------


def test_feature_key_differs_by_encoder_version() -> None:
    assert feature_key("enc@1", b"same bytes") != feature_key("enc@2", b"same bytes")
    assert feature_key("enc@1", b"same bytes") == feature_key("enc@1", b"same bytes")
    assert feature_key("ab", b"c") != feature_key("a", b"bc")  # the separator keeps them apart
    assert TEXT_ENCODER_VERSION != IMAGE_ENCODER_VERSION


def test_feature_cache_round_trips_across_instances(tmp_path: Path) -> None:
    vectors = {feature_key("v", bytes([i])): np.arange(i, i + 4, dtype=np.float32) for i in range(3)}
    with FeatureCache(tmp_path / "sub" / "cache.sqlite") as cache:
        cache.put_many(vectors)
    with FeatureCache(tmp_path / "sub" / "cache.sqlite") as cache:
        assert len(cache) == 3
        got = cache.get_many([*vectors, "absent"])
    assert set(got) == set(vectors)
    for key, vector in vectors.items():
        np.testing.assert_array_equal(got[key], vector)
        assert got[key].dtype == np.float32


def test_feature_cache_rejects_non_vectors(tmp_path: Path) -> None:
    with FeatureCache(tmp_path / "cache.sqlite") as cache, pytest.raises(ValueError, match="must be 1-d"):
        cache.put_many({"k": np.zeros((2, 2), dtype=np.float32)})


def test_encode_texts_second_call_encodes_nothing(tmp_path: Path) -> None:
    texts = ["alpha", "beta", "gamma", "alpha"]
    encoder = CountingEncoder(version="fake-text@1")
    with FeatureCache(tmp_path / "cache.sqlite") as cache:
        first = encode_texts(texts, encoder=encoder, cache=cache, batch_size=2, progress=False)
        assert encoder.n_inputs == 3 and first.n_encoded == 3  # "alpha" twice, encoded once
        second = encode_texts(texts, encoder=encoder, cache=cache, batch_size=2, progress=False)
    assert encoder.n_inputs == 3 and encoder.n_calls == 2
    assert second.n_encoded == 0 and second.n_cache_hits == 4
    np.testing.assert_array_equal(first.features, second.features)
    np.testing.assert_array_equal(first.features[0], first.features[3])


def test_encode_images_second_call_encodes_nothing(tmp_path: Path) -> None:
    paths = []
    for seed in range(3):
        path = tmp_path / f"{seed}.png"
        path.write_bytes(synthetic_image_bytes(40, 60, seed=seed))
        paths.append(path)
    encoder = CountingEncoder(version="fake-image@1")
    with FeatureCache(tmp_path / "cache.sqlite") as cache:
        first = encode_images(paths, encoder=encoder, cache=cache, progress=False)
        second = encode_images(paths, encoder=encoder, cache=cache, progress=False)
    assert encoder.n_inputs == 3 and encoder.n_calls == 1
    assert second.n_encoded == 0 and second.n_cache_hits == 3 and second.present.all()
    np.testing.assert_array_equal(first.features, second.features)


def test_encode_texts_new_encoder_version_misses_the_cache(tmp_path: Path) -> None:
    with FeatureCache(tmp_path / "cache.sqlite") as cache:
        encode_texts(["a", "b"], encoder=CountingEncoder(version="v1"), cache=cache, progress=False)
        other = CountingEncoder(version="v2")
        result = encode_texts(["a", "b"], encoder=other, cache=cache, progress=False)
        assert len(cache) == 4
    assert other.n_inputs == 2 and result.n_cache_hits == 0


def test_encode_texts_with_the_real_encoder_equals_encode(tmp_path: Path, text_encoder: TextEncoder) -> None:
    texts = [SENTENCES[1], None, SENTENCES[0]]
    with FeatureCache(tmp_path / "cache.sqlite") as cache:
        result = encode_texts(texts, encoder=text_encoder, cache=cache, progress=False)
    expected = text_encoder.encode([SENTENCES[1], SENTENCES[0]])
    np.testing.assert_allclose(result.features[[0, 2]], expected, atol=1e-6)
    np.testing.assert_array_equal(result.features[1], 0.0)


# -- missing modalities ---------------------------------------------------------------------------------------


def test_encode_texts_counts_missing_texts() -> None:
    encoder = CountingEncoder(version="fake-text@1")
    result = encode_texts(["ok", "", "   \n\t", None, "fine"], encoder=encoder, progress=False)
    assert result.present.tolist() == [True, False, False, False, True]
    assert result.n_missing_reasons == {"empty_text": 2, "no_text": 1}
    assert result.n_missing == 3
    np.testing.assert_array_equal(result.features[~result.present], 0.0)
    assert encoder.n_inputs == 2


def test_encode_images_counts_missing_images(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    good.write_bytes(synthetic_image_bytes(fmt="JPEG"))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(synthetic_image_bytes(fmt="JPEG", seed=1)[:300])
    a_directory = tmp_path / "dir.jpg"
    a_directory.mkdir()
    images = [good, None, corrupt, tmp_path / "absent.jpg", truncated, a_directory]
    encoder = CountingEncoder(version="fake-image@1")
    with FeatureCache(tmp_path / "cache.sqlite") as cache:
        result = encode_images(images, encoder=encoder, cache=cache, progress=False)
        assert len(cache) == 1  # a failed decode is not cached
    assert result.present.tolist() == [True, False, False, False, False, False]
    assert result.n_missing_reasons == {"no_image": 1, "unreadable_image": 3, "missing_image_file": 1}
    np.testing.assert_array_equal(result.features[1:], 0.0)
    assert encoder.n_inputs == 1


# -- shapes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 130])
@pytest.mark.parametrize("batch_size", [1, 4, 64])
@pytest.mark.parametrize("dim", [1, 16])
def test_encode_texts_shapes(n: int, batch_size: int, dim: int) -> None:
    texts = [f"text {i}" if i % 3 else None for i in range(n)]
    encoder = CountingEncoder(version="fake-text@1", dim=dim)
    result = encode_texts(texts, encoder=encoder, batch_size=batch_size, progress=False)
    n_present = sum(t is not None for t in texts)
    assert result.features.shape == (n, dim) and result.features.dtype == np.float32
    assert result.present.shape == (n,) and result.present.dtype == np.bool_
    assert int(result.present.sum()) == n_present == encoder.n_inputs
    assert encoder.n_calls == -(-n_present // batch_size)
    assert result.dim == dim and sum(result.n_missing_reasons.values()) == n - n_present


@pytest.mark.parametrize("n", [0, 1, 5])
def test_encode_images_shapes(tmp_path: Path, n: int) -> None:
    paths: list[Path | None] = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        path.write_bytes(synthetic_image_bytes(30 + i, 50, seed=i))
        paths.append(path)
    result = encode_images(paths, encoder=CountingEncoder(version="fake-image@1", dim=5), progress=False)
    assert result.features.shape == (n, 5) and result.present.shape == (n,)
    assert result.present.all()


def test_encode_texts_rejects_an_encoder_with_the_wrong_output_shape() -> None:
    @dataclass
    class Wrong:
        version: str = "wrong@1"
        dim: int = 4

        def encode(self, batch: Sequence[str]) -> NDArray[np.float32]:
            return np.zeros((len(batch), 3), dtype=np.float32)

    with pytest.raises(ValueError, match=r"text encoder returned shape \(2, 3\), expected \(2, 4\)"):
        encode_texts(["a", "b"], encoder=Wrong(), progress=False)


@pytest.mark.parametrize(
    ("encoder", "kind"),
    [
        (TEXT_ENCODER_VERSION, "text"),
        ("precomputed:all-MiniLM-L6-v2.npy", "text"),  # lfm2k's text features ship with the data
        (IMAGE_ENCODER_VERSION, "image"),
        ("precomputed:vggish.npy", None),
        ("precomputed:clip-vit-1280.npy", None),  # an image-sized feature from another encoder ships no encoder
    ],
)
def test_encoder_kind_names_the_pretrained_encoder_that_made_the_features(encoder: str, kind: str | None) -> None:
    assert encoder_kind(encoder) == kind


# -- throughput settings do not change the features (issue 14) -------------------------------------------------


def poster_files(tmp_path: Path, n_synthetic: int = 10, n_real: int = 12) -> list[Path]:
    """Synthetic images of varied sizes, and the first real posters when the shared data is there."""
    files = []
    for seed in range(n_synthetic):
        path = tmp_path / f"synthetic-{seed}.jpg"
        path.write_bytes(synthetic_image_bytes(120 + 13 * seed, 300 - 11 * seed, fmt="JPEG", seed=seed))
        files.append(path)
    posters = default_paths().data_root / "ml100k-posters" / "posters"
    if posters.is_dir():
        files += sorted(posters.iterdir())[:n_real]
    return files


def test_small_batches_prefetch_and_channels_last_keep_the_image_features(
    tmp_path: Path, image_encoder: ImageEncoder
) -> None:
    files = poster_files(tmp_path)
    reference = encode_images(files, encoder=image_encoder, batch_size=64, prefetch=False, progress=False)
    fast = ImageEncoder(device="cpu", channels_last=True)
    for encoder, batch_size in ((image_encoder, 8), (fast, 8), (fast, 3)):
        result = encode_images(files, encoder=encoder, batch_size=batch_size, prefetch=True, progress=False)
        assert result.present.all() and result.n_encoded == len(files)
        np.testing.assert_allclose(result.features, reference.features, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_prefetch_gives_the_same_rows_and_missing_reasons(tmp_path: Path, batch_size: int) -> None:
    files: list[Path | None] = []
    for seed in range(7):
        path = tmp_path / f"{seed}.png"
        path.write_bytes(synthetic_image_bytes(30, 40, seed=seed) if seed % 3 else b"not an image")
        files += [path, None, tmp_path / f"absent-{seed}.png"]
    files.append(files[1 - 1])  # a repeated file: encoded once
    results = [encode_images(files, encoder=CountingEncoder(version="fake-image@1"), batch_size=batch_size,
                             prefetch=prefetch, progress=False) for prefetch in (False, True)]  # fmt: skip
    np.testing.assert_array_equal(results[0].features, results[1].features)
    np.testing.assert_array_equal(results[0].present, results[1].present)
    assert results[0].n_missing_reasons == results[1].n_missing_reasons == {
        "unreadable_image": 4, "no_image": 7, "missing_image_file": 7}  # fmt: skip
    assert results[1].n_encoded == 4


def test_export_text_encoder_refuses_an_unknown_precision_before_exporting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precision must be one of fp32, int8-dynamic, got 'int4'"):
        export_text_encoder(tmp_path / "out", encoder=None, precision="int4")  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
