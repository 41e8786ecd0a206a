"""One error shape for every failure: ``{"error": {"message", "type", "param", "code"}}``.

Routes raise ``ApiError``; the handlers installed by ``install_error_handlers`` turn it, request
validation errors, Starlette's HTTP errors and anything unexpected into that shape, so no client
ever sees an HTML page or a bare 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# Error "type" values, one per status family (OpenAI's names where it has one).
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
TOO_LARGE = "request_too_large"
OVERLOADED = "overloaded_error"
UNAVAILABLE = "unavailable_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"

_TYPE_BY_STATUS = {
    400: INVALID_REQUEST,
    401: AUTHENTICATION,
    404: NOT_FOUND,
    405: INVALID_REQUEST,
    413: TOO_LARGE,
    415: INVALID_REQUEST,
    422: INVALID_REQUEST,
    429: OVERLOADED,
    499: "client_closed_request",  # nginx's code: logged and counted, never delivered
    503: UNAVAILABLE,
}


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong; names the field and the limit.")
    type: str = Field(description="Error family, e.g. invalid_request_error.")
    param: str | None = Field(description="The offending field, dotted (parameters.top_p).")
    code: str | None = Field(description="Machine-readable reason, e.g. queue_full.")


class ErrorBody(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    """An error answer: raised anywhere below a route, rendered by the handlers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, SERVER_ERROR)
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    """A 422: a field that parsed but is not acceptable (the message names field and limit)."""
    return ApiError(422, message, param=param, code=code)


def error_json(error: ApiError) -> str:
    return json.dumps(error.body(), ensure_ascii=False)


# -- request validation -------------------------------------------------------------------


def dotted(loc: Sequence[int | str]) -> str | None:
    """("body", "parameters", "top_p") -> "parameters.top_p"; the body itself -> None."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    # Pydantic names the member of a union it tried ("inputs.str", "inputs.list[str]"); the
    # client only knows the field.
    parts = [p for p in parts if not _is_union_tag(p)]
    return ".".join(parts) or None


def _is_union_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool") or part.endswith("]") or "-" in part


def from_validation_error(exc: RequestValidationError) -> ApiError:
    errors = list(exc.errors())
    if not errors:
        return ApiError(422, "invalid request", code="invalid_value")
    # A JSON syntax error is a malformed request (400), not an invalid field.
    for err in errors:
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "JSON decode error")
            return ApiError(400, f"malformed JSON body: {reason}", code="invalid_json")
    # For a union ("a text or a list of texts") pydantic reports why each member failed; the
    # deepest location ("inputs.0" inside the list) is the one that tells the client what to fix.
    first = max(errors, key=lambda e: len(dotted(e.get("loc", ())) or ""))
    param = dotted(first.get("loc", ()))
    kind = str(first.get("type", "invalid_value"))
    msg = str(first.get("msg", "invalid value"))
    if kind == "missing":
        message = f"{param or 'body'}: field required"
    elif kind == "extra_forbidden":
        message = f"{param}: unknown field"
    elif kind == "model_attributes_type" and param is None:
        message = "the body must be a JSON object (send Content-Type: application/json)"
    else:
        message = f"{param or 'body'}: {msg}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return ApiError(422, message, param=param, code=kind)


# -- handlers -----------------------------------------------------------------------------


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return from_validation_error(exc).response()


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 404:
        message = f"no route {request.method} {request.url.path}"
    elif status == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    elif status == 400:
        # FastAPI's "There was an error parsing the body": invalid UTF-8 and the like.
        message = f"malformed body: {exc.detail}"
    else:
        message = str(exc.detail)
    code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}.get(status)
    error = ApiError(status, message, code=code, headers=exc.headers)
    return error.response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=(type(exc), exc, exc.__traceback__))
    error = ApiError(500, "internal server error", code="internal_error")
    return error.response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


# The error answers every route documents in OpenAPI.
def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Malformed JSON or body",
        401: "Missing or wrong API key",
        404: "No such resource",
        413: "Body larger than the limit",
        422: "Invalid field or limit exceeded",
        429: "Overloaded; retry after Retry-After seconds",
        503: "Not ready, or draining",
    }
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": descriptions[status]}
        if status == 429:
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying",
                    "schema": {"type": "integer"},
                }
            }
        out[status] = entry
    return out
