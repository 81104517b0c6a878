"""bundle_format.modality_encoder_kind: the one rule by which the service and the benchmarks tell a modality's
shipped encoder apart (format 2 names it; format 1 is read by its keys)."""

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
