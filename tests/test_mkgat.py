"""MKGAT on a tiny synthetic graph with a tiny KG: full-sort scores against a dense numpy re-implementation of its
multimodal graph attention layers (W1 applied to the concatenation [e_h ‖ e_r ‖ e_t], a softmax loop per head), the
loss, missing modalities, the content encoder as the propagation of a new item's star graph, the KG join against a
brute-force reference, reading the KG from a recbole-format wheel, and a trainer → export → service round trip."""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from export_round_trip import (
    assert_bundle_serves_model_scores,
    assert_onnx_item_encoder_matches,
    catalogue_content,
    train_and_export,
)
from optimisation_checks import loss_before_and_after_adam, move_off_initial_values
from synthetic_datasets import multimodal_dataset
from test_multimodal_graph_models import N_ITEMS, N_USERS, fixed_batch, make_inputs, scores_of

from models import build_model
from models.base import KnowledgeGraph, ModelInputs
from models.mkgat import MKGAT, NEGATIVE_SLOPE, prune_rare_entities
from training.data.knowledge_graph import RECBOLE_KG_DIR, RawKnowledgeGraph, join_knowledge_graph
from training.data.sources import RECBOLE_WHEEL
from training.runs import load_run

D = 8
CONFIG: dict[str, Any] = {"embedding_size": D, "n_layers": 2, "kg_batch_size": 64}
N_ENTITIES, N_RELATIONS = 6, 3


def tiny_kg(seed: int = 0) -> KnowledgeGraph:
    """40 random triples between items 0..29 and 6 entities (item 39, the one without interactions, has none)."""
    rng = np.random.default_rng(seed)
    nodes = np.concatenate([np.arange(30), N_ITEMS + np.arange(N_ENTITIES)])
    heads, tails = rng.choice(nodes, 40), rng.choice(nodes, 40)
    return KnowledgeGraph(n_entities=N_ENTITIES, n_relations=N_RELATIONS, heads=torch.from_numpy(heads),
                          relations=torch.from_numpy(rng.integers(0, N_RELATIONS, 40)), tails=torch.from_numpy(tails))


def kg_inputs(names: tuple[str, ...] = ("text", "image"), *, absent_value: float = 0.0) -> ModelInputs:
    return dataclasses.replace(make_inputs(names, absent_value=absent_value), knowledge_graph=tiny_kg())


def build(inputs: ModelInputs | None = None, *, seed: int = 0, **overrides: Any) -> MKGAT:
    torch.manual_seed(seed)
    model = build_model("mkgat", inputs or kg_inputs(), CONFIG, overrides)
    assert isinstance(model, MKGAT)
    move_off_initial_values(model)
    return model


def reference_scores(model: MKGAT, inputs: ModelInputs) -> np.ndarray:
    """(U, I) from the paper's equations, literally: the edge list built again here, e(h,r,t) = W1[e_h‖e_r‖e_t],
    softmax of LeakyReLU(w2·e) over each head's edges, LeakyReLU(W3 e_h + Σ π e), KGAT's concatenation."""
    p = {k: v.detach().double().numpy() for k, v in model.named_parameters()}
    kg = inputs.knowledge_graph
    assert kg is not None
    names = sorted(inputs.modalities)
    n_forward = 1 + N_RELATIONS + len(names)
    items_at, tails_at = N_USERS, N_USERS + N_ITEMS + N_ENTITIES
    edges = [(int(u), 0, items_at + int(i)) for u, i in zip(inputs.train_users, inputs.train_items, strict=True)]
    edges += [(items_at + int(h), 1 + int(r), items_at + int(t))
              for h, r, t in zip(kg.heads, kg.relations, kg.tails, strict=True)]  # fmt: skip
    tails = []
    for m, name in enumerate(names):
        x = inputs.modalities[name].features.double().numpy()
        present = inputs.modalities[name].present.numpy()
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        tails.append((x @ p[f"projections.{name}.weight"].T + p[f"projections.{name}.bias"]) * present[:, None])
        edges += [(items_at + int(i), 1 + N_RELATIONS + m, tails_at + m * N_ITEMS + int(i))
                  for i in np.nonzero(present)[0]]  # fmt: skip
    edges += [(t, r + n_forward, h) for h, r, t in edges]
    e = np.concatenate([p["user_embedding"], p["entity_embedding"], *tails])
    relations = p["relation_embedding"]
    layers = [e]
    for k in range(len(model.layers)):
        w1 = np.concatenate([p[f"layers.{k}.head.weight"], p[f"layers.{k}.relation.weight"],
                             p[f"layers.{k}.tail.weight"]], axis=1)  # fmt: skip  (d, 3d)
        w2, w3 = p[f"layers.{k}.attention.weight"][0], p[f"layers.{k}.self_map.weight"]
        out = e @ w3.T
        for node in range(e.shape[0]):
            mine = [(r, t) for h, r, t in edges if h == node]
            if not mine:
                continue
            triples = np.stack([w1 @ np.concatenate([e[node], relations[r], e[t]]) for r, t in mine])
            logits = np.array([leaky_slope(w2 @ x) for x in triples])
            pi = np.exp(logits - logits.max())
            out[node] += (pi / pi.sum()) @ triples
        e = leaky_slope(out)
        layers.append(e)
    z = np.concatenate([layers[0], *(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
                                     for x in layers[1:])], axis=1)  # fmt: skip
    scores: np.ndarray = z[:N_USERS] @ z[N_USERS : N_USERS + N_ITEMS].T
    return scores


def leaky_slope(x: Any) -> Any:
    return np.where(x > 0, x, NEGATIVE_SLOPE * x)


# --------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("names", [("text", "image"), ("image",)], ids="+".join)
def test_full_sort_scores_equal_the_dense_reference(names: tuple[str, ...]) -> None:
    inputs = kg_inputs(names)
    model = build(inputs)
    np.testing.assert_allclose(scores_of(model), reference_scores(model, inputs), rtol=1e-4, atol=1e-5)


def test_full_sort_scores_are_the_dot_products_of_the_representations() -> None:
    model = build()
    with torch.no_grad():
        reps = model.representations()
    assert reps.users is not None and reps.items.shape == (N_ITEMS, 3 * D)
    np.testing.assert_allclose(model.full_sort_scores(reps.users, reps.items).numpy(),
                               (reps.users.double() @ reps.items.double().T).numpy(), rtol=1e-5, atol=1e-6)  # fmt: skip


def test_loss_without_kg_and_regulariser_is_bpr_on_the_full_sort_scores() -> None:
    inputs = kg_inputs()
    model = build(inputs, kg_weight=0.0, reg_weight=0.0)
    batch = fixed_batch(inputs)
    scores = torch.from_numpy(scores_of(model))
    pos, neg = scores[batch.users, batch.pos_items], scores[batch.users, batch.neg_items]
    with torch.no_grad():
        assert float(model(batch)) == pytest.approx(float(-torch.log(torch.sigmoid(pos - neg)).mean()), rel=1e-5)


def test_adam_steps_reduce_the_loss() -> None:
    inputs = kg_inputs()
    model = build(inputs)
    model.on_epoch_start(1, torch.Generator().manual_seed(1))
    before, after = loss_before_and_after_adam(model, fixed_batch(inputs))
    assert after < 0.9 * before


def test_transe_loss_is_the_margin_loss_of_its_sampled_triples() -> None:
    model = build()
    model.on_epoch_start(1, torch.Generator().manual_seed(3))
    state = model.sampling_generator.get_state()
    h, r, t, corrupted = model.sample_triples()
    model.sampling_generator.set_state(state)
    with torch.no_grad():
        nodes = model.node_inputs()
        loss = float(model.transe_loss(nodes))
    e, rel = nodes.double().numpy(), model.relation_embedding.detach().double().numpy()
    expected = np.mean([max(0.0, 1.0 + np.sum((e[a] + rel[b] - e[c]) ** 2) - np.sum((e[a] + rel[b] - e[x]) ** 2))
                        for a, b, c, x in zip(h, r, t, corrupted, strict=True)])  # fmt: skip
    assert loss == pytest.approx(expected, rel=1e-5)
    # a corrupted tail is of its triple's kind: a modality tail for has_m, an item or entity for a KG triple
    tails_at = N_USERS + N_ITEMS + N_ENTITIES
    assert ((corrupted >= tails_at) == (t >= tails_at)).all()


def test_missing_modality_rows_have_no_influence() -> None:
    zeros, junk = kg_inputs(), kg_inputs(absent_value=100.0)
    a, b = build(zeros), build(junk)
    np.testing.assert_allclose(scores_of(a), scores_of(b), rtol=1e-6, atol=1e-6)
    batch = fixed_batch(zeros)
    for model in (a, b):
        model.on_epoch_start(1, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float(a(batch)) == pytest.approx(float(b(batch)), rel=1e-6)


def test_models_refuse_inputs_without_a_knowledge_graph_or_modalities() -> None:
    with pytest.raises(ValueError, match="MKGAT needs a knowledge graph; this dataset has none joined to its items"):
        build(make_inputs())
    with pytest.raises(ValueError, match="MKGAT needs at least one item modality; this dataset has none"):
        build(dataclasses.replace(make_inputs(()), knowledge_graph=tiny_kg()))


@pytest.mark.parametrize("min_triples", [1, 2, 3, 12, 1000])
def test_rare_entities_are_pruned_as_a_brute_force_count_says(min_triples: int) -> None:
    """An entity (not an item) in fewer than ``min_triples`` triples goes, with every triple it is in; the others keep
    their order under new rows from N_ITEMS; items and relations are never renumbered."""
    kg = tiny_kg(seed=min_triples)
    triples = list(zip(kg.heads.tolist(), kg.relations.tolist(), kg.tails.tolist(), strict=True))
    count = {e: sum((h == e) + (t == e) for h, _, t in triples) for e in range(N_ITEMS, N_ITEMS + N_ENTITIES)}
    kept_entities = [e for e in range(N_ITEMS, N_ITEMS + N_ENTITIES) if count[e] >= min_triples]
    row = {e: N_ITEMS + i for i, e in enumerate(kept_entities)} | {i: i for i in range(N_ITEMS)}
    expected = [(row[h], r, row[t]) for h, r, t in triples if h in row and t in row]
    pruned = prune_rare_entities(kg, N_ITEMS, min_triples)
    assert pruned.n_entities == len(kept_entities) and pruned.n_relations == N_RELATIONS
    assert list(zip(pruned.heads.tolist(), pruned.relations.tolist(), pruned.tails.tolist(), strict=True)) == expected
    if min_triples == 1:
        assert pruned is kg


def test_a_model_with_min_entity_triples_is_the_model_of_the_pruned_kg() -> None:
    """min_entity_triples prunes the KG before anything is built: same parameters (fewer entity rows) and scores as
    the default model built on the pruned graph."""
    inputs = kg_inputs()
    pruned_inputs = dataclasses.replace(inputs, knowledge_graph=prune_rare_entities(tiny_kg(), N_ITEMS, 3))
    assert pruned_inputs.knowledge_graph is not None and 0 < pruned_inputs.knowledge_graph.n_entities < N_ENTITIES
    model, reference = build(inputs, min_entity_triples=3), build(pruned_inputs)
    assert model.entity_embedding.shape == (N_ITEMS + pruned_inputs.knowledge_graph.n_entities, D)
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(scores_of(model), scores_of(reference))
    with pytest.raises(ValueError, match="min_entity_triples must be at least 1, got 0"):
        build(inputs, min_entity_triples=0)


def test_content_encoder_equals_the_propagation_of_an_item_with_no_id_and_no_edges_but_its_tails() -> None:
    inputs = kg_inputs()
    model = build(inputs)
    with torch.no_grad():
        model.entity_embedding[39] = 0.0  # item 39 has no interaction and no KG triple: only its modality tails
        trained = model.representations().items
        encoder = model.content_encoder()
        args = []
        for name in encoder.modality_names:
            m = inputs.modalities[name]
            args += [m.features, m.present.float()[:, None]]
        encoded = encoder(*args)
    np.testing.assert_allclose(encoded[39].numpy(), trained[39].numpy(), rtol=1e-5, atol=1e-6)
    assert not encoded[:, :D].any()  # no ID embedding at layer 0


# ------------------------------------------------------------------------------------------------ the join
def brute_force_join(item_ids: list[str], raw: RawKnowledgeGraph) -> set[tuple[str, str, str]]:
    """Every triple with each end replaced by every dataset item linked to that entity (or kept as the entity)."""
    linked: dict[str, set[str]] = {}
    for item, entity in raw.links:
        if item in item_ids:
            linked.setdefault(entity, set()).add(f"item:{item}")
    out = set()
    for h, r, t in raw.triples:
        for a in linked.get(h, {f"entity:{h}"}):
            for b in linked.get(t, {f"entity:{t}"}):
                out.add((a, r, b))
    return out


def test_join_equals_the_brute_force_reference() -> None:
    rng = np.random.default_rng(4)
    item_ids = [str(i) for i in range(1, 21)]
    entities = [f"m.{k}" for k in range(30)]
    links = [(str(i), entities[i]) for i in range(1, 16)]  # items 16..20 unlinked
    links += [("7", entities[3]), ("999", entities[4])]  # two ids share entity 3; an id the dataset lacks
    links = [(a, b) for a, b in links if (a, b) != ("7", entities[7])]
    relations = ["film.actor", "film.genre", "film.sequel"]
    triples = list(dict.fromkeys((entities[a], relations[b], entities[c])
                                 for a, b, c in rng.integers(0, [30, 3, 30], size=(80, 3))))  # fmt: skip
    raw = RawKnowledgeGraph(links=links, triples=triples)
    graph, coverage = join_knowledge_graph(item_ids, raw)
    entity_names = list(dict.fromkeys(e for h, _, t in triples for e in (h, t)))  # order of first appearance

    def label(row: int, other_entities: list[str]) -> str:
        return f"item:{item_ids[row]}" if row < len(item_ids) else f"entity:{other_entities[row - len(item_ids)]}"

    linked_entities = {e for i, e in links if i in item_ids}
    other = [e for e in entity_names if e not in linked_entities]
    relation_names = list(dict.fromkeys(r for _, r, _ in triples))
    joined = [(label(int(h), other), relation_names[int(r)], label(int(t), other))
              for h, r, t in zip(graph.heads, graph.relations, graph.tails, strict=True)]  # fmt: skip
    expected = brute_force_join(item_ids, raw)
    assert set(joined) == expected and len(joined) == len(expected)
    assert graph.n_entities == len(other) and graph.n_relations == len(relation_names)
    assert coverage.items == 20 and coverage.items_linked == 15 and coverage.triples == len(triples)
    assert coverage.triples_kept == len(expected)


# ----------------------------------------------------------------- from the wheel: train, export, serve
def fake_recbole_wheel(home: Path, links: list[tuple[str, str]], triples: list[tuple[str, str, str]]) -> None:
    (home / "downloads").mkdir(parents=True)
    with zipfile.ZipFile(home / "downloads" / RECBOLE_WHEEL, "w") as wheel:
        wheel.writestr(f"{RECBOLE_KG_DIR}/ml-100k.link",
                       "item_id:token\tentity_id:token\n" + "".join(f"{i}\t{e}\n" for i, e in links))  # fmt: skip
        wheel.writestr(f"{RECBOLE_KG_DIR}/ml-100k.kg", "head_id:token\trelation_id:token\ttail_id:token\n"
                       + "".join(f"{h}\t{r}\t{t}\n" for h, r, t in triples))  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("mkgat")
    base = multimodal_dataset()
    dataset = dataclasses.replace(base, name="ml100k-posters", item_ids=[str(i + 1) for i in range(base.n_items)])
    links = [(str(i), f"m.film{i}") for i in range(1, 50)]
    triples = [(f"m.film{i}", "film.film.genre", f"m.genre{i % 4}") for i in range(1, 50)]
    triples += [(f"m.genre{g}", "film.film_genre.films_in_this_genre", f"m.film{g + 1}") for g in range(4)]
    fake_recbole_wheel(root / "home", links, triples)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MMREC_HOME", str(root / "home"))
        yield train_and_export(root, dataset, "mkgat", {"embedding_size": D})


def test_the_trained_model_has_the_joined_kg_from_the_wheel(exported: tuple[Path, Path]) -> None:
    run = load_run(exported[0])
    kg = run.inputs.knowledge_graph
    assert kg is not None and kg.n_entities == 4 and kg.n_relations == 2 and kg.heads.shape == (53,)
    assert isinstance(run.model, MKGAT)


def test_service_serves_the_exported_inner_product_and_native_item_encoder(
    exported: tuple[Path, Path],
) -> None:
    run_dir, path = exported
    assert_bundle_serves_model_scores(run_dir, path, model_name="mkgat", dim=3 * D)
    run = load_run(run_dir)
    encoder = run.model.content_encoder()
    assert encoder is not None
    feeds = catalogue_content(run.dataset, encoder.modality_names)
    onnx_out = assert_onnx_item_encoder_matches(path, encoder, feeds, method="native")
    assert not onnx_out[:, :D].any()  # a new item has no ID block
