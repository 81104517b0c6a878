"""The OpenAPI document of a running service: FastAPI's generated schema, completed with what only the settings and
the served bundle know, so that the document and the behaviour agree: every request it calls valid is one the
service accepts (or answers with a documented 401/404/409/503), every request it calls invalid is refused, and every
answer has the documented shape.

What the routes and models cannot say by themselves, because it is known only at run time:
- from the settings: ``k`` in 1..max_k, the audit's ``limit`` in 1..audit_max_limit, batches of 1..max_batch_items
  items, whether writes need ``X-API-Key``;
- from the bundle (so the document follows a reload): the modalities an item may carry and their sizes, whether text
  and images are accepted (an image is a string of format ``base64-image``: an image file in base64, or a data: URL
  of one), which content an item must have, whether diversity by semantic codes is available, and examples naming
  its users and items; the modalities and states the audit accepts (``GET /v1/audit``).
Errors: every 4xx answer is an ``ErrorResponse`` (``{detail: str, errors?: [...]}``), FastAPI's default
``HTTPValidationError`` is never documented.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI

from service.access import AccessControl
from service.audit import REVIEWER, audit_detectors
from service.bundle import Bundle
from service.settings import ServiceSettings

MAX_FEATURE_MAGNITUDE = 1e30  # what service/encoding.py accepts in a modality feature value
IMAGE_FORMAT = "base64-image"  # a string format of this API: an image file in base64, or a data: URL of one
ERROR_REF = "#/components/schemas/ErrorResponse"
FASTAPI_ERROR_REF = "#/components/schemas/HTTPValidationError"

Document = dict[str, Any]


READ_ACCESS_MARK = "x-mmrec-read-access"  # openapi_extra of the reads gated by read_access (removed from the document)
OPEN_READ: dict[str, Any] = {READ_ACCESS_MARK: True}


def install_openapi(app: FastAPI, settings: ServiceSettings, bundle: Callable[[], Bundle | None]) -> None:
    """Make ``app.openapi()`` (and ``/openapi.json``) the completed document; ``bundle()`` gives the bundle served
    now (None before start-up). Built once per bundle version."""
    generate = app.openapi  # FastAPI's own, caching the generated schema
    built: dict[str, Document] = {}

    def openapi() -> Document:
        served = bundle()
        key = served.version if served is not None else ""
        if key not in built:
            built.clear()
            built[key] = complete(generate(), settings, served)
        return built[key]

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the document


def complete(generated: Document, settings: ServiceSettings, bundle: Bundle | None) -> Document:
    """A completed copy of FastAPI's document (see the module docstring)."""
    doc = copy.deepcopy(generated)
    _error_bodies(doc)
    _optional_query_parameters(doc)
    _settings_limits(doc, settings)
    access = AccessControl(settings)
    if not access.keyed:
        _open_writes(doc)
    elif settings.read_access == "open":
        _optional_key(doc)
    for _, _, operation in _operations(doc):
        operation.pop(READ_ACCESS_MARK, None)
    if not access.enabled:
        for _, _, operation in _operations(doc):
            operation.get("responses", {}).pop("429", None)
    if bundle is not None:
        _bundle_items(doc, bundle)
        _bundle_codes(doc, bundle)
        _bundle_audit(doc, bundle)
        _bundle_examples(doc, bundle, settings)
    return doc


# --- errors --------------------------------------------------------------------------------------------------


def _error_bodies(doc: Document) -> None:
    """Any answer still documented with FastAPI's HTTPValidationError gets ErrorResponse, what the app sends."""
    for _, _, operation in _operations(doc):
        for response in operation.get("responses", {}).values():
            media = response.get("content", {}).get("application/json", {})
            if media.get("schema", {}).get("$ref") == FASTAPI_ERROR_REF:
                media["schema"] = {"$ref": ERROR_REF}
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


# --- settings ------------------------------------------------------------------------------------------------


def _optional_query_parameters(doc: Document) -> None:
    """An optional query parameter is left out, never sent as null: ``anyOf [X, null]`` -> ``X``."""
    for _, _, operation in _operations(doc):
        for parameter in operation.get("parameters", []):
            schema = parameter.get("schema", {})
            variants = schema.get("anyOf", [])
            if parameter.get("in") == "query" and {"type": "null"} in variants and len(variants) == 2:
                (kept,) = [v for v in variants if v != {"type": "null"}]
                del schema["anyOf"]
                schema.update(kept)


def _settings_limits(doc: Document, settings: ServiceSettings) -> None:
    k_range = {"minimum": 1, "maximum": settings.max_k}
    for _, _, operation in _operations(doc):
        for parameter in operation.get("parameters", []):
            if parameter["name"] == "k" and parameter.get("in") == "query":
                parameter["schema"].update(k_range)
    request = _schema(doc, "RecommendationRequest")
    for variant in request["properties"]["k"].get("anyOf", []):
        if variant.get("type") == "integer":
            variant.update(k_range)
    for parameter in doc["paths"]["/v1/audit"]["get"]["parameters"]:
        if parameter["name"] == "limit":
            parameter["schema"].update({"minimum": 1, "maximum": settings.audit_max_limit})
    body = doc["paths"]["/v1/items"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    for variant in body.get("oneOf", []):
        if variant.get("type") == "array":
            variant["maxItems"] = settings.max_batch_items


def _optional_key(doc: Document) -> None:
    """Open reads: a key may be sent (an unknown one is still 401) but none is needed, so no 403 either."""
    for _, _, operation in _operations(doc):
        if operation.get(READ_ACCESS_MARK) and "security" in operation:
            operation["security"] = [{}, *operation["security"]]
            operation.get("responses", {}).pop("403", None)


def _open_writes(doc: Document) -> None:
    """No API keys: every operation is open, so none documents security, 401 or 403."""
    for _, _, operation in _operations(doc):
        operation.pop("security", None)
        operation.get("responses", {}).pop("401", None)
        operation.get("responses", {}).pop("403", None)
    doc.get("components", {}).pop("securitySchemes", None)


# --- the bundle ----------------------------------------------------------------------------------------------


def _bundle_items(doc: Document, bundle: Bundle) -> None:
    """ItemCreate as this bundle can encode it: its modalities and their sizes, text and images only with their
    encoders, at least one piece of content, and never both a raw input and the features of its modality."""
    item = _schema(doc, "ItemCreate")
    properties = item["properties"]
    value = {"type": "number", "minimum": -MAX_FEATURE_MAGNITUDE, "maximum": MAX_FEATURE_MAGNITUDE}
    properties["features"] = {
        "type": "object",
        "description": properties["features"].get("description", ""),
        "properties": {
            name: {"type": "array", "items": value, "minItems": m.dim, "maxItems": m.dim}
            for name, m in bundle.modalities.items()
        },
        "additionalProperties": False,
    }
    text, image = bundle.text_modality, bundle.image_modality
    given: list[Document] = [{"required": ["features"], "properties": {"features": {"minProperties": 1}}}]
    both: list[Document] = []
    for field, modality in (("text", text), ("image_base64", image)):
        if modality is None:
            properties.pop(field)
            continue
        if field == "image_base64":
            for variant in properties[field].get("anyOf", []):
                if variant.get("type") == "string":
                    variant["format"] = IMAGE_FORMAT
        given.append({"required": [field], "properties": {field: {"type": "string"}}})
        both.append(
            {
                "required": [field, "features"],
                "properties": {field: {"type": "string"}, "features": {"required": [modality.name]}},
            }
        )
    item["anyOf"] = given
    if both:
        item["not"] = {"anyOf": both}
    item["examples"] = [_item_example(bundle)]
    if bundle.item_encoder is None:
        operation = doc["paths"]["/v1/items"]["post"]
        operation["description"] += (
            f"\n\nThe served bundle ({bundle.version}) has no item encoder: every item is refused with 422."
        )


def _item_example(bundle: Bundle) -> Document:
    example: Document = {"id": "new-item-1", "metadata": {"year": 2024}}
    if bundle.text_modality is not None:
        example["text"] = "A quiet film about a lighthouse keeper."
    features = {name: [0.0] * m.dim for name, m in bundle.modalities.items() if m.text is None and m.image is None}
    if features or bundle.text_modality is None:
        example["features"] = features
    return example


def _bundle_codes(doc: Document, bundle: Bundle) -> None:
    """Diversity by semantic-code prefix: code_prefix_length up to the bundle's code levels; without codes,
    max_per_code_prefix is not part of the API."""
    request = _schema(doc, "RecommendationRequest")
    operation = doc["paths"]["/v1/users/{user_id}/recommendations"]["get"]
    if bundle.code_field is None:
        request["properties"].pop("max_per_code_prefix", None)
        operation["parameters"] = [p for p in operation["parameters"] if p["name"] != "max_per_code_prefix"]
        return
    request["properties"]["code_prefix_length"]["maximum"] = bundle.code_levels
    for parameter in operation["parameters"]:
        if parameter["name"] == "code_prefix_length":
            parameter["schema"]["maximum"] = bundle.code_levels


def _bundle_audit(doc: Document, bundle: Bundle) -> None:
    """The audit's detectors, modalities and states as this bundle carries them (enums and examples); a bundle
    without any detector's scores says that every request answers 409."""
    operation = doc["paths"]["/v1/audit"]["get"]
    detectors = audit_detectors(bundle)
    if not detectors:
        operation["description"] += (f"\n\nThe served bundle ({bundle.version}) has neither modality quality scores "
                                     "nor user-profile cosines: every request is answered 409.")  # fmt: skip
        return
    modalities = sorted({m for fields in detectors.values() for m in fields.modalities})
    operation["description"] += "\n\nThe served bundle: " + "; ".join(
        f"by={by} scores {', '.join(fields.modalities)}" for by, fields in detectors.items()) + "."  # fmt: skip
    states = detectors[REVIEWER].states if REVIEWER in detectors else ()
    for parameter in operation["parameters"]:
        if parameter["name"] == "modality":
            parameter["schema"]["enum"] = modalities
            parameter["examples"] = {"scored": {"summary": "A modality the bundle scores", "value": modalities[0]}}
        elif parameter["name"] == "by":
            parameter["examples"] = {by: {"summary": f"The {by}'s listing", "value": by} for by in detectors}
        elif parameter["name"] == "state" and states:
            parameter["schema"]["enum"] = list(states)
            parameter["examples"] = {"worst": {"summary": "Both modalities below η", "value": states[-1]}}
    if not states:
        operation["parameters"] = [p for p in operation["parameters"] if p["name"] != "state"]


def _bundle_examples(doc: Document, bundle: Bundle, settings: ServiceSettings) -> None:
    """Examples naming users and items of the served bundle, so that they show (and test) answers with content,
    not only 404s. The delete example names another item than the read examples."""
    if not bundle.item_ids:
        return
    first, last = bundle.item_ids[0], bundle.item_ids[-1]
    user = bundle.user_ids[0] if bundle.user_ids else "42"
    for _, method, operation in _operations(doc):
        for parameter in operation.get("parameters", []):
            if parameter.get("in") != "path":
                continue
            if parameter["name"] == "user_id":
                parameter["examples"] = {"trained_user": {"summary": "A user of the training data", "value": user}}
            elif parameter["name"] == "item_id":
                item = last if method == "delete" else first
                parameter["examples"] = {"trained_item": {"summary": "An item of the bundle", "value": item}}
    _schema(doc, "EventsCreate")["examples"] = [
        {"events": [{"item_id": first}]},
        {"events": [{"item_id": first, "kind": "view", "timestamp": 1714564800.0}, {"item_id": bundle.item_ids[1 % len(bundle.item_ids)]}]},
    ]
    _schema(doc, "RecommendationRequest")["examples"] = [
        {"user_id": user, "k": settings.default_k},
        {"history": bundle.item_ids[:2], "k": settings.default_k, "exclude_seen": False},
    ]


# --- walking the document ------------------------------------------------------------------------------------


def _operations(doc: Document) -> Iterator[tuple[str, str, Document]]:
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            if method in ("get", "put", "post", "delete", "patch", "head", "options"):
                yield path, method, operation


def _schema(doc: Document, name: str) -> Document:
    schema: Document = doc["components"]["schemas"][name]
    return schema
