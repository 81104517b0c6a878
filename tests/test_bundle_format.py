"""bundle_format.modality_encoder_kind and modality_encoder_precision: the rules by which the service and the
benchmarks read a modality's shipped encoder (its kind: format 2 names it, format 1 is read by its keys; its
arithmetic: fp32 unless the entry says otherwise)."""

from __future__ import annotations

from typing import Any

import pytest

import bundle_format as bf


@pytest.mark.parametrize(
    ("entry", "version", "kind"),
    [
        ({"dim": 128}, 2, None),  # no encoder shipped (audio)
        ({"dim": 384, "encoder_onnx": bf.TEXT_ENCODER, "encoder_kind": "text", "tokenizer": "t.json"}, 2, "text"),
        ({"dim": 1280, "encoder_onnx": bf.IMAGE_ENCODER, "encoder_kind": "image"}, 2, "image"),
        ({"dim": 384, "encoder_onnx": bf.TEXT_ENCODER, "tokenizer": bf.TEXT_TOKENIZER}, 1, "text"),
        ({"dim": 1280, "encoder_onnx": bf.IMAGE_ENCODER, "resize": 256}, 1, "image"),
        ({"dim": 1280, "encoder_onnx": bf.IMAGE_ENCODER, "encoder_kind": "image", "tokenizer": "x"}, 1, "image"),
    ],
)
def test_modality_encoder_kind_reads_the_entry(entry: dict[str, Any], version: int, kind: str | None) -> None:
    assert bf.modality_encoder_kind(entry, format_version=version) == kind


@pytest.mark.parametrize("named", [None, "audio", "TEXT"])
def test_modality_encoder_kind_refuses_an_unknown_kind_in_format_2(named: str | None) -> None:
    entry = {"dim": 8, "encoder_onnx": "x.onnx", **({} if named is None else {"encoder_kind": named})}
    with pytest.raises(ValueError, match=f"encoder_kind must be one of text, image, got {named!r}"):
        bf.modality_encoder_kind(entry, format_version=2)


@pytest.mark.parametrize(
    ("entry", "precision"),
    [
        ({"dim": 384, "encoder_onnx": bf.TEXT_ENCODER, "encoder_kind": "text"}, "fp32"),  # written before the field
        ({"dim": 384, "encoder_onnx": bf.TEXT_ENCODER, "onnx_precision": "fp32"}, "fp32"),
        ({"dim": 384, "encoder_onnx": bf.TEXT_ENCODER, "onnx_precision": "int8-dynamic"}, "int8-dynamic"),
        ({"dim": 1280, "encoder_onnx": bf.IMAGE_ENCODER, "encoder_kind": "image"}, "fp32"),  # written before the field
        ({"dim": 1280, "encoder_onnx": bf.IMAGE_ENCODER, "onnx_precision": "int8-static"}, "int8-static"),
    ],
)
def test_modality_encoder_precision_reads_the_entry(entry: dict[str, Any], precision: str) -> None:
    assert bf.modality_encoder_precision(entry) == precision


@pytest.mark.parametrize("named", [None, "int8", "FP32", "int8-Static", 8])
def test_modality_encoder_precision_refuses_an_unknown_precision(named: object) -> None:
    with pytest.raises(ValueError, match=f"onnx_precision must be one of fp32, int8-dynamic, int8-static, got {named!r}"):
        bf.modality_encoder_precision({"dim": 8, "encoder_onnx": "x.onnx", "onnx_precision": named})


def test_each_encoder_kind_writes_precisions_that_readers_accept() -> None:
    assert set(bf.TEXT_ENCODER_PRECISIONS) | set(bf.IMAGE_ENCODER_PRECISIONS) == set(bf.ENCODER_PRECISIONS)
    for precision in bf.ENCODER_PRECISIONS:
        assert bf.modality_encoder_precision({"onnx_precision": precision}) == precision
