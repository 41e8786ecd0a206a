"""FastAPI dependencies and their ``Annotated`` aliases: what a route may ask for.

Every dependency is ``async def``: FastAPI runs a plain ``def`` dependency in its thread
pool, a thread hop per dependency per request for what is an attribute read.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from seq2serve.engine.scheduler import Engine
from seq2serve.service.errors import ApiError
from seq2serve.service.settings import Limits, Settings
from seq2serve.service.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_settings(state: StateDep) -> Settings:
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def unavailable(state: ServiceState) -> ApiError | None:
    """Why the service cannot take work now, or None when it can."""
    if state.traffic.draining:
        return ApiError(503, "the server is draining (shutting down)", code="draining")
    if state.engine is None or not state.engine.ready:
        return ApiError(503, "the model is not loaded and warmed up yet", code="not_ready")
    return None


async def get_engine(state: StateDep) -> Engine:
    error = unavailable(state)
    if error is not None:
        raise error
    assert state.engine is not None
    return state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


async def get_limits(state: StateDep) -> Limits:
    if state.limits is None:
        raise ApiError(503, "the model is not loaded yet", code="not_ready")
    return state.limits


LimitsDep = Annotated[Limits, Depends(get_limits)]

_bearer = HTTPBearer(auto_error=False, description="The server's SEQ2SERVE_API_KEY")


async def require_api_key(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Installed on the /v1 routers only when an API key is configured."""
    key = settings.api_key
    if key is None:
        return
    if credentials is None:
        raise ApiError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # Constant-time comparison, so response timing does not reveal how much of a guess
    # matched.
    if not hmac.compare_digest(
        credentials.credentials.encode("utf-8"), key.get_secret_value().encode("utf-8")
    ):
        raise ApiError(
            401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
