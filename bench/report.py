"""Tables (Markdown) and the throughput-vs-p99 figure (PNG) of a ``bench.serving`` result.

    python -m bench.report bench/results/quick      # re-render serving.md and serving.png from serving.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LABELS = {
    "service": "service, uncached (embedded)",
    "service-nobatch": "service, uncached, micro-batching off",
    "service-redis": "service, uncached (Redis)",
    "service-ivf": "service, approximate index (IVF), uncached",
    "service-ivf-ip": "service, inner-product IVF (ivf_flat_ip), uncached",
    "service-ivf-redis": "service, IVF, uncached (Redis)",
    "service-ivf-2proc": "service, IVF, uncached (Redis, 2 worker processes)",
    "service-redis-2proc": "service, uncached (Redis, 2 worker processes)",
    "service-cached": "service, cache hit (embedded)",
    "service-redis-cached": "service, cache hit (Redis)",
    "naive": "naive torch reference",
    "floor-async": "trivial endpoint, async",
    "floor-sync": "trivial endpoint, sync",
}
ISSUE_INGEST_C8 = 48.0  # items/s at c=8 when issue 11 was filed (text + poster)


def _n(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def render_markdown(results: dict[str, Any]) -> str:
    meta, summary = results["meta"], results["summary"]
    settings = meta["settings"]
    lines = [
        f"# Serving benchmark ({', '.join(settings['sizes'])} items; {settings['reps']} repetition(s))",
        "",
        f"`{meta['command']}` — started {meta['started']}, {meta.get('seconds', 0) / 60:.1f} min; checkout "
        f"`{meta['git_commit'][:10]}`{' (uncommitted changes)' if meta['git_dirty'] else ''}.",
        f"Machine: {meta['cpu']}, {meta['cores']} cores, {meta['memory_gib']} GiB; load average "
        f"{' / '.join(f'{x:.1f}' for x in meta['loadavg_start'])} at the start, "
        f"{' / '.join(f'{x:.1f}' for x in meta.get('loadavg_end', []))} at the end (other work shares these cores: "
        "see *other CPU* below). wrk: 1 thread, closed loop, "
        f"{settings['duration_s']:g} s per point after {settings['warmup_s']:g} s of warm-up per server start; "
        f"`GET /v1/users/{{id}}/recommendations?k={settings['k']}`. Medians over repetitions.",
        "",
    ]
    others = sorted(run["other_cpu_cores"] for run in results["runs"])
    if others and others[len(others) // 2] > 0.3:
        lines += [f"**Other processes used {others[len(others) // 2]:.2f} of the {meta['cores']} cores during the "
                  "median point of this run: absolute numbers are depressed (CPU-bound variants most), and ratios "
                  "between variants measured minutes apart carry that noise.**", ""]  # fmt: skip
    lines += _goals(results)
    for size, variants in summary["points"].items():
        lines += _size_tables(size, variants, summary["peaks"].get(size, {}))
    lines += _startup_table(results)
    lines += _recall_table(results)
    lines += _ingestion_table(results)
    lines += _profiles(results)
    notes = list(results["notes"])
    for record in results["starts"]:
        if "error" in record:
            notes.append(f"{record['size']} {record['variant']} rep {record['rep']}: {record['error']}")
    if notes:
        lines += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    return "\n".join(lines)


def _goals(results: dict[str, Any]) -> list[str]:
    summary = results["summary"]
    size = "1m" if "1m" in summary["peaks"] else next(iter(summary["peaks"]), None)
    if size is None:
        return []
    peaks = summary["peaks"][size]

    def peak(variant: str) -> dict[str, Any]:
        found: dict[str, Any] = peaks.get(variant, {})
        return found

    svc, naive, nobatch, ivf = peak("service"), peak("naive"), peak("service-nobatch"), peak("service-ivf")
    hit, rhit, floor = peak("service-cached"), peak("service-redis-cached"), peak("floor-async")
    recall = next((r for r in results["recall"] if r["size"] == size and r["variant"] == "service-ivf"), None)
    rows = [
        ("exact, uncached: service peak / naive peak (p99 at the service's peak)",
         f"{_ratio(svc.get('req_per_s'), naive.get('req_per_s'))} ({_n(svc.get('req_per_s'))} vs "
         f"{_n(naive.get('req_per_s'))} req/s; p99 {_n(svc.get('p99_ms'))} ms at c={svc.get('connections', '–')})",
         "≥ 5×, p99 ≤ 250 ms"),
        ("exact, uncached: service / micro-batching off",
         f"{_ratio(svc.get('req_per_s'), nobatch.get('req_per_s'))} ({_n(nobatch.get('req_per_s'))} req/s off)", "≥ 3×"),
        ("approximate index: service-ivf peak / naive peak",
         f"{_ratio(ivf.get('req_per_s'), naive.get('req_per_s'))} (recall@20 "
         f"{recall['recall_at_20'] if recall else '–'} via the API)", "≥ 10× at recall@20 ≥ 0.95"),
        *[(f"{LABELS[variant]}: peak / naive peak",
           f"{_ratio(peak(variant).get('req_per_s'), naive.get('req_per_s'))} ({_n(peak(variant).get('req_per_s'))} req/s; "
           f"p99 {_n(peak(variant).get('p99_ms'))} ms at c={peak(variant).get('connections', '–')})", target)
          for variant, target in (("service-redis-2proc", "≥ 5×, p99 ≤ 250 ms"), ("service-ivf-2proc", "≥ 10× at recall@20 ≥ 0.95"),
                                  ("service-ivf-ip", "(the earlier index kind: ≥ 10× at recall@20 ≥ 0.95)"))
          if peak(variant)],
        ("cache hits, embedded: / async floor",
         f"{_ratio(hit.get('req_per_s'), floor.get('req_per_s'))} ({_n(hit.get('req_per_s'))} vs "
         f"{_n(floor.get('req_per_s'))} req/s)", "≥ 0.70×"),
        ("cache hits, Redis: / async floor", _ratio(rhit.get("req_per_s"), floor.get("req_per_s")), "≥ 0.50×"),
    ]  # fmt: skip
    ingest = summary.get("ingestion") or {}
    if ingest:
        rows += [
            ("ingestion (text + image) at c=8, vs 48 items/s when filed",
             f"{_ratio(ingest['c8_items_per_s'], ISSUE_INGEST_C8)} ({_n(ingest['c8_items_per_s'], 1)} items/s)", "≥ 3×"),
            ("POST → recommendable, p99: served by /similar; in a matching user's list",
             f"{_n(ingest['visible_p99_ms'], 1)} ms; {_n(ingest['listed_p99_ms'], 1)} ms "
             f"({_n(ingest['items_with_a_matching_user'])} of {_n(ingest['recommendable_items'])} items have such a user)",
             "≤ 100 ms"),
        ]  # fmt: skip
    start = summary["starts"].get(size, {}).get("service", {})
    bundle = results["bundles"].get(f"{size}-exact", {})
    data_mib = sum(bundle.get("file_bytes", {}).get(f, 0) for f in ("item_vectors.npy", "item_index.faiss")) / 2**20
    if start:
        rows += [
            ("start-up to /readyz", f"{_n(start.get('startup_s'), 2)} s", "≤ 2 s (1M)"),
            ("peak RSS vs item vectors + index files",
             f"{_n(start.get('peak_rss_mib'))} MiB vs {_n(data_mib)} MiB (bound {_n(1.3 * data_mib + 200 / 1.048576)} MiB)",
             "≤ 1.3 × files + 200 MB"),
        ]  # fmt: skip
    lines = [f"## Goals of issue 11 ({size} items)", "", "| goal | this run | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return [*lines, ""]


def _size_tables(size: str, variants: dict[str, dict[str, Any]], peaks: dict[str, Any]) -> list[str]:
    connections = sorted({int(c) for by_c in variants.values() for c in by_c})
    lines = [f"## {size} items, k = 20: throughput", ""]
    head = ["variant", *[f"c={c} req/s" for c in connections], "peak (c)", f"p50 / p99 at c={connections[-1]} ms",
            "CPU ms/req (c=1 / max)", "cache hit rate"]  # fmt: skip
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, by_c in variants.items():
        last = by_c.get(str(connections[-1]), {})
        first = by_c.get(str(connections[0]), {})
        peak = peaks.get(variant, {})
        hit = last.get("cache_hit_rate")
        cells = [LABELS.get(variant, variant), *[_n(by_c.get(str(c), {}).get("req_per_s")) for c in connections],
                 f"{_n(peak.get('req_per_s'))} ({peak.get('connections', '–')})",
                 f"{_n(last.get('p50_ms'), 1)} / {_n(last.get('p99_ms'), 1)}",
                 f"{_n(first.get('cpu_ms_per_req'), 2)} / {_n(last.get('cpu_ms_per_req'), 2)}",
                 "–" if hit is None else f"{hit:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"## {size} items: latency p50 / p99 (ms), server cores used, other CPU on the host (cores)", ""]
    head = ["variant", *[f"c={c}" for c in connections], f"server cores at c={connections[-1]}", "other CPU", "failed"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, by_c in variants.items():
        last = by_c.get(str(connections[-1]), {})
        cells = [LABELS.get(variant, variant),
                 *[f"{_n(by_c.get(str(c), {}).get('p50_ms'), 1)} / {_n(by_c.get(str(c), {}).get('p99_ms'), 1)}" for c in connections],
                 _n(last.get("server_cores"), 2),
                 _n(max((p.get("other_cpu_cores") or 0.0) for p in by_c.values()), 2),
                 str(sum(p["failed"] for p in by_c.values()))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _startup_table(results: dict[str, Any]) -> list[str]:
    starts = results["summary"]["starts"]
    if not starts:
        return []
    lines = ["## Start-up and memory (medians over server starts)", "",
             "| size | variant | start-up to /readyz (s) | RSS at ready (MiB) | peak RSS after load (MiB) | "
             "item vectors + index files (MiB) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for size, variants in starts.items():
        for variant, record in variants.items():
            kind = ("approximate-ip" if variant == "service-ivf-ip" else
                    "approximate" if variant.startswith("service-ivf") else "exact")  # fmt: skip
            files = results["bundles"].get(f"{size}-{kind}", {}).get("file_bytes", {})
            data = sum(files.get(f, 0) for f in ("item_vectors.npy", "item_index.faiss")) / 2**20
            shown = variant.startswith("service") or variant == "naive"
            lines.append(f"| {size} | {LABELS.get(variant, variant)} | {_n(record['startup_s'], 2)} | "
                         f"{_n(record['ready_rss_mib'])} | {_n(record['peak_rss_mib'])} | "
                         f"{_n(data) if shown else '–'} |")  # fmt: skip
    return [*lines, ""]


def _recall_table(results: dict[str, Any]) -> list[str]:
    if not results["recall"]:
        return []
    lines = ["## recall@20 against exact search (numpy, through the API, `exclude_seen=false`)", "",
             "| size | variant | index | params | recall@20 at export (manifest) | recall@20 measured | users |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["recall"]:
        index = r["index"]
        lines.append(f"| {r['size']} | {LABELS.get(r['variant'], r['variant'])} | {index['type']} | "
                     f"{index.get('params') or '–'} | {index.get('recall_at_20', '–')} | {r['recall_at_20']} | {r['users']} |")  # fmt: skip
    return [*lines, ""]


def _ingestion_table(results: dict[str, Any]) -> list[str]:
    records = [r for r in results["ingestion"] if "error" not in r]
    if not records:
        return []
    s = results["summary"]["ingestion"]
    first = records[0]
    return [
        f"## Ingestion: text + image, real bundle `{first['bundle_version']}` ({first['n_items']} items)", "",
        f"Content: {first['content']}. One item per POST, new ids, embedded mode.", "",
        "| measure | value |", "|---|---|",
        f"| items/s at c=1 (p50 / p99 ms) | {_n(s['c1_items_per_s'], 1)} ({_n(s['c1_p50_ms'], 1)} / {_n(s['c1_p99_ms'], 1)}) |",
        f"| items/s at c=8 (p50 / p99 ms) | {_n(s['c8_items_per_s'], 1)} ({_n(s['c8_p50_ms'], 1)} / {_n(s['c8_p99_ms'], 1)}) |",
        f"| server CPU per item (ms) | {_n(s['cpu_ms_per_item'], 1)} |",
        f"| POST start → served by /similar, p50 / p99 (ms) | {_n(s['visible_p50_ms'], 1)} / {_n(s['visible_p99_ms'], 1)} |",
        f"| POST start → in its matching user's top-100 list, p50 / p99 (ms) | {_n(s['listed_p50_ms'], 1)} / {_n(s['listed_p99_ms'], 1)} |",
        f"| items timed / with a matching user / not listed within 5 s | {_n(s['recommendable_items'])} / "
        f"{_n(s['items_with_a_matching_user'])} / {_n(s['not_listed_within_deadline'])} |",
        f"| served by /similar / in the user's list on the first GET after the POST's answer | "
        f"{_n(s.get('visible_on_the_first_get'))} / {_n(s.get('listed_on_the_first_get'))} |",
        f"| start-up (s) / peak RSS (MiB) | {_n(s['startup_s'], 2)} / {_n(s['peak_rss_mib'])} |",
        "",
    ]  # fmt: skip


def _profiles(results: dict[str, Any]) -> list[str]:
    profiles = [p for p in results.get("profiles", []) if p["samples"]]
    if not profiles:
        return []
    lines = ["## Profiles (py-spy --native, first repetition, each variant at its best concurrency)", "",
             "Share of the busy samples (threads waiting for work and the idle event loop left out; *idle* is their "
             "count). *In*: the frame is on the stack (project code, FAISS, "
             "BLAS/OpenMP, onnxruntime, torch, Redis, JSON/pydantic; one frame per share, as the wrappers of a call "
             "chain share their callee's); *leaf*: the frame is where time is spent (a bare `libc` address under a "
             "lock or a queue is usually a futex wait).", "",
             "| size | variant (c) | busy / idle samples | top frames, in | top leaves |", "|---|---|---|---|---|"]  # fmt: skip
    for p in profiles:
        shown: list[list[Any]] = []
        for frame, pct in p["inclusive"]:  # one frame per call chain: wrappers share their callee's share
            if len(shown) < 6 and all(abs(pct - other) > 0.5 for _, other in shown):
                shown.append([frame, pct])
        inclusive = "<br>".join(f"{pct}% {_short_frame(frame)}" for frame, pct in shown)
        leaves = "<br>".join(f"{pct}% {_short_frame(frame)}" for frame, pct in p["self"][:4])
        lines.append(f"| {p['size']} | {LABELS.get(p['variant'], p['variant'])} (c={p['connections']}) | {p['samples']} / {p.get('idle_samples', 0)} | "
                     f"{inclusive} | {leaves} |")  # fmt: skip
    return [*lines, ""]


def _short_frame(frame: str, width: int = 90) -> str:
    """A C++ frame can be a page long: keep its start and its library."""
    if len(frame) <= width:
        return frame
    name, _, where = frame.rpartition(" (")
    return f"{name[: width - len(where) - 6]}… ({where}"


def render_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = results["summary"]["points"]
    if not points:
        return
    fig, axes = plt.subplots(1, len(points), figsize=(7.5 * len(points), 5.5), squeeze=False)
    for ax, (size, variants) in zip(axes[0], points.items(), strict=True):
        for variant, by_c in variants.items():
            cs = sorted(by_c, key=int)
            x = [by_c[c]["req_per_s"] for c in cs]
            y = [by_c[c]["p99_ms"] for c in cs]
            (line,) = ax.plot(x, y, marker="o", label=LABELS.get(variant, variant))
            for c, xi, yi in zip(cs, x, y, strict=True):
                ax.annotate(f"c={c}", (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7,
                            color=line.get_color())  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("throughput (req/s, median)")
        ax.set_ylabel("p99 latency (ms, median)")
        connections = sorted({int(c) for by_c in variants.values() for c in by_c})
        ax.set_title(f"{size} items, k = 20 (wrk -t1, c = {'/'.join(map(str, connections))})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.report", description="Re-render a run's tables and figure.")
    parser.add_argument("folder", type=Path, help="a results folder holding serving.json")
    args = parser.parse_args(argv)
    results = json.loads((args.folder / "serving.json").read_text())
    (args.folder / "serving.md").write_text(render_markdown(results))
    render_plot(results, args.folder / "serving.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
