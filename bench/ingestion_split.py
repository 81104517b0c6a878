"""Where an ingested item's server CPU goes, by what the item carries: ``POST /v1/items`` at c = 8 against one fresh
``python -m service.cli`` (as ``bench.variants`` starts it), items with text and poster, text only, poster only, and
a one-word text (the HTTP, validation, durable state and catalogue work around a trivial encoder run), interleaved
and repeated; server CPU ms per item from ``/proc/<pid>/stat``.

    python -m bench.ingestion_split --bundle var/bundles/ml100k-posters-lightgcn --items 120 --reps 2 \\
        --out bench/results/ingestion-split.json

Content: ml100k-posters movies (``bench.ingestion.ingestion_content``). Prints one line per kind and repetition.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.variants import ROOT, start

CONCURRENCY = 8
KINDS = ("text+poster", "text", "poster", "one-word text")


def content_of(kind: str, text: str, image: str) -> tuple[str | None, str | None]:
    """The (text, image base64) an item of ``kind`` is posted with."""
    return {"text+poster": (text, image), "text": (text, None), "poster": (None, image),
            "one-word text": ("film", None)}[kind]  # fmt: skip


def post_all(url: str, content: list[tuple[str | None, str | None]], id_prefix: str) -> float:
    """Post every item from CONCURRENCY threads (``bench.ingestion.run_ingestion``); seconds taken. Every answer must
    be 201."""
    from bench.ingestion import run_ingestion

    found = run_ingestion(url, content, concurrency=CONCURRENCY, id_prefix=id_prefix)
    if found["created"] != len(content):
        raise SystemExit(f"POST /v1/items answered {found['statuses']}: {found['failures']}")
    return float(found["seconds"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingestion_split", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="a bundle with text and image encoders")
    parser.add_argument("--items", type=int, default=120, help="items a kind and repetition")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ingestion-split.json"))
    args = parser.parse_args(argv)
    from bench.ingestion import ingestion_content

    content, source = ingestion_content(16 + args.items * args.reps * len(KINDS))
    work = Path(tempfile.mkdtemp(prefix="bench-ingestion-split-"))
    server, state = start(Path(args.bundle).resolve(), ROOT, {}, work, "split")
    records: list[dict[str, Any]] = []
    try:
        post_all(server.url, [content_of("text+poster", t, i) for t, i in content[:16]], "warm")
        taken = 16
        for rep in range(args.reps):
            for kind in KINDS:
                items = content[taken:taken + args.items]
                taken += args.items
                posted = [content_of(kind, t, i) for t, i in items]
                cpu = server.cpu_seconds()
                seconds = post_all(server.url, posted, f"{kind.replace(' ', '-')}-{rep}")
                used = server.cpu_seconds() - cpu
                record = {"kind": kind, "rep": rep, "items": len(posted), "items_per_s": round(len(posted) / seconds, 1),
                          "server_cpu_ms_per_item": round(1000 * used / len(posted), 2)}  # fmt: skip
                records.append(record)
                print(f"rep {rep} {kind:14s} {record['items_per_s']:6.1f} items/s  {record['server_cpu_ms_per_item']:6.2f} "
                      "server CPU ms/item", flush=True)  # fmt: skip
    finally:
        server.stop()
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    medians = {kind: float(np.median([r["server_cpu_ms_per_item"] for r in records if r["kind"] == kind])) for kind in KINDS}
    meta = {"command": "python -m bench.ingestion_split " + " ".join(argv if argv is not None else sys.argv[1:]),
            "bundle": str(Path(args.bundle).resolve()), "content": source, "concurrency": CONCURRENCY,
            "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    Path(args.out).write_text(json.dumps({"meta": meta, "median_server_cpu_ms_per_item": medians, "records": records},
                                         indent=1) + "\n")  # fmt: skip
    print("medians:", json.dumps(medians))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
