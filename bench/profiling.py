"""Where a server's time goes under load: ``py-spy record --native`` while wrk runs, summarised by frame.

The summary counts samples per frame: *self* (the frame is the leaf: time spent in it, e.g. a BLAS kernel or a
futex wait) and *inclusive* (the frame is anywhere on the stack), as a share of all samples of the server's
busy threads. Line numbers are kept for the service's own code (which line waits: a lock, a search) and dropped
elsewhere so a library function counts once.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

RATE_HZ = 50  # samples per second: enough for a few seconds of profile, light on a 2-core machine
_LINE = re.compile(r":\d+\)$")
_INTERESTING = ("service/", "faiss", "gomp", "libopenblas", "onnxruntime", "torch", "redis", "json", "pydantic")


def py_spy_binary() -> str | None:
    return shutil.which("py-spy") or next((str(p) for p in [Path(sys.executable).with_name("py-spy")] if p.exists()), None)


def start_recording(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes] | None:
    binary = py_spy_binary()
    if binary is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [binary, "record", "--native", "--format", "raw", "--rate", str(RATE_HZ), "--duration", str(seconds),
               "--output", str(out), "--pid", str(pid)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarise(raw: Path, *, top: int = 25) -> dict[str, Any]:
    """Samples, and the top frames by self and by inclusive share (%), from py-spy's raw (collapsed) output."""
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [frame if "service/" in frame else _LINE.sub(")", frame) for frame in stack.split(";")]
        leaf[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return {"samples": 0, "self": [], "inclusive": []}

    def share(counter: Counter[str], keep: Any) -> list[list[Any]]:
        return [[frame, round(100 * n / total, 1)] for frame, n in counter.most_common() if keep(frame)][:top]

    return {
        "samples": total,
        "self": share(leaf, lambda frame: True),
        "inclusive": share(inclusive, lambda frame: any(key in frame for key in _INTERESTING)),
    }
