"""Where a server's time goes under load: ``py-spy record --native`` while wrk runs, summarised by frame.

The summary leaves out idle samples (threads of a pool waiting for work, the event loop in epoll) and counts the
others per frame: *self* (the frame is the leaf: time spent in it, e.g. a BLAS kernel, or a futex wait under a
lock) and *inclusive* (the frame is anywhere on the stack), as a share of those busy samples. Line numbers are kept for the service's own code (which line waits: a lock, a search) and dropped
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
_IDLE_FILES = ("threading.py", "queue.py", "selectors.py", "concurrent/futures/thread.py")
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


def idle(frames: list[str]) -> bool:
    """A thread waiting for work: its innermost Python frame is a condition/queue/selector wait (an idle thread of
    a pool), or it sits in epoll (the event loop with nothing to do). A wait on a lock of the service is not idle:
    its innermost Python frame is the service's line that takes the lock."""
    python = [frame for frame in frames if ".py" in frame]
    innermost = python[-1] if python else ""
    return frames[-1].startswith(("epoll_wait", "epoll_pwait")) or any(innermost.endswith(f"({name})") or f"({name}:" in innermost for name in _IDLE_FILES)


def summarise(raw: Path, *, top: int = 25) -> dict[str, Any]:
    """Samples, the share of idle ones, and the top frames by self and by inclusive share (%) of the busy samples
    (a thread running or blocked on something other than waiting for work), from py-spy's raw collapsed output."""
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = waiting = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame if "service/" in frame else _LINE.sub(")", frame) for frame in stack.split(";")]
        if idle(frames):
            waiting += n
            continue
        total += n
        leaf[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return {"samples": 0, "idle_samples": waiting, "self": [], "inclusive": []}

    def share(counter: Counter[str], keep: Any) -> list[list[Any]]:
        return [[frame, round(100 * n / total, 1)] for frame, n in counter.most_common() if keep(frame)][:top]

    return {
        "samples": total,
        "idle_samples": waiting,
        "self": share(leaf, lambda frame: True),
        "inclusive": share(inclusive, lambda frame: "service/cli.py" not in frame  # the main thread's entry point
                           and any(key in frame for key in _INTERESTING)),
    }
