"""ONNX export: the item content encoders with their manifest entries (docs/bundle-format.md, "modalities"), and
the model's own item encoder and user tower.

The graphs are made by the torch.export-based exporter (``torch.onnx.export(..., dynamo=True)``, opset 18), with
weights inside the ``.onnx`` file (no external data): the bundle lists one file per encoder.

- ``text_encoder.onnx``: ``input_ids``, ``attention_mask`` int64 ``(N, T)`` -> ``sentence_embedding`` float32
  ``(N, 384)``; mean pooling and L2 normalisation are inside the graph. By default its MatMul weights are
  quantised to int8 (``onnx_precision: "int8-dynamic"``, :func:`quantize_text_encoder`): through the service's
  text encoder it costs 13.0 ms of CPU per ml100k-posters text instead of 27.5 (one thread, a loaded 2-core
  machine), at a cosine of 0.993 on average (0.984 at least) to the fp32 graph's embeddings
  (bench/results/text-encoder-int8.json). ``tokenizer.json`` is the package's
  tokenizer saved with truncation to ``max_length`` and batch-longest padding set (the packaged file pads and
  truncates to a fixed 128), so that a service that loads it and applies the manifest's ``max_length`` gets the
  training-time token ids either way.
- ``image_encoder.onnx``: ``pixels`` float32 ``(N, 3, 224, 224)`` -> ``features`` float32 ``(N, 1280)``; the
  preprocessing recipe (``resize``, ``size``, ``mean``, ``std``) goes into the manifest entry. fp32 by default;
  ``precision="int8-static"`` (:func:`quantize_image_encoder`, calibrated on the dataset's own images) costs 0.68x
  the CPU of a poster at a feature cosine of 0.990 on average (0.968 at least), but moves the item vectors a ridge
  map makes from the features more than the int8 text encoder does (bench/results/image-encoder-int8.json).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import bundle_format as bf
from models.base import ContentEncoder, UserTower
from training.data.encoders import (
    IMAGE_MEAN,
    IMAGE_RESIZE,
    IMAGE_SIZE,
    IMAGE_STD,
    ImageEncoder,
    TextEncoder,
    UnreadableImageError,
    preprocess_image,
)

ONNX_OPSET = 18
_BERT_MAX_POSITIONS = 512  # position-embedding table of MiniLM: the largest T the graph can take


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence two known, harmless warnings that torch 2.13's exporter raises from its own internals, and its
    log lines about torchvision operators (torchvision is not used here)."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
        )
        warnings.filterwarnings("ignore", message=r"# The axis name: ", category=UserWarning)
        yield


def export_onnx(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: list[str],
    output_name: str,
    dynamic_shapes: dict[str, Any],
    extra_output_names: tuple[str, ...] = (),
) -> None:
    """Export ``module``; ``extra_output_names`` name further outputs after the first (the module returns a tuple)."""
    with _quiet_exporter():
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=input_names,
            output_names=[output_name, *extra_output_names],
            dynamic_shapes=dynamic_shapes,
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def _export_modality_encoder(encoder: TextEncoder | ImageEncoder, kind: bf.EncoderKind, example: tuple[torch.Tensor, ...],
                             path: Path, *, inputs: list[str], output: str, dynamic_shapes: dict[str, Any],
                             ) -> dict[str, Any]:  # fmt: skip
    """Export a pretrained encoder's module; returns what a modality entry says of every shipped encoder: dim,
    name, kind, graph file, input and output names."""
    export_onnx(encoder.module, example, path, input_names=inputs, output_name=output, dynamic_shapes=dynamic_shapes)
    return {"dim": encoder.dim, "encoder": encoder.name, "encoder_kind": kind, "encoder_onnx": path.name,
            "onnx_inputs": inputs, "onnx_output": output}  # fmt: skip


def export_text_encoder(
    out_dir: str | os.PathLike[str], *, encoder: TextEncoder | None = None, precision: bf.EncoderPrecision = bf.INT8_DYNAMIC
) -> dict[str, Any]:
    """Write ``text_encoder.onnx`` and ``tokenizer.json`` into ``out_dir``; return the manifest's "text" entry.

    ``encoder`` defaults to a freshly loaded :class:`TextEncoder` on the CPU. ``precision``: "int8-dynamic" writes
    the graph quantised by :func:`quantize_text_encoder`, "fp32" the exported graph as is; the entry's
    ``onnx_precision`` says which.
    """
    if precision not in bf.TEXT_ENCODER_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(bf.TEXT_ENCODER_PRECISIONS)}, got {precision!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder = encoder if encoder is not None else TextEncoder(device="cpu")
    # Two texts of different lengths, so that the traced example has padding under the mask.
    input_ids, attention_mask = encoder.tokenize(["an example item text, long enough to pad", "short"])
    batch = torch.export.Dim("batch")
    tokens = torch.export.Dim("tokens", max=_BERT_MAX_POSITIONS)
    exported = out / bf.TEXT_ENCODER if precision == bf.FP32 else out / f"{bf.TEXT_ENCODER}.fp32-staging"
    entry = _export_modality_encoder(
        encoder, bf.TEXT, (input_ids.to(encoder.device), attention_mask.to(encoder.device)), exported,
        inputs=["input_ids", "attention_mask"], output="sentence_embedding",
        dynamic_shapes={"input_ids": {0: batch, 1: tokens}, "attention_mask": {0: batch, 1: tokens}},
    )  # fmt: skip
    if precision == bf.INT8_DYNAMIC:
        try:
            quantize_text_encoder(exported, out / bf.TEXT_ENCODER)
        finally:
            exported.unlink()
    encoder.tokenizer.save(str(out / bf.TEXT_TOKENIZER))
    return {**entry, "encoder_onnx": bf.TEXT_ENCODER, "onnx_precision": precision, "tokenizer": bf.TEXT_TOKENIZER,
            "max_length": encoder.max_length}  # fmt: skip


def quantize_text_encoder(fp32_graph: Path, out: Path) -> None:
    """Write ``fp32_graph`` with its MatMul weights in int8, one scale per output channel, and activations quantised
    at run time (onnxruntime's dynamic quantisation: DynamicQuantizeLinear + MatMulInteger operators).

    Measured on MiniLM against the fp32 graph over the 1,663 ml100k-posters item texts: cosine mean 0.993, min
    0.984, CPU 13.0 ms a text against 27.5 (bench/results/text-encoder-int8.json); on 200 of them, one scale per
    tensor gave cosine 0.955 (min 0.926), uint8 weights 0.980 (min 0.963), and quantising the embedding Gather too
    0.992 at the same speed. The embedding tables stay fp32: they cost no arithmetic.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    hint = _DropQuantizationHint()
    root.addFilter(hint)  # quantize_dynamic logs a pre-processing hint that applies to static quantisation
    try:
        quantize_dynamic(fp32_graph, out, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])
    finally:
        root.removeFilter(hint)


class _DropQuantizationHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


IMAGE_CALIBRATION_COUNT = 300  # posters whose activation ranges fix the int8-static scales: "a few hundred"
IMAGE_CALIBRATION_SEED = 0


def image_calibration_sample(images: Sequence[str | os.PathLike[str] | None], *, count: int = IMAGE_CALIBRATION_COUNT,
                             seed: int = IMAGE_CALIBRATION_SEED) -> list[Path]:  # fmt: skip
    """The calibration images of an int8-static image encoder: ``count`` of the existing files among ``images``
    (an item's image path, or None), drawn without replacement by a seeded generator, in the order of ``images``."""
    existing = sorted({Path(p) for p in images if p is not None and Path(p).is_file()}, key=str)
    if len(existing) <= count:
        return existing
    chosen = np.random.default_rng(seed).choice(len(existing), size=count, replace=False)
    return [existing[i] for i in sorted(chosen.tolist())]


def export_image_encoder(
    out_dir: str | os.PathLike[str],
    *,
    encoder: ImageEncoder | None = None,
    precision: bf.EncoderPrecision = bf.FP32,
    calibration_images: Sequence[Path] = (),
    calibration_method: str = "MinMax",
) -> dict[str, Any]:
    """Write ``image_encoder.onnx`` into ``out_dir``; return the manifest's "image" entry.

    ``encoder`` defaults to a freshly loaded :class:`ImageEncoder` on the CPU. ``precision``: "fp32" writes the
    exported graph as is; "int8-static" the graph quantised by :func:`quantize_image_encoder` with activation
    scales calibrated on ``calibration_images`` (image files; see :func:`image_calibration_sample`), required then.
    The entry's ``onnx_precision`` says which.
    """
    if precision not in bf.IMAGE_ENCODER_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(bf.IMAGE_ENCODER_PRECISIONS)}, got {precision!r}")
    if precision == bf.INT8_STATIC and not calibration_images:
        raise ValueError("an int8-static image encoder needs calibration images; none were given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder = encoder if encoder is not None else ImageEncoder(device="cpu")
    example = torch.zeros((2, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.float32, device=encoder.device)
    exported = out / bf.IMAGE_ENCODER if precision == bf.FP32 else out / f"{bf.IMAGE_ENCODER}.fp32-staging"
    entry = _export_modality_encoder(encoder, bf.IMAGE, (example,), exported, inputs=["pixels"],
                                     output="features", dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}})  # fmt: skip
    if precision == bf.INT8_STATIC:
        try:
            quantize_image_encoder(exported, out / bf.IMAGE_ENCODER, calibration_images, method=calibration_method)
        finally:
            exported.unlink()
    return {**entry, "encoder_onnx": bf.IMAGE_ENCODER, "onnx_precision": precision, "size": IMAGE_SIZE,
            "resize": IMAGE_RESIZE, "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)}  # fmt: skip


CALIBRATION_METHODS = ("MinMax", "Percentile", "Entropy")


class _PosterPixels:
    """onnxruntime's CalibrationDataReader over image files: one preprocessed image (1, 3, 224, 224) a read, as
    the service feeds the graph (:func:`training.data.encoders.preprocess_image`); undecodable files are skipped."""

    def __init__(self, images: Sequence[Path], input_name: str) -> None:
        self._images = iter(images)
        self._input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        for path in self._images:
            try:
                pixels = preprocess_image(path.read_bytes())
            except (OSError, UnreadableImageError):
                continue
            return {self._input_name: pixels[None]}
        return None


# The stem and the first two MBConv blocks (6 convolutions, at 112x112) stay fp32: quantisation noise entering there
# is carried through the whole network. On the ml100k-posters posters, all 49 convolutions in int8 gave a cosine to
# fp32 of 0.958 on average (0.847 at worst), the first 3 kept fp32 0.982 (0.953), the first 6 0.991 (0.979) at the
# same speed, the first 9 0.992 (0.982) but 10 ms an image instead of 8 (120 held-out posters, 60 calibrating).
IMAGE_FP32_LEADING_CONVOLUTIONS = 6


def quantize_image_encoder(fp32_graph: Path, out: Path, calibration_images: Sequence[Path], *, method: str = "MinMax",
                           fp32_leading_convolutions: int = IMAGE_FP32_LEADING_CONVOLUTIONS) -> None:  # fmt: skip
    """Write ``fp32_graph`` with int8 weights (one scale per output channel) and int8 activations whose scales are
    fixed from the activations of ``calibration_images`` (onnxruntime's static quantisation, QDQ format: each
    quantised tensor goes through QuantizeLinear/DequantizeLinear and onnxruntime fuses them into int8 kernels),
    except the first ``fp32_leading_convolutions`` convolutions in graph order, which stay fp32.

    Weights use 7 of their 8 bits (``reduce_range``): x86 CPUs without VNNI multiply uint8 activations by int8
    weights in int16 pairs that saturate at full range; on the ml100k-posters posters, every convolution in int8
    with full-range weights gave a cosine of 0.83 to fp32 on average (min 0.45) whatever the calibration method,
    7-bit weights 0.955 (min 0.80) (bench/results/image-encoder-int8.json has the measurement of the default).
    ``method`` ("MinMax", "Percentile", "Entropy") is how a tensor's range is chosen from the calibration
    activations; Percentile and Entropy measured no better than MinMax here. The graph is first pre-processed as
    onnxruntime advises (BatchNorm folded into the convolutions), so that the folded weights are what gets quantised.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_graph), str(prepared), skip_symbolic_shape=True)
        convolutions = [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Conv"]
        reader = _PosterPixels(calibration_images, "pixels")
        quantize_static(prepared, out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True,
                        nodes_to_exclude=convolutions[:fp32_leading_convolutions],
                        calibrate_method=getattr(CalibrationMethod, method),
                        calibration_providers=["CPUExecutionProvider"])  # fmt: skip


# ------------------------------------------------------------------------- the model's item encoder, user tower
class _PositionalInputs(nn.Module):
    """Gives the exporter named positional arguments (the encoder takes *args)."""

    def __init__(self, encoder: ContentEncoder, names: list[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs: torch.Tensor | tuple[torch.Tensor, ...] = self.encoder(*tensors)
        return outputs


def export_item_encoder(encoder: ContentEncoder, dims: dict[str, int], path: Path) -> list[dict[str, Any]]:
    """Write the item encoder as ONNX with inputs ``<modality>`` (N, d) and ``<modality>_mask`` (N, 1); returns the
    manifest's ``item_encoder.inputs``."""
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
    length = tower.max_length
    vectors = torch.randn(2, length, dim, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, length)
    mask[0, : length - 1] = 0.0  # a left-padded history of one item, and a full one
    batch = torch.export.Dim("batch", min=1)
    export_onnx(tower.eval(), (vectors * mask[..., None], mask), path, input_names=["item_vectors", "mask"],
                output_name="user_vector", dynamic_shapes={"item_vectors": {0: batch}, "mask": {0: batch}})  # fmt: skip
    return {"onnx": path.name, "max_length": length, "inputs": {"item_vectors": "item_vectors", "mask": "mask"},
            "output": "user_vector"}  # fmt: skip
