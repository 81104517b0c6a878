"""Where training reads raw data and writes prepared datasets, feature caches and runs.

The only module of ``training`` that reads environment variables, all optional:
- ``MMREC_DATA_ROOT``: the raw research datasets (default ``../shared/data`` next to the project root);
- ``MMREC_HOME``: everything this project writes (default ``var/`` in the project root);
- ``WORLD_SIZE``: set by ``torchrun``; above 1 the trainer trains with DistributedDataParallel;
- ``MMREC_REDIS_URL`` (or ``REDIS_URL``): the Redis that `mmrec demo` hands to the service (default: none, the
  service's embedded cache).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Paths:
    data_root: Path
    home: Path

    @property
    def datasets(self) -> Path:
        return self.home / "datasets"

    @property
    def runs(self) -> Path:
        return self.home / "runs"

    @property
    def bundles(self) -> Path:
        return self.home / "bundles"

    @property
    def feature_cache(self) -> Path:
        return self.home / "feature-cache"

    @property
    def downloads(self) -> Path:
        return self.home / "downloads"


def default_paths() -> Paths:
    data_root = Path(os.environ.get("MMREC_DATA_ROOT", PROJECT_ROOT.parent / "shared" / "data"))
    home = Path(os.environ.get("MMREC_HOME", PROJECT_ROOT / "var"))
    return Paths(data_root=data_root.resolve(), home=home.resolve())


def world_size() -> int:
    """Processes in the ``torchrun`` job (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def redis_url() -> str | None:
    """The Redis URL for the served demo, or None for the service's embedded cache."""
    return os.environ.get("MMREC_REDIS_URL") or os.environ.get("REDIS_URL") or None
