"""Time what a new user waits for: `make demo` on a fresh clone until /readyz answers, then a re-run.

    python scripts/time_first_run.py                 # shared data (ml100k-posters), fresh venv and var/
    python scripts/time_first_run.py --bare          # MMREC_DATA_ROOT is an empty folder: text-only ml100k
    python scripts/time_first_run.py --home DIR      # MMREC_HOME=DIR (e.g. a copy holding prepared data)

Steps: ``git clone`` of this repository's HEAD into a temporary folder (uncommitted changes are not in it), then
``make demo`` there (a fresh ``.venv``: the install is part of the first time), polling
``http://127.0.0.1:PORT/readyz`` until it answers 200; the server is stopped by the process group of the ``make``
this script started; then ``make demo`` again in the same clone (the re-run: the install stamp, prepared data,
feature cache and bundle exist) and the same measurement. Prints both times and writes them, with ``uptime`` before
and after and each run's log, to ``--out`` (JSON). With ``--home`` set to a folder that already holds the
bundle, both runs serve it (the first one still installs): that times the install and a re-run only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group of ``process`` (make, mmrec, then mmrec-serve), SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def time_demo(clone: Path, env: dict[str, str], port: int, log: Path, timeout: float) -> dict[str, Any]:
    """Seconds from starting `make demo` until /readyz answers 200 (None if it exited or timed out first)."""
    if ready(port):
        raise SystemExit(f"something already answers on port {port}")
    started = time.perf_counter()
    with log.open("wb") as out:
        process = subprocess.Popen(["make", "demo", f"DEMO_ARGS=--port {port}"], cwd=clone, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            seconds: float | None = None
            while time.perf_counter() - started < timeout:
                if ready(port):
                    seconds = time.perf_counter() - started
                    break
                if process.poll() is not None:
                    break
                time.sleep(0.5)
        finally:
            exit_status = process.poll()
            stop(process)
    tail = log.read_text(errors="replace").splitlines()[-15:]
    outcome = "ready" if seconds is not None else ("exited" if exit_status is not None else "timed out")
    return {"seconds": None if seconds is None else round(seconds, 1), "outcome": outcome,
            "exit_status": exit_status, "log": str(log), "log_tail": tail}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help=f"the repository to clone (default {REPO})")
    parser.add_argument(
        "--bare", action="store_true", help="MMREC_DATA_ROOT is an empty folder (text-only ml100k)"
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                        help=f"the shared data (default {DEFAULT_DATA_ROOT}); ignored with --bare")  # fmt: skip
    parser.add_argument(
        "--home", type=Path, help="MMREC_HOME for both runs (default: var/ in the fresh clone)"
    )
    parser.add_argument(
        "--workdir", type=Path, help="where to clone (default: a new temporary folder, removed)"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for /readyz, per run")
    parser.add_argument("--out", type=Path, help="JSON to write (default: <workdir>/time_first_run.json)")
    args = parser.parse_args(argv)

    commit = subprocess.run(["git", "-C", str(args.repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mmrec-first-run-"))
    workdir.mkdir(parents=True, exist_ok=True)
    clone = workdir / "mmrec"
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(args.repo), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", commit], check=True)

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MMREC_") and k not in ("REDIS_URL", "PYTHONPATH", "VIRTUAL_ENV")}  # fmt: skip
    if args.bare:
        empty = workdir / "no-shared-data"
        empty.mkdir(exist_ok=True)
        env["MMREC_DATA_ROOT"] = str(empty)
    else:
        env["MMREC_DATA_ROOT"] = str(args.data_root.resolve())
    if args.home is not None:
        env["MMREC_HOME"] = str(args.home.resolve())
    port = free_port()
    report: dict[str, Any] = {"commit": commit, "mode": "bare" if args.bare else "shared",
                              "mmrec_data_root": env["MMREC_DATA_ROOT"],
                              "mmrec_home": env.get("MMREC_HOME", str(clone / "var")), "port": port,
                              "cpus": os.cpu_count(), "uptime_before": uptime()}  # fmt: skip
    print(f"clone of {commit[:12]} in {clone}; {report['uptime_before']}", flush=True)
    for name in ("first", "rerun"):
        print(f"{name}: make demo ...", flush=True)
        result = time_demo(clone, env, port, workdir / f"{name}.log", args.timeout)
        report[name] = result
        print(f"{name}: {result['outcome']} after {result['seconds']} s" if result["seconds"] is not None
              else f"{name}: {result['outcome']} (exit status {result['exit_status']}); log {result['log']}:\n  "
              + "\n  ".join(result["log_tail"]), flush=True)  # fmt: skip
        if result["seconds"] is None:
            break
    report["uptime_after"] = uptime()
    out = args.out or workdir / "time_first_run.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps({k: report[k]["seconds"] for k in ("first", "rerun") if k in report}),
        f"({report['mode']})",
    )
    print(f"wrote {out}; {report['uptime_after']}")
    if args.workdir is None and all(report.get(k, {}).get("seconds") is not None for k in ("first", "rerun")):
        shutil.rmtree(clone)  # keeps the logs and the JSON in the temporary folder
    return 0 if all(report.get(k, {}).get("seconds") is not None for k in ("first", "rerun")) else 1


if __name__ == "__main__":
    sys.exit(main())
