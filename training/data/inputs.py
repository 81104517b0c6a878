"""From a prepared dataset to the tensors a model is built from (training edges only, never valid/test)."""

from __future__ import annotations

import logging

import torch

from models.base import KnowledgeGraph, ModalityInput, ModelInputs
from training.data.dataset import TRAIN, InteractionDataset
from training.settings import Paths, default_paths

log = logging.getLogger(__name__)


def model_inputs(
    dataset: InteractionDataset,
    *,
    modalities: tuple[str, ...] | None = None,
    knowledge_graph: bool = False,
    paths: Paths | None = None,
) -> ModelInputs:
    """With ``knowledge_graph`` (a model whose ``ModelSpec`` asks for one: MKGAT) the dataset's KG is read from its
    raw files under ``paths`` (default: the settings) and joined to the items (training/data/knowledge_graph.py)."""
    users, items = dataset.edges(TRAIN)
    chosen = dataset.modalities if modalities is None else {m: dataset.modalities[m] for m in modalities}
    return ModelInputs(
        n_users=dataset.n_users,
        n_items=dataset.n_items,
        train_users=torch.from_numpy(users.copy()),
        train_items=torch.from_numpy(items.copy()),
        knowledge_graph=joined_knowledge_graph(dataset, paths or default_paths()) if knowledge_graph else None,
        modalities={
            name: ModalityInput(features=torch.from_numpy(m.features.copy()), present=torch.from_numpy(m.present.copy()))
            for name, m in chosen.items()
        },
    )


def joined_knowledge_graph(dataset: InteractionDataset, paths: Paths) -> KnowledgeGraph:
    from training.data.knowledge_graph import read_knowledge_graph

    graph, coverage = read_knowledge_graph(dataset, paths)
    log.info("%s knowledge graph: %d of %d items linked, %d of %d triples kept (%d touch an item), %d other entities",
             dataset.name, coverage.items_linked, coverage.items, coverage.triples_kept, coverage.triples,
             coverage.triples_touching_items, coverage.entities)  # fmt: skip
    return graph
