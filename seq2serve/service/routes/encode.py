"""``POST /v1/encode`` (embeddings from the encoder) and ``POST /v1/classify`` (its
classification head). Both batch dynamically with other requests in the engine."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from seq2serve.engine.scheduler import EncodeOutput, Engine
from seq2serve.service.deps import ServingDep
from seq2serve.service.errors import ApiError, error_responses
from seq2serve.service.inputs import as_list, param_names, tokenize
from seq2serve.service.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    EncodeRequest,
    EncodeResponse,
)
from seq2serve.service.settings import Limits
from seq2serve.service.work import engine_errors

router = APIRouter(tags=["encode"])

ERRORS = error_responses(400, 401, 413, 422, 429, 503)


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 length (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    result: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return result


def _floats(array: np.ndarray) -> Any:
    # JSON has no NaN or infinity; a model that produced one still gets a valid answer.
    return np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).tolist()


async def run_encoder(
    engine: Engine,
    inputs: str | list[str],
    limits: Limits,
    *,
    truncate: bool,
    param: str,
) -> tuple[EncodeOutput, int]:
    """The encoder's outputs for every input, and the number of input tokens."""
    texts = as_list(inputs, limits, param)
    ids = await tokenize(engine, texts, param_names(inputs, param), limits, truncate=truncate)
    with engine_errors():
        output = await engine.encode(ids)
    return output, sum(len(row) for row in ids)


def pooled(output: EncodeOutput, pooling: str, normalize: bool) -> np.ndarray:
    """(B, C) vectors: the encoder's mean over real tokens, or the first token's state."""
    if pooling == "first":
        vectors = np.stack([h[0] for h in output.last_hidden_state])
    else:
        vectors = output.pooled
    return unit(vectors) if normalize else vectors


@router.post(
    "/v1/encode",
    summary="Encode texts into vectors",
    response_model=EncodeResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
)
async def encode(body: EncodeRequest, serving: ServingDep) -> JSONResponse:
    output, n_tokens = await run_encoder(
        serving.engine, body.inputs, serving.limits, truncate=body.truncate, param="inputs"
    )
    out: dict[str, Any] = {"model": serving.model_id}
    if body.pooling == "none":
        states = output.last_hidden_state
        out["hidden_states"] = [_floats(unit(h) if body.normalize else h) for h in states]
    else:
        out["embeddings"] = _floats(pooled(output, body.pooling, body.normalize))
    out["usage"] = {"input_tokens": n_tokens}
    return JSONResponse(out)


@router.post(
    "/v1/classify",
    summary="Classify texts with the encoder's classification head",
    response_model=ClassifyResponse,
    responses=ERRORS,
)
async def classify(body: ClassifyRequest, serving: ServingDep) -> JSONResponse:
    labels = serving.engine.config.labels
    if not labels:
        raise ApiError(422, "this model has no classification head", code="no_classifier")
    output, n_tokens = await run_encoder(
        serving.engine, body.inputs, serving.limits, truncate=body.truncate, param="inputs"
    )
    probs = softmax(output.class_logits.astype(np.float64))
    k = len(labels) if body.top_k is None else min(body.top_k, len(labels))
    results = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        results.append([{"label": labels[i], "score": _floats(np.asarray(row[i]))} for i in order])
    return JSONResponse(
        {"model": serving.model_id, "results": results, "usage": {"input_tokens": n_tokens}}
    )
