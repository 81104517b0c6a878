"""One measurement's JSON under bench/results: the figures plus how and under what load they were taken."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_measurement(out: Path, command: str, found: Mapping[str, Any], *, load_before: float) -> None:
    """Write ``{"meta": …, **found}`` to ``out`` (meta: the command, start time, CPUs, 1-minute load average before
    and after) and print ``found``."""
    meta = {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, **found}, indent=1))
    print(json.dumps(dict(found), indent=1))
