"""GET /v1/audit: the items whose modality the bundle's model judged, worst first, over an R2MR-like synthetic
bundle. Pages concatenate to the brute-force ordering (also when items are ingested and deleted between pages);
ingested items are listed with the scores their encoder gave them; the endpoint is keyed; every bad filter is a 4xx
naming the problem. By the user-profile cosine (``by=profile``): the trained items with a cosine, in the brute-force
order, on an R2MR-like bundle and on a bundle without a reviewer."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import SyntheticBundle, make_bundle
from fastapi.testclient import TestClient
from service_test_support import API_KEY

from service.audit import encode_cursor
from service.client import RecommendationClient, ServiceHTTPError
from service.settings import ServiceSettings

Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]
STATES = ("high-quality", "disparity", "low-quality")


@pytest.fixture
def audit_client(make_settings: Callable[..., ServiceSettings], serve: Serve, quality_bundle: SyntheticBundle) -> Iterator[TestClient]:
    with serve(make_settings(bundle_dir=quality_bundle.path)) as client:
        yield client


def trained_rows(bundle: SyntheticBundle) -> dict[str, dict[str, Any]]:
    """Trained items with at least one training interaction (the others are not listed): id -> metadata row."""
    rows = [json.loads(line) for line in (bundle.path / "item_metadata.jsonl").read_text().splitlines()]
    return {row["id"]: row for r, row in enumerate(rows) if bundle.popularity[r] > 0}


def brute_force(items: dict[str, dict[str, Any]], modality: str, state: str | None, *, field: str = "quality") -> list[str]:
    """Ids sorted by (score of the modality, id), of the given state; items whose score is null are not listed."""
    chosen = [(row[f"{field}_{modality}"], item_id) for item_id, row in items.items()
              if (state is None or row["quality_state"] == state) and row.get(f"{field}_{modality}") is not None]  # fmt: skip
    return [item_id for _, item_id in sorted(chosen)]


def listing(client: TestClient, *, limit: int, headers: dict[str, str] | None = None, **filters: Any) -> list[dict[str, Any]]:
    """Every page of a listing, concatenated."""
    items: list[dict[str, Any]] = []
    params: dict[str, Any] = {**filters, "limit": limit}
    while True:
        response = client.get("/v1/audit", params=params, headers=headers or {})
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["items"]) <= limit
        items += body["items"]
        if body["next_cursor"] is None:
            return items
        assert len(body["items"]) == limit
        params["cursor"] = body["next_cursor"]


def ingest(client: TestClient, bundle: SyntheticBundle, items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """POST the items; returns id -> the extras the service gave them (their quality fields)."""
    response = client.post("/v1/items", json=items)
    assert response.status_code == 201, response.text
    return {item["id"]: item["extra"] for item in response.json()}


def new_items(bundle: SyntheticBundle, seed: int, n: int, *, prefix: str) -> list[dict[str, Any]]:
    """Items with random features; every third lacks audio (its audio score is then 0, tied with trained items')."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        features = {"tags": rng.normal(size=8).tolist()}
        if i % 3:
            features["audio"] = rng.normal(size=12).tolist()
        items.append({"id": f"{prefix}{i:02d}", "features": features})
    return items


@pytest.mark.parametrize("modality", ["tags", "audio"])
@pytest.mark.parametrize("state", [None, *STATES])
def test_pages_concatenate_to_the_brute_force_order(audit_client: TestClient, quality_bundle: SyntheticBundle,
                                                     modality: str, state: str | None) -> None:  # fmt: skip
    filters: dict[str, Any] = {"modality": modality, **({"state": state} if state else {})}
    listed = listing(audit_client, limit=7, **filters)
    expected = brute_force(trained_rows(quality_bundle), modality, state)
    assert [item["id"] for item in listed] == expected and expected
    rows = trained_rows(quality_bundle)
    for item in listed:
        row = rows[item["id"]]
        assert item["score"] == row[f"quality_{modality}"] and item["state"] == row["quality_state"]
        assert item["scores"] == {"audio": row["quality_audio"], "tags": row["quality_tags"]}
        assert item["source"] == "trained"
        trained_row = quality_bundle.item_ids.index(item["id"])
        assert item["has_modality"] == bool(np.load(quality_bundle.path / "item_features" / f"{modality}.mask.npy")[trained_row])


@pytest.mark.parametrize("state", [None, "low-quality"])
def test_the_typed_client_lists_the_audit_page_by_page_in_the_brute_force_order(
    audit_client: TestClient, quality_bundle: SyntheticBundle, state: str | None
) -> None:
    client = RecommendationClient(http_client=audit_client)
    expected = brute_force(trained_rows(quality_bundle), "audio", state)
    assert [item.id for item in client.audited_items("audio", state=state, page_size=4)] == expected and expected
    first = client.audit("audio", state=state, limit=3)
    assert [item.id for item in first.items] == expected[:3] and first.next_cursor is not None
    second = client.audit("audio", state=state, limit=3, cursor=first.next_cursor)
    assert [item.id for item in second.items] == expected[3:6]
    with pytest.raises(ServiceHTTPError) as error:
        client.audit("smell")
    assert error.value.status_code == 422 and "smell" in error.value.detail


def test_items_without_training_interactions_are_not_listed(audit_client: TestClient, quality_bundle: SyntheticBundle) -> None:
    unseen = {quality_bundle.item_ids[r] for r in np.flatnonzero(quality_bundle.popularity == 0)}
    assert unseen  # the synthetic bundle has some
    listed = {item["id"] for item in listing(audit_client, limit=500, modality="tags")}
    assert not listed & unseen and len(listed) == len(quality_bundle.item_ids) - len(unseen)


def test_ingested_items_are_listed_with_their_encoder_scores(audit_client: TestClient, quality_bundle: SyntheticBundle) -> None:
    extras = ingest(audit_client, quality_bundle, new_items(quality_bundle, 1, 9, prefix="new-"))
    for item_id, extra in extras.items():  # the encoder's outputs, as the numpy twin computes them
        features = {m: np.array(v, dtype=np.float32) for m, v in
                    next(i for i in new_items(quality_bundle, 1, 9, prefix="new-") if i["id"] == item_id)["features"].items()}  # fmt: skip
        twin = quality_bundle.quality_fields(features)
        assert extra["quality_state"] == twin["quality_state"]
        assert extra["quality_audio"] == pytest.approx(twin["quality_audio"], abs=1e-6)
    everything = {**trained_rows(quality_bundle), **extras}
    for modality in ("tags", "audio"):
        listed = listing(audit_client, limit=11, modality=modality)
        assert [item["id"] for item in listed] == brute_force(everything, modality, None)
        for item in listed:
            if item["id"] in extras:
                assert item["source"] == "ingested" and item["score"] == extras[item["id"]][f"quality_{modality}"]
                assert item["has_modality"] == (modality == "tags" or int(item["id"][-2:]) % 3 != 0)
    low = listing(audit_client, limit=5, modality="audio", state="low-quality")
    assert [item["id"] for item in low] == brute_force(everything, "audio", "low-quality")


def test_pages_stay_correct_when_items_are_ingested_and_deleted_between_them(
    audit_client: TestClient, quality_bundle: SyntheticBundle
) -> None:
    live = trained_rows(quality_bundle)
    before = dict(live)

    def after(key: tuple[float, str]) -> list[str]:
        """What is live now and ranks after ``key``, in listing order."""
        return [i for i in brute_force(live, "audio", None) if (live[i]["quality_audio"], i) > key]

    def delete(item_id: str) -> None:
        assert audit_client.delete(f"/v1/items/{item_id}").status_code == 200
        del live[item_id]

    pages = [audit_client.get("/v1/audit", params={"modality": "audio", "limit": 20}).json()]
    assert [item["id"] for item in pages[0]["items"]] == brute_force(live, "audio", None)[:20]
    expected = [item["id"] for item in pages[0]["items"]]
    mutations = [("mid-", 24), ("late-", 6)]  # before page 2, before page 3
    while pages[-1]["next_cursor"] is not None:
        last = pages[-1]["items"][-1]
        if mutations:  # between pages: ingest items (some rank before the cursor, some after), delete a listed item,
            prefix, n = mutations.pop(0)  # an unlisted trained item and one just ingested
            live |= ingest(audit_client, quality_bundle, new_items(quality_bundle, n, n, prefix=prefix))
            listed_ids = [item["id"] for page in pages for item in page["items"]]
            delete(listed_ids[3 * len(pages)])
            delete(next(i for i in after((last["score"], last["id"]))[5:] if i in before))
            delete(f"{prefix}01")
        expected += after((last["score"], last["id"]))[:20]
        pages.append(audit_client.get("/v1/audit", params={"modality": "audio", "limit": 20,
                                                              "cursor": pages[-1]["next_cursor"]}).json())  # fmt: skip
    listed = [item["id"] for page in pages for item in page["items"]]
    assert listed == expected
    assert len(listed) == len(set(listed))  # nothing repeated
    assert {i for i in before if i in live} <= set(listed)  # nothing live throughout is skipped
    assert any(i.startswith("mid-") for i in listed) and any(i.startswith("late-") for i in listed)
    assert not any(i in ("mid-01", "late-01") for i in listed)


# --- access ------------------------------------------------------------------------------------------------

READER: dict[str, Any] = {"name": "reader", "key": "reader-key-0123456789", "scopes": ["read"]}
WRITER: dict[str, Any] = {"name": "writer", "key": "writer-key-0123456789", "scopes": ["write"]}


def test_the_audit_needs_a_write_key_once_keys_are_configured(make_settings: Callable[..., ServiceSettings],
                                                               serve: Serve, quality_bundle: SyntheticBundle) -> None:  # fmt: skip
    with serve(make_settings(bundle_dir=quality_bundle.path, api_keys=[READER, WRITER])) as client:
        missing = client.get("/v1/audit", params={"modality": "tags"})
        assert missing.status_code == 401
        assert missing.json()["detail"] == "missing X-API-Key header: this endpoint needs an API key with the 'write' scope"
        wrong = client.get("/v1/audit", params={"modality": "tags"}, headers={"X-API-Key": "not-a-key-0123456789"})
        assert (wrong.status_code, wrong.json()["detail"]) == (401, "invalid API key in X-API-Key")
        reader = client.get("/v1/audit", params={"modality": "tags"}, headers={"X-API-Key": READER["key"]})
        assert reader.status_code == 403
        assert reader.json()["detail"] == ("the API key 'reader' in X-API-Key lacks the 'write' scope this endpoint "
                                           "needs (it has: read)")  # fmt: skip
        listed = listing(client, limit=50, modality="tags", headers={"X-API-Key": WRITER["key"]})
        assert [item["id"] for item in listed] == brute_force(trained_rows(quality_bundle), "tags", None)
    with serve(make_settings(bundle_dir=quality_bundle.path, api_key=API_KEY, read_access="open")) as client:
        assert client.get("/v1/audit", params={"modality": "tags"}).status_code == 401  # keyed even with open reads
        assert client.get("/v1/audit", params={"modality": "tags"}, headers={"X-API-Key": API_KEY}).status_code == 200


# --- refusals ----------------------------------------------------------------------------------------------


def test_a_bundle_without_scores_answers_409(client: TestClient, features_bundle: SyntheticBundle) -> None:
    response = client.get("/v1/audit", params={"modality": "tags"})
    assert response.status_code == 409
    assert response.json()["detail"] == (f"the served bundle ({features_bundle.version}, model 'toy-mf') has no modality "
                                         "quality scores (item encoder outputs quality_<modality>): the audit "
                                         "by=reviewer needs a bundle exported from an R2MR run")  # fmt: skip
    response = client.get("/v1/audit", params={"modality": "tags", "by": "profile"})
    assert response.status_code == 409
    assert response.json()["detail"] == (f"the served bundle ({features_bundle.version}, model 'toy-mf') has no "
                                         "user-profile cosines (item_metadata profile_<modality>, declared by the "
                                         "manifest's profile_cosine): it was exported without content modalities or "
                                         "before they were written; export its run again to list items by=profile")  # fmt: skip


def _cursor(version: str, modality: str = "tags", state: str | None = None) -> str:
    return encode_cursor(version, modality, state, 0.5, "i3")


def _format_1_cursor(version: str, modality: str, score: float, item_id: str) -> str:
    """A cursor as the service wrote them before ``by`` (the reviewer's listing)."""
    raw = json.dumps([1, version, modality, None, score, item_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode("ascii").rstrip("=")


BAD_FILTERS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown modality", {"modality": "image"},
     "modality 'image' is not judged by this bundle's model; by=reviewer lists: audio, tags"),
    ("unknown modality by profile", {"modality": "image", "by": "profile"},
     "modality 'image' has no user-profile cosines here; by=profile lists: audio, tags"),
    ("unknown detector", {"modality": "tags", "by": "clip"},
     "query parameter by: Input should be 'reviewer' or 'profile' (got 'clip')"),
    ("unknown state", {"modality": "tags", "state": "bad"},
     "state 'bad' is not a quality state; states: high-quality, disparity, low-quality"),
    ("limit 0", {"modality": "tags", "limit": 0}, "limit must be between 1 and 500, got 0"),
    ("limit above the setting", {"modality": "tags", "limit": 501}, "limit must be between 1 and 500, got 501"),
    ("limit not a number", {"modality": "tags", "limit": "ten"},
     "query parameter limit: Input should be a valid integer, unable to parse string as an integer (got 'ten')"),
    ("no modality", {}, "query parameter modality: Field required"),
    ("garbage cursor", {"modality": "tags", "cursor": "not-a-cursor!"},
     "cursor: not a cursor of GET /v1/audit (pass the previous page's next_cursor unchanged)"),
    ("base64 of something else", {"modality": "tags", "cursor": "WzEsMl0"},
     "cursor: not a cursor of GET /v1/audit (pass the previous page's next_cursor unchanged)"),
    ("cursor of other filters", {"modality": "audio", "cursor": "{version}"},
     "cursor: issued for by=reviewer, modality=tags, state=(any); this request asks for by=reviewer, modality=audio, "
     "state=(any): repeat the first page's filters with its cursors, or start without a cursor"),
    ("cursor of the other detector", {"modality": "tags", "by": "profile", "cursor": "{version}"},
     "cursor: issued for by=reviewer, modality=tags, state=(any); this request asks for by=profile, modality=tags, "
     "state=(any): repeat the first page's filters with its cursors, or start without a cursor"),
]  # fmt: skip


@pytest.mark.parametrize(("params", "message"), [case[1:] for case in BAD_FILTERS], ids=[case[0] for case in BAD_FILTERS])
def test_a_bad_filter_is_refused_with_422_naming_it(audit_client: TestClient, quality_bundle: SyntheticBundle,
                                                     params: dict[str, Any], message: str) -> None:  # fmt: skip
    if params.get("cursor") == "{version}":
        params = {**params, "cursor": _cursor(quality_bundle.version)}
    response = audit_client.get("/v1/audit", params=params)
    assert response.status_code == 422
    assert response.json()["detail"] == message


def test_a_cursor_of_another_bundle_is_refused_with_409(make_settings: Callable[..., ServiceSettings], serve: Serve,
                                                        quality_bundle: SyntheticBundle, tmp_path: Path) -> None:  # fmt: skip
    live = tmp_path / "live-bundle"
    shutil.copytree(quality_bundle.path, live)
    with serve(make_settings(bundle_dir=live)) as client:
        first = client.get("/v1/audit", params={"modality": "tags", "limit": 3}).json()
        shutil.rmtree(live)
        other = make_bundle(live, seed=4, quality=True, model_name="toy-r2mr")
        assert client.post("/v1/admin/reload").status_code == 200
        response = client.get("/v1/audit", params={"modality": "tags", "limit": 3, "cursor": first["next_cursor"]})
    assert response.status_code == 409
    assert response.json()["detail"] == (f"cursor: issued under bundle {quality_bundle.version}, the service now serves "
                                         f"{other.version} (its scores are another model's): start the listing again "
                                         "without a cursor")  # fmt: skip


def test_the_document_names_the_bundles_modalities_states_and_limit(make_settings: Callable[..., ServiceSettings],
                                                                    serve: Serve, quality_bundle: SyntheticBundle) -> None:  # fmt: skip
    with serve(make_settings(bundle_dir=quality_bundle.path, audit_max_limit=40, api_key=API_KEY)) as client:
        operation = client.get("/openapi.json").json()["paths"]["/v1/audit"]["get"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert parameters["modality"]["schema"]["enum"] == ["audio", "tags"]
    assert parameters["state"]["schema"]["enum"] == list(STATES)
    assert (parameters["limit"]["schema"]["minimum"], parameters["limit"]["schema"]["maximum"]) == (1, 40)
    assert {"401", "403", "409", "422"} <= set(operation["responses"])
    assert operation["security"] == [{"APIKeyHeader": []}]  # keyed even though reads are open
    assert "worst first" in operation["description"]
    assert parameters["by"]["schema"]["enum"] == ["reviewer", "profile"] and parameters["by"]["schema"]["default"] == "reviewer"
    assert list(parameters["by"]["examples"]) == ["reviewer", "profile"]
    assert "by=reviewer scores audio, tags; by=profile scores audio, tags." in operation["description"]


# --- by the user-profile cosine ----------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["tags", "audio"])
@pytest.mark.parametrize("state", [None, "low-quality", "disparity"])
def test_profile_pages_concatenate_to_the_brute_force_order(audit_client: TestClient, quality_bundle: SyntheticBundle,
                                                             modality: str, state: str | None) -> None:  # fmt: skip
    rows = trained_rows(quality_bundle)
    expected = brute_force(rows, modality, state, field="profile")
    filters: dict[str, Any] = {"modality": modality, "by": "profile", **({"state": state} if state else {})}
    listed = listing(audit_client, limit=6, **filters)
    assert [item["id"] for item in listed] == expected
    assert 0 < len(expected) < len(rows)  # items lacking the modality have no cosine and are not listed
    scores = [item["score"] for item in listed]
    if state is None:
        assert len(set(scores)) < len(scores)  # ties (rounded cosines) ordered by id, across page boundaries
    for item in listed:
        row = rows[item["id"]]
        assert item["score"] == row[f"profile_{modality}"] and item["source"] == "trained"
        assert item["scores"] == {"audio": row["profile_audio"], "tags": row["profile_tags"]}
        assert item["state"] == row["quality_state"]  # the reviewer's state, beside the profile's score
        assert item["has_modality"] is True


def test_ingested_items_are_not_listed_by_profile(audit_client: TestClient, quality_bundle: SyntheticBundle) -> None:
    before = listing(audit_client, limit=50, modality="tags", by="profile")
    ingest(audit_client, quality_bundle, new_items(quality_bundle, 7, 6, prefix="fresh-"))
    after = listing(audit_client, limit=50, modality="tags", by="profile")
    assert after == before  # no interactions in the bundle: no profile
    reviewed = listing(audit_client, limit=500, modality="tags")
    assert any(item["id"].startswith("fresh-") for item in reviewed)  # the reviewer lists them


def test_profile_pages_stay_correct_when_items_are_deleted_and_ingested_between_them(
    audit_client: TestClient, quality_bundle: SyntheticBundle
) -> None:
    expected = brute_force(trained_rows(quality_bundle), "audio", None, field="profile")
    first = audit_client.get("/v1/audit", params={"modality": "audio", "by": "profile", "limit": 5}).json()
    assert [item["id"] for item in first["items"]] == expected[:5]
    for gone in (expected[4], expected[7]):  # the cursor's own item, and one the next page would list
        assert audit_client.delete(f"/v1/items/{gone}").status_code == 200
    ingest(audit_client, quality_bundle, new_items(quality_bundle, 9, 4, prefix="between-"))
    rest, cursor = [], first["next_cursor"]
    while cursor is not None:
        page = audit_client.get("/v1/audit", params={"modality": "audio", "by": "profile", "limit": 5,
                                                     "cursor": cursor}).json()  # fmt: skip
        rest += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
    assert rest == [i for i in expected[5:] if i != expected[7]]


def test_the_cosines_are_not_item_extras(audit_client: TestClient, quality_bundle: SyntheticBundle) -> None:
    """The cosines are the audit's (write scope); GET /v1/items answers a trained item's model outputs, as an
    ingested item's."""
    item_id = next(iter(trained_rows(quality_bundle)))
    extra = audit_client.get(f"/v1/items/{item_id}").json()["extra"]
    assert not any(key.startswith("profile_") for key in extra) and "quality_tags" in extra


def test_a_bundle_without_a_reviewer_is_audited_by_profile(make_settings: Callable[..., ServiceSettings], serve: Serve,
                                                           profile_bundle: SyntheticBundle) -> None:  # fmt: skip
    with serve(make_settings(bundle_dir=profile_bundle.path)) as http:
        client = RecommendationClient(http_client=http)
        expected = brute_force(trained_rows(profile_bundle), "tags", None, field="profile")
        listed = list(client.audited_items("tags", by="profile", page_size=4))
        assert [item.id for item in listed] == expected and expected
        assert all(item.state is None for item in listed)
        with pytest.raises(ServiceHTTPError) as error:
            client.audit("tags")
        assert error.value.status_code == 409
        assert error.value.detail.endswith("(by=profile lists its items by the user-profile cosine)")
        with pytest.raises(ServiceHTTPError) as error:
            client.audit("tags", by="profile", state="low-quality")
        assert (error.value.status_code, error.value.detail) == (
            422, "state: the quality states are the reviewer's, and this bundle has none; leave the filter out")
        operation = http.get("/openapi.json").json()["paths"]["/v1/audit"]["get"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert "state" not in parameters and list(parameters["by"]["examples"]) == ["profile"]
    assert parameters["modality"]["schema"]["enum"] == ["audio", "tags"]
    assert "by=profile scores audio, tags." in operation["description"]


def test_a_cursor_written_before_by_still_pages_the_reviewers_listing(audit_client: TestClient,
                                                                      quality_bundle: SyntheticBundle) -> None:  # fmt: skip
    first = audit_client.get("/v1/audit", params={"modality": "tags", "limit": 4}).json()
    last = first["items"][-1]
    old = _format_1_cursor(quality_bundle.version, "tags", last["score"], last["id"])
    second = audit_client.get("/v1/audit", params={"modality": "tags", "limit": 4, "cursor": old})
    assert second.status_code == 200
    again = audit_client.get("/v1/audit", params={"modality": "tags", "limit": 4, "cursor": first["next_cursor"]})
    assert second.json()["items"] == again.json()["items"]
    other = audit_client.get("/v1/audit", params={"modality": "tags", "by": "profile", "limit": 4, "cursor": old})
    assert other.status_code == 422 and other.json()["detail"].startswith("cursor: issued for by=reviewer, modality=tags")
