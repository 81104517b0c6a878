"""The QARM pipeline (docs/qarm.md), from one call (`mmrec qarm`); each step lives in its own module.

1. A trained LightGCN (the best run of the dataset by VALIDATION Recall@20, trained here if there is none) gives
   item vectors; (trigger, target) pairs are mined from them (``qarm_pairs``).
2. The alignment head (``models.qarm.AlignmentHead``) is trained on the frozen encoder features with an in-batch
   contrastive loss over the pairs; the epoch is chosen on held-out pairs, never on test (``qarm_alignment``).
3. FAISS k-means, level by level on the residuals, fits L codebooks of K centres on the embeddings of the items that
   have training interactions; held-out items are coded afterwards, as new items are at serving time
   (``qarm_quantiser``, with the (K, L) grid report).
4. The QARM recommender is trained by the one trainer, its head and codebooks installed by the ``initialise`` hook.
5. With ``cold_share`` > 0: the project's one cold-start protocol (``cold_protocol``) on a derived prepared dataset
   ``<name>-cold<pct>s<seed>`` — QARM, its LightGCN (through the ridge map, as the bundle does) and content
   similarity with the raw and the aligned features, all ranked by the same evaluator.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.base import Recommender
from models.config import build_config, config_to_dict
from models.qarm import QARM, AlignmentHead, QARMConfig, content_embedder
from training.data.dataset import TRAIN, InteractionDataset
from training.data.inputs import model_inputs
from training.experiments.cold_protocol import (
    ColdSplit,
    ensure_cold_dataset,
    evaluate_cold_content_similarity,
    evaluate_cold_model,
    random_expectation,
    read_cold_split,
)
from training.experiments.qarm_alignment import (
    AlignmentTrainConfig,
    content_tensors,
    embed_items,
    train_alignment,
)
from training.experiments.qarm_pairs import mine_pairs, pair_recall, split_pairs
from training.experiments.qarm_quantiser import (
    ResidualCodebooks,
    faiss_residual_encode,
    fit_residual_kmeans,
    quantiser_grid,
    quantiser_report,
)
from training.fit.trainer import TrainConfig, TrainResult, train
from training.runs import has_checkpoint, load_run, read_config, read_metrics, run_directories, write_report

log = logging.getLogger(__name__)

QARM_REPORT = "qarm"  # the report each QARM run keeps in its run directory (qarm_report.json)
INHERITED = ("embedding_size", "n_layers", "reg_weight")  # LightGCN's validated graph settings QARM starts from


@dataclass(frozen=True)
class PipelineConfig:
    cold_share: float = 0.0  # share of items held out entirely (0: the dataset's own warm split)
    cold_seed: int = 2024
    grid_sizes: tuple[int, ...] = (8, 16, 32, 64)  # K values of the quantiser report
    grid_levels: tuple[int, ...] = (2, 3, 4)  # L values of the quantiser report
    kmeans_iterations: int = 25  # faiss.Kmeans niter (its default)
    seed: int = 2024


def best_run(runs_root: Path, dataset: str, model: str, *, metric: str = "recall@20") -> Path | None:
    """The untagged run of ``model`` on ``dataset`` with the best VALIDATION ``metric`` (None if there is none)."""
    best: tuple[float, Path] | None = None
    for run_dir in run_directories(runs_root, dataset, model):
        if not has_checkpoint(run_dir):
            continue
        metrics = read_metrics(run_dir)
        if metrics.get("tag"):
            continue
        score = float(metrics.get("valid", {}).get(metric, float("-inf")))
        if best is None or score > best[0]:
            best = (score, run_dir)
    return None if best is None else best[1]


# ====================================================================================== the steps, one by one
@dataclass(frozen=True)
class Alignment:
    embedder: torch.nn.Module  # the AlignmentHead at its chosen epoch, or the RawFeatureFusion of the ablation
    state: dict[str, torch.Tensor] | None  # the trained head's weights (None for the raw ablation)
    embeddings: np.ndarray  # (I, d_e) every item's embedding: what the codes quantise
    report: dict[str, Any]


def align(config: QARMConfig, dataset: InteractionDataset, train_pairs: np.ndarray, valid_pairs: np.ndarray, *,
          eligible: np.ndarray, align_config: AlignmentTrainConfig, echo: Callable[[str], None]) -> Alignment:  # fmt: skip
    """Step 2: the embedding the codes quantise, aligned (a trained head) or raw (the ablation)."""
    inputs = model_inputs(dataset)
    content = content_tensors(inputs, tuple(sorted(inputs.modalities)))
    raw = content_embedder(dataclasses.replace(config, source="raw"), inputs)
    k = align_config.eval_k
    raw_recall = pair_recall(embed_items(raw, content).numpy(), valid_pairs, eligible=eligible, k=k)
    report: dict[str, Any] = {"config": config_to_dict(align_config), f"raw_valid_pair_recall@{k}": raw_recall}
    embedder = content_embedder(config, inputs)
    state = None
    if isinstance(embedder, AlignmentHead):
        torch.manual_seed(align_config.seed)
        embedder = content_embedder(config, inputs)
        assert isinstance(embedder, AlignmentHead)
        aligned = train_alignment(embedder, content, train_pairs, valid_pairs, eligible=eligible, config=align_config,
                                  progress=log.info)  # fmt: skip
        state = aligned.state
        report.update({"best_epoch": aligned.best_epoch, f"valid_pair_recall@{k}": aligned.valid_recall,
                       "history": aligned.history})  # fmt: skip
        echo(f"alignment: best epoch {aligned.best_epoch}, held-out pair recall@{k} {aligned.valid_recall:.4f} "
             f"(raw features {raw_recall:.4f})")  # fmt: skip
    return Alignment(embedder=embedder, state=state, embeddings=embed_items(embedder, content).numpy(), report=report)


def quantise(embeddings: np.ndarray, eligible: np.ndarray, config: QARMConfig,
             pipeline_config: PipelineConfig) -> tuple[ResidualCodebooks, dict[str, Any]]:  # fmt: skip
    """Step 3: codebooks on the items with training interactions; the (K, L) grid report beside them."""
    warm_x = embeddings[eligible]
    grid = quantiser_grid(warm_x, sizes=pipeline_config.grid_sizes, levels=pipeline_config.grid_levels,
                          seed=pipeline_config.seed, iterations=pipeline_config.kmeans_iterations)  # fmt: skip
    fitted = fit_residual_kmeans(warm_x, levels=config.code_levels, size=config.codebook_size,
                                 seed=pipeline_config.seed, iterations=pipeline_config.kmeans_iterations)  # fmt: skip
    return fitted, {"quantiser_grid": grid, "quantiser": quantiser_report(warm_x, fitted.codebooks, fitted.codes)}


def code_agreement(model: QARM, fitted: ResidualCodebooks, eligible: np.ndarray) -> dict[str, float]:
    """The model's codes against FAISS's k-means assignment and against an exact FAISS search per level."""
    codes = model.item_codes.numpy()
    return {
        "model_vs_faiss_kmeans_assignment": float((codes[eligible] == fitted.codes).all(axis=1).mean()),
        "model_vs_faiss_encode_all_items": float(
            (codes == faiss_residual_encode(model.content_embeddings.numpy(), fitted.codebooks)).all(axis=1).mean()),
    }  # fmt: skip


@dataclass(frozen=True)
class QarmFit:
    result: TrainResult  # the trained QARM recommender (result.model) and its warm metrics
    alignment: Alignment
    report: dict[str, Any]


def fit_qarm(dataset: InteractionDataset, dataset_dir: Path, lightgcn: Recommender, *,
             lightgcn_config: Mapping[str, Any], model_config: Mapping[str, Any], train_config: TrainConfig,
             align_config: AlignmentTrainConfig, pipeline_config: PipelineConfig, runs_root: Path | None,
             tag: str = "", echo: Callable[[str], None] = print) -> QarmFit:  # fmt: skip
    """Steps 1–4 on ``dataset`` with pairs mined from a trained ``lightgcn`` (its config: QARM inherits INHERITED;
    ``model_config`` overrides them)."""
    config = build_config(QARMConfig, {k: lightgcn_config[k] for k in INHERITED if k in lightgcn_config}, model_config)
    train_users, train_items = dataset.edges(TRAIN)
    eligible = np.bincount(train_items, minlength=dataset.n_items) > 0  # items with training interactions
    with torch.no_grad():
        lightgcn_items = lightgcn.representations().items.detach().float().cpu().numpy()
    mined = mine_pairs(lightgcn_items, train_users, train_items, eligible=eligible,
                       i2i_neighbours=align_config.i2i_neighbours)  # fmt: skip
    train_pairs, valid_pairs = split_pairs(mined.pairs, valid_share=align_config.valid_share,
                                           max_train=align_config.max_pairs, seed=align_config.seed)  # fmt: skip
    report: dict[str, Any] = {"pairs": {"u2i": mined.n_u2i, "i2i": mined.n_i2i, "distinct": int(mined.pairs.shape[0]),
                                        "train": int(train_pairs.shape[0]), "valid": int(valid_pairs.shape[0])}}  # fmt: skip
    alignment = align(config, dataset, train_pairs, valid_pairs, eligible=eligible, align_config=align_config,
                      echo=echo)  # fmt: skip
    fitted, quantiser = quantise(alignment.embeddings, eligible, config, pipeline_config)
    codebooks = torch.from_numpy(fitted.codebooks)

    def install(model: Recommender) -> None:
        assert isinstance(model, QARM)
        model.install_quantiser(codebooks, alignment.state)

    result = train(dataset, "qarm", dataset_dir=dataset_dir, model_config=config_to_dict(config),
                   train_config=train_config, runs_root=runs_root, tag=tag, initialise=install)  # fmt: skip
    model = result.model.cpu()
    assert isinstance(model, QARM)
    report.update({"alignment": alignment.report, **quantiser,
                   "code_agreement": code_agreement(model, fitted, eligible),
                   "qarm": {"run_dir": str(result.run_dir), "config": config_to_dict(config),
                            "best_epoch": result.best_epoch, "valid_recall@20": result.valid.get("recall@20"),
                            "test_recall@20": result.test.get("recall@20")}})  # fmt: skip
    return QarmFit(result=result, alignment=alignment, report=report)


def cold_start_rows(split: ColdSplit, fitted: QarmFit, lightgcn: Recommender) -> dict[str, Any]:
    """Step 5: the one cold-start protocol for QARM, its LightGCN and the content-similarity baselines."""
    rows: dict[str, Any] = {
        "qarm": evaluate_cold_model(fitted.result.model, split),
        "lightgcn (ID)": evaluate_cold_model(lightgcn, split),
        "content similarity (raw features)": evaluate_cold_content_similarity(
            split, {n: (m.features, m.present) for n, m in split.dataset.modalities.items()}),
    }  # fmt: skip
    if fitted.alignment.state is not None:
        everywhere = np.ones(split.dataset.n_items, dtype=bool)
        rows["content similarity (aligned embedding)"] = evaluate_cold_content_similarity(
            split, {"aligned": (fitted.alignment.embeddings, everywhere)})  # fmt: skip
    rows["random (expected)"] = {"metrics": random_expectation(split)}
    return rows


# ============================================================================================== orchestration
@dataclass(frozen=True)
class QarmOutcome:
    run_dir: Path | None
    report: dict[str, Any]


def pair_source(dataset: InteractionDataset, dataset_dir: Path, base: str, *, runs_root: Path,
                train_config: TrainConfig, echo: Callable[[str], None]) -> tuple[Recommender, dict[str, Any]]:  # fmt: skip
    """(the LightGCN the pairs come from, its report entry): the best run of ``dataset`` by validation, or one
    trained now with the config chosen on validation for the parent dataset ``base`` (defaults when none)."""
    run_dir = best_run(runs_root, dataset.name, "lightgcn")
    if run_dir is None:
        chosen = best_run(runs_root, base, "lightgcn")
        config = read_config(chosen)["model_config"] if chosen else {}
        echo(f"no LightGCN run for {dataset.name}: training one with {config or 'defaults'}"
             + (f" (the config chosen on validation for {base})" if chosen else ""))  # fmt: skip
        trained = train(dataset, "lightgcn", dataset_dir=dataset_dir, model_config=config, train_config=train_config,
                        runs_root=runs_root)  # fmt: skip
        assert trained.run_dir is not None
        run_dir = trained.run_dir
    run = load_run(run_dir, dataset_dir=dataset_dir)
    valid = run.metrics["valid"].get("recall@20")
    echo(f"pairs from LightGCN run {run_dir} (valid recall@20 {valid:.4f})")
    return run.model, {"run_dir": str(run_dir), "config": run.config["model_config"], "valid_recall@20": valid,
                       "test_recall@20": run.metrics["test"].get("recall@20")}  # fmt: skip


def run_qarm(
    dataset_dir: Path,
    *,
    runs_root: Path,
    datasets_root: Path,
    model_config: dict[str, Any] | None = None,
    train_config: TrainConfig | None = None,
    align_config: AlignmentTrainConfig | None = None,
    pipeline_config: PipelineConfig | None = None,
    lightgcn_train_config: TrainConfig | None = None,
    tag: str = "",
    echo: Callable[[str], None] = print,
) -> QarmOutcome:
    """The whole QARM pipeline on the prepared dataset in ``dataset_dir`` (see the module docstring)."""
    train_config = train_config or TrainConfig()
    pipeline_config = pipeline_config or PipelineConfig()
    base = InteractionDataset.load(dataset_dir).name
    if pipeline_config.cold_share > 0:
        dataset_dir = ensure_cold_dataset(datasets_root, dataset_dir, share=pipeline_config.cold_share,
                                          seed=pipeline_config.cold_seed)  # fmt: skip
    dataset = InteractionDataset.load(dataset_dir)
    split = read_cold_split(dataset)
    lightgcn, lightgcn_report = pair_source(dataset, dataset_dir, base, runs_root=runs_root,
                                            train_config=lightgcn_train_config or train_config, echo=echo)  # fmt: skip
    fitted = fit_qarm(dataset, dataset_dir, lightgcn, lightgcn_config=lightgcn_report["config"],
                      model_config=model_config or {}, train_config=train_config,
                      align_config=align_config or AlignmentTrainConfig(), pipeline_config=pipeline_config,
                      runs_root=runs_root, tag=tag, echo=echo)  # fmt: skip
    result = fitted.result
    echo(f"qarm: best epoch {result.best_epoch}, valid recall@20 {result.valid['recall@20']:.4f}, "
         f"test recall@20 {result.test['recall@20']:.4f}")  # fmt: skip
    report: dict[str, Any] = {"dataset": dataset.name, "split": dataset.split_name,
                              "n_cold_items": 0 if split is None else int(split.cold.size),
                              "lightgcn": lightgcn_report, **fitted.report}  # fmt: skip
    if split is not None:
        report["cold_start"] = cold_start_rows(split, fitted, lightgcn)
        for name, row in report["cold_start"].items():
            echo(f"cold items, {name}: recall@20 {row['metrics'].get('recall@20', np.nan):.4f}")
    if result.run_dir is not None:
        write_report(result.run_dir, QARM_REPORT, report)
    return QarmOutcome(run_dir=result.run_dir, report=report)
