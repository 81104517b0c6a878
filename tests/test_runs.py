"""training/runs.py: reading run directories needs no torch; checkpoints are checked before use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.runs import CHECKPOINT_FILE, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_importing_runs_leaves_torch_out() -> None:
    code = "import sys, training.runs; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert result.stdout.strip() == "False"


def test_read_checkpoint_of_a_directory_without_one_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"init_from: {tmp_path} has no {CHECKPOINT_FILE}"):
        read_checkpoint(tmp_path, reader="init_from: ")


def test_read_checkpoint_refuses_another_format(tmp_path: Path) -> None:
    torch.save({"format": 99, "model": "bpr"}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="checkpoint format 99, expected 1"):
        read_checkpoint(tmp_path)


def test_corruption_record_round_trips_and_a_clean_run_has_none(tmp_path: Path) -> None:
    from training.runs import CorruptionRecord, read_corruption, write_corruption

    assert read_corruption(tmp_path) is None
    record = CorruptionRecord(dataset="ml100k-posters", kind="swapped", fraction=0.4, seed=3,
                              damaged=(("12", "image"), ("7", "text"), ("9", "image")))  # fmt: skip
    write_corruption(tmp_path, record)
    assert read_corruption(tmp_path) == record
    assert record.damaged_by_modality() == {"image": {"12", "9"}, "text": {"7"}}
