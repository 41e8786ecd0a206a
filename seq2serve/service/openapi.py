"""The OpenAPI document, completed with what FastAPI cannot see from the route signatures:
the schema of each streamed event, and this server's limits (which depend on the model, so
the document is built once the model is loaded)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from seq2serve.service.schemas import StreamEvent
from seq2serve.service.settings import Limits
from seq2serve.service.state import ServiceState

_REF = "#/components/schemas/{model}"


def install_openapi(app: FastAPI, state: ServiceState) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        _, defs = models_json_schema([(StreamEvent, "serialization")], ref_template=_REF)
        for name, definition in defs.get("$defs", {}).items():
            components.setdefault(name, definition)
        use_error_body(schema)
        if state.limits is None:
            return schema  # not loaded yet: no limits to state, and nothing cached
        document_limits(components, state.limits)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def use_error_body(schema: dict[str, Any]) -> None:
    """FastAPI documents its own 422 shape on routes that declare none; every error here has
    the one error shape, so say so."""
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            response = operation.get("responses", {}).get("422")
            if response is None:
                continue
            response["content"] = {"application/json": {"schema": dict(error_ref)}}
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def _constrain(
    components: dict[str, Any], model: str, field: str, kind: str, key: str, value: object
) -> None:
    prop = components.get(model, {}).get("properties", {}).get(field)
    if prop is None:
        return
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == kind:
            branch[key] = value


def document_limits(components: dict[str, Any], limits: Limits) -> None:
    _constrain(
        components,
        "GenerateParameters",
        "max_new_tokens",
        "integer",
        "maximum",
        limits.max_new_tokens,
    )
    _constrain(
        components, "CompletionRequest", "max_tokens", "integer", "maximum", limits.max_new_tokens
    )
    tokens = f" At most {limits.max_input_tokens} tokens each (max_input_tokens)."
    for model, field in (
        ("EncodeRequest", "inputs"),
        ("ClassifyRequest", "inputs"),
        ("CompletionRequest", "prompt"),
        ("EmbeddingRequest", "input"),
        ("GenerateRequest", "inputs"),
    ):
        _constrain(components, model, field, "array", "maxItems", limits.max_inputs_per_request)
        prop = components.get(model, {}).get("properties", {}).get(field)
        if prop is not None:
            prop["description"] = (prop.get("description") or "") + tokens
