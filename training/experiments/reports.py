"""Markdown renderers of the experiment reports: the cold-start table (docs/cold-start.md) and the QARM tables
(docs/qarm-results.md). They read the JSON the experiments wrote; they compute no metric."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from training.runs import read_metrics, read_report, reported_runs

MODEL_LABELS = {"lightgcn": "LightGCN", "bpr": "BPR-MF", "vbpr": "VBPR", "r2mr": "R2MR", "qarm": "QARM"}
COLD_COLUMNS = ("recall@10", "recall@20", "ndcg@20", "recall@50")


def _fmt(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.4f}"


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _cold_model_row(dataset: str, name: str, by_seed: dict[str, Any]) -> str:
    rows = [by_seed[seed] for seed in sorted(by_seed, key=int)]
    cells = [_mean_sd([r["cold"]["metrics"][column] for r in rows]) for column in COLD_COLUMNS]
    warm = [_mean_sd([r[key] for r in rows if r[key] is not None]) for key in ("warm_valid_recall@20", "warm_test_recall@20")]
    epochs = ", ".join(str(r["best_epoch"]) for r in rows)
    caps = sorted({str(r["train_settings"].get("epochs", "preset")) for r in rows})
    encoder = rows[0]["cold"]["encoder"]
    return (f"| {dataset} | {MODEL_LABELS.get(name, name)} | {encoder} | {len(rows)} | {' | '.join(cells)} | "
            f"{' | '.join(warm)} | {epochs} (cap {', '.join(caps)}) |")  # fmt: skip


def _cold_users(report: dict[str, Any]) -> str:
    """How many users the cold items were ranked for (the same for every row of one report)."""
    rows = [row["cold"] for by_seed in report["runs"].values() for row in by_seed.values()]
    counts = {row["n_users"] for row in [*rows, *report["baselines"].values()] if "n_users" in row}
    return ", ".join(str(n) for n in sorted(counts)) or "–"


def render_cold_start_table(reports: list[dict[str, Any]]) -> str:
    """One row per (dataset, model): cold metrics as mean ± sd over training seeds, then the baselines."""
    lines = ["| dataset (cold items / users) | model | cold-item vector | seeds | cold Recall@10 | cold Recall@20 | "
             "cold NDCG@20 | cold Recall@50 | warm valid Recall@20 | warm test Recall@20 | best epoch (cap) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    commands: list[str] = []
    for report in reports:
        label = f"{report['dataset']} ({report['n_cold_items']} / {_cold_users(report)})"
        order = [name for name in MODEL_LABELS if name in report["runs"]] + sorted(set(report["runs"]) - set(MODEL_LABELS))
        lines += [_cold_model_row(label, name, report["runs"][name]) for name in order if report["runs"][name]]
        for name, row in report["baselines"].items():
            cells = [_fmt(row["metrics"].get(column)) for column in COLD_COLUMNS]
            lines.append(f"| {label} | {name} | {row.get('encoder', '–')} | – | {' | '.join(cells)} | – | – | – |")
        commands += report.get("commands", [])
    lines += ["", "Made by:", "", "```bash", *commands, "```", ""]
    return "\n".join(lines)


# ================================================================================================ the QARM tables
def _qarm_label(report: dict[str, Any]) -> str:
    config = report["qarm"]["config"]
    return f"QARM ({config['source']}, K={config['codebook_size']}, L={config['code_levels']}" + (
        f", {report['_tag']})" if report["_tag"] else ")")


def _qarm_warm_lines(reports: list[dict[str, Any]]) -> list[str]:
    lines = ["### Warm accuracy (test, at the best validation epoch; the dataset's own split)", "",
             "| dataset | model | Recall@10 | Recall@20 | NDCG@20 | valid Recall@20 | best epoch |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    warm = [r for r in reports if not r["n_cold_items"]]
    for dataset in sorted({r["dataset"] for r in warm}):
        rows = [r for r in warm if r["dataset"] == dataset]
        base = rows[0]["_lightgcn_metrics"]
        lines.append(f"| {dataset} | LightGCN (pairs mined from it) | {_fmt(base['test'].get('recall@10'))} | "
                     f"{_fmt(base['test'].get('recall@20'))} | {_fmt(base['test'].get('ndcg@20'))} | "
                     f"{_fmt(base['valid'].get('recall@20'))} | {base['best_epoch']} |")  # fmt: skip
        for r in rows:
            m = r["_metrics"]
            lines.append(f"| {dataset} | {_qarm_label(r)} | {_fmt(m['test'].get('recall@10'))} | {_fmt(m['test'].get('recall@20'))} | "
                         f"{_fmt(m['test'].get('ndcg@20'))} | {_fmt(m['valid'].get('recall@20'))} | {m['best_epoch']} |")  # fmt: skip
    return lines


def _qarm_cold_lines(reports: list[dict[str, Any]]) -> list[str]:
    lines = ["", "### Cold start (the one protocol of docs/cold-start.md: held-out items ranked among themselves)", "",
             "`warm valid`: the model's validation Recall@20 on the warm items.", "",
             "| dataset | model | cold Recall@10 | cold Recall@20 | cold NDCG@20 | cold Recall@50 | warm valid Recall@20 |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    cold = [r for r in reports if r["n_cold_items"]]
    for dataset in sorted({r["dataset"] for r in cold}):
        rows = [r for r in cold if r["dataset"] == dataset]
        first = rows[0]
        entries: list[tuple[str, dict[str, Any], Any]] = [
            (_qarm_label(r), r["cold_start"]["qarm"], r["_metrics"]["valid"].get("recall@20")) for r in rows]  # fmt: skip
        for name, row in first["cold_start"].items():
            if name != "qarm":
                valid = first["_lightgcn_metrics"]["valid"].get("recall@20") if name.startswith("lightgcn") else None
                entries.append((name, row, valid))
        for r in rows[1:]:
            for name, row in r["cold_start"].items():
                if name.startswith("content similarity (aligned") and name not in first["cold_start"]:
                    entries.append((name, row, None))
        for name, row, valid in entries:
            m = row.get("metrics", {})  # reports of the superseded protocols have none: their cells stay empty
            lines.append(f"| {dataset} ({first['n_cold_items']} cold items) | {name} | {_fmt(m.get('recall@10'))} | "
                         f"{_fmt(m.get('recall@20'))} | {_fmt(m.get('ndcg@20'))} | {_fmt(m.get('recall@50'))} | {_fmt(valid)} |")  # fmt: skip
    return lines


def _qarm_alignment_lines(reports: list[dict[str, Any]]) -> list[str]:
    lines = ["", "### Alignment (held-out mined pairs: is the target among the trigger's 10 nearest items?)", "",
             "| dataset | pairs U2I / I2I / distinct | raw features pair Recall@10 | aligned pair Recall@10 | best epoch |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in reports:
        a = r["alignment"]
        if "best_epoch" not in a or r["_tag"]:  # variants retrain the same head: one row per dataset
            continue
        p = r["pairs"]
        lines.append(f"| {r['dataset']} | {p['u2i']} / {p['i2i']} / {p['distinct']} | {_fmt(a.get('raw_valid_pair_recall@10'))} | "
                     f"{_fmt(a.get('valid_pair_recall@10'))} | {a['best_epoch']} |")  # fmt: skip
    return lines


def _qarm_quantiser_lines(reports: list[dict[str, Any]]) -> list[str]:
    lines = ["", "### Quantiser (residual k-means on the items with training interactions)", "",
             "Per level: share of centres used / entropy over log2 K. Collisions: share of items whose full code another "
             "item also has. Error: ‖x − x̂‖² / ‖x‖² after the last level.", ""]  # fmt: skip
    for r in reports:
        if r["_tag"] or not r.get("quantiser_grid"):
            continue
        lines += [f"**{r['dataset']}** ({r['qarm']['config']['source']} embeddings, {r['quantiser']['n_items']} items)", "",
                  "| K | L | use / entropy per level | distinct codes | collision rate | max items per code | error |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for g in r["quantiser_grid"]:
            levels = ", ".join(f"{lv['used_share']:.2f}/{lv['entropy_norm']:.2f}" for lv in g["levels"])
            lines.append(f"| {g['K']} | {g['L']} | {levels} | {g['distinct_codes']} | {g['collision_rate']:.3f} | "
                         f"{g['max_items_per_code']} | {g['relative_error']:.3f} |")  # fmt: skip
        lines.append("")
    return lines


def render_qarm_report(runs_root: Path) -> str:
    """Markdown tables of every QARM run under ``runs_root`` (their ``qarm_report.json`` and ``metrics.json``):
    warm accuracy next to the LightGCN each mined its pairs from, cold start, alignment, and the quantiser grid."""
    from training.experiments.qarm_pipeline import QARM_REPORT

    reports = []
    for run_dir in reported_runs(runs_root, "qarm", QARM_REPORT):
        report = read_report(run_dir, QARM_REPORT)
        metrics = read_metrics(run_dir)
        report["_metrics"], report["_tag"] = metrics, metrics.get("tag") or ""
        report["_lightgcn_metrics"] = read_metrics(Path(report["lightgcn"]["run_dir"]))
        reports.append(report)
    lines = ["<!-- generated by `mmrec qarm-report`: do not edit by hand -->", ""]
    for part in (_qarm_warm_lines, _qarm_cold_lines, _qarm_alignment_lines, _qarm_quantiser_lines):
        lines += part(reports)
    return "\n".join(lines) + "\n"
