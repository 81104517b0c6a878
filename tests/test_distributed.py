"""The trainer under torchrun (2 CPU processes, gloo) learns what one process learns, within 1e-4."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")
TOLERANCE = 1e-4  # float summation order differs between one process and two averaged shards


def _run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.mark.timeout(400)
def test_trainer_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    one, two = tmp_path / "one.npy", tmp_path / "two.npy"
    _run([sys.executable, str(WORKER), str(one)], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(two)],
         tmp_path)  # fmt: skip
    a, b = np.load(one), np.load(two)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=TOLERANCE, rtol=0)
    assert float(one.with_suffix(".recall").read_text()) == pytest.approx(float(two.with_suffix(".recall").read_text()), abs=1e-6)
