"""Operations: liveness, readiness (KServe v2 paths too), ``/info`` and ``/metrics``.

None of these needs the API key: probes and scrapers carry no credentials.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import seq2serve
from seq2serve.service.deps import StateDep, unavailable
from seq2serve.service.errors import error_responses
from seq2serve.service.schemas import Status

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness: 200 while the process lives", response_model=Status)
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v2/health/live", summary="Liveness (KServe v2 path)", response_model=Status)
async def live() -> dict[str, str]:
    return {"status": "ok"}


_READY_DOC = "Readiness: 200 once the model is loaded and warmed, 503 before and while draining"


async def _ready(state: StateDep) -> JSONResponse:
    error = unavailable(state)
    if error is not None:
        return error.response()
    return JSONResponse({"status": "ready"})


router.add_api_route(
    "/ready", _ready, summary=_READY_DOC, response_model=Status, responses=error_responses(503)
)
router.add_api_route(
    "/v2/health/ready",
    _ready,
    summary=_READY_DOC + " (KServe v2 path)",
    response_model=Status,
    responses=error_responses(503),
    operation_id="ready_v2",
)


@router.get(
    "/info",
    summary="Model, runtime, execution provider, limits and version",
)
async def info(state: StateDep) -> dict[str, Any]:
    settings = state.settings
    out: dict[str, Any] = {
        "model_id": state.model_id,
        "model_dir": str(settings.model_dir),
        "runtime": state.runtime,
        "device": settings.device,
        "quantized": settings.quantized,
        "execution_provider": state.provider,
        "version": seq2serve.__version__,
        "ready": unavailable(state) is None,
    }
    if state.engine is not None:
        cfg = state.engine.config
        out["config"] = {
            "vocab_size": cfg.vocab_size,
            "d_model": cfg.d_model,
            "n_heads": cfg.n_heads,
            "d_ff": cfg.d_ff,
            "n_encoder_layers": cfg.n_encoder_layers,
            "n_decoder_layers": cfg.n_decoder_layers,
            "max_source_positions": cfg.max_source_positions,
            "max_target_positions": cfg.max_target_positions,
            "labels": list(cfg.labels),
        }
    if state.limits is not None:
        limits = state.limits
        out["limits"] = {
            "max_input_tokens": limits.max_input_tokens,
            "max_new_tokens": limits.max_new_tokens,
            "default_new_tokens": limits.default_new_tokens,
            "max_inputs_per_request": limits.max_inputs_per_request,
            "max_body_bytes": limits.max_body_bytes,
            "max_batch_size": limits.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "max_queue": limits.max_queue,
            "max_stop_strings": limits.max_stop_strings,
            "max_stop_length": limits.max_stop_length,
            "max_beams": limits.max_beams,
        }
    return out


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)
