"""FastAPI dependencies and their ``Annotated`` aliases: what a route may ask for.

Every dependency is ``async def``: FastAPI runs a plain ``def`` dependency in its thread
pool, a thread hop per dependency per request for what is an attribute read.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Serving:
    """What a route that runs the model reads: the engine and the request limits, once the
    model is loaded and warm, and the service state they came from.

    One dependency, not one each for the engine, the limits and the settings: FastAPI walks
    every dependency and sub-dependency of every request, and those three (each through the
    state) took 44 of the 436 us of event-loop CPU a one-token stream cost (default model, 16
    closed-loop clients, medians of six rounds: 1,062 to 1,146 requests/s)."""

    state: ServiceState
    engine: Engine
    limits: Limits

    @property
    def settings(self) -> Settings:
        return self.state.settings

    @property
    def model_id(self) -> str:
        return self.state.model_id


async def get_serving(request: Request) -> Serving:
    state = await get_state(request)
    error = unavailable(state)
    if error is not None:
        raise error
    # The lifespan sets the limits before it starts the engine: a ready engine has them.
    assert state.engine is not None and state.limits is not None
    return Serving(state, state.engine, state.limits)


ServingDep = Annotated[Serving, Depends(get_serving)]

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
