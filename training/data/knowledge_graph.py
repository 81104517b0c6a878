"""Knowledge graphs joined to a prepared dataset's items, read from their raw files at run time (never stored).

- ``ml100k-posters`` and ``ml100k``: the MovieLens-100k Freebase KG that ships in the ``recbole==1.2.1`` wheel
  (``ml-100k.link``: MovieLens item id → entity; ``ml-100k.kg``: head, relation, tail), the wheel found as
  ``training/data/sources.py`` finds it (``$MMREC_HOME/downloads``). Both datasets' item ids are MovieLens ids.

The join: an item whose id has a link IS that entity (every item linked to an entity takes the entity's triples);
a triple is kept when both ends are known entities, which every triple of the file is. Entities that are no item
become extra nodes, numbered in order of first appearance in the file; relations in order of first appearance.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass

import torch

from models.base import KnowledgeGraph
from training.data.dataset import InteractionDataset
from training.data.sources import recbole_wheel
from training.settings import Paths

RECBOLE_KG_DIR = "recbole/dataset_example/ml-100k"


@dataclass(frozen=True)
class RawKnowledgeGraph:
    links: list[tuple[str, str]]  # (item id, entity)
    triples: list[tuple[str, str, str]]  # (head entity, relation, tail entity)


@dataclass(frozen=True)
class JoinCoverage:
    items: int
    items_linked: int  # items of the dataset with a link to an entity
    triples: int  # triples in the raw file
    triples_kept: int  # triples in the joined graph (one per linked item of an entity)
    triples_touching_items: int  # kept triples with an item at one end at least
    entities: int  # entities that are not items


def read_recbole_ml100k_kg(paths: Paths) -> RawKnowledgeGraph:
    """``ml-100k.link`` and ``ml-100k.kg`` from the recbole wheel (tab-separated, one header row each)."""
    with zipfile.ZipFile(recbole_wheel(paths)) as wheel:
        link_rows = wheel.read(f"{RECBOLE_KG_DIR}/ml-100k.link").decode().splitlines()[1:]
        kg_rows = wheel.read(f"{RECBOLE_KG_DIR}/ml-100k.kg").decode().splitlines()[1:]
    links = [(item, entity) for item, entity in (row.split("\t") for row in link_rows if row)]
    triples = [(h, r, t) for h, r, t in (row.split("\t") for row in kg_rows if row)]
    return RawKnowledgeGraph(links=links, triples=triples)


KNOWLEDGE_GRAPH_SOURCES = {
    "ml100k-posters": read_recbole_ml100k_kg,
    "ml100k": read_recbole_ml100k_kg,
}


def join_knowledge_graph(item_ids: list[str], raw: RawKnowledgeGraph) -> tuple[KnowledgeGraph, JoinCoverage]:
    """The raw KG as node rows of ``item_ids`` (items first, then the other entities) and its join coverage."""
    item_row = {item: row for row, item in enumerate(item_ids)}
    items_of: dict[str, list[int]] = {}
    for item, entity in raw.links:
        if item in item_row and item_row[item] not in items_of.setdefault(entity, []):
            items_of[entity].append(item_row[item])
    entity_row: dict[str, int] = {}
    relation_id: dict[str, int] = {}

    def rows_of(entity: str) -> list[int]:
        if entity in items_of and items_of[entity]:
            return items_of[entity]
        if entity not in entity_row:
            entity_row[entity] = len(item_ids) + len(entity_row)
        return [entity_row[entity]]

    heads: list[int] = []
    relations: list[int] = []
    tails: list[int] = []
    for h, r, t in raw.triples:
        rel = relation_id.setdefault(r, len(relation_id))
        for head in rows_of(h):
            for tail in rows_of(t):
                heads.append(head)
                relations.append(rel)
                tails.append(tail)
    graph = KnowledgeGraph(
        n_entities=len(entity_row),
        n_relations=len(relation_id),
        heads=torch.tensor(heads, dtype=torch.int64),
        relations=torch.tensor(relations, dtype=torch.int64),
        tails=torch.tensor(tails, dtype=torch.int64),
    )
    n_items = len(item_ids)
    coverage = JoinCoverage(
        items=n_items,
        items_linked=len({row for rows in items_of.values() for row in rows}),
        triples=len(raw.triples),
        triples_kept=len(heads),
        triples_touching_items=int(((graph.heads < n_items) | (graph.tails < n_items)).sum()),
        entities=len(entity_row),
    )
    return graph, coverage


def read_knowledge_graph(dataset: InteractionDataset, paths: Paths) -> tuple[KnowledgeGraph, JoinCoverage]:
    """The KG of ``dataset`` joined to its items; a clear error for a dataset without one."""
    if dataset.name not in KNOWLEDGE_GRAPH_SOURCES:
        raise ValueError(f"no knowledge graph for dataset {dataset.name!r}; "
                         f"datasets with one: {', '.join(sorted(KNOWLEDGE_GRAPH_SOURCES))}")  # fmt: skip
    return join_knowledge_graph(dataset.item_ids, KNOWLEDGE_GRAPH_SOURCES[dataset.name](paths))
