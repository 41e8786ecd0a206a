"""OpenAI-compatible subset: ``/v1/completions`` (streaming included), ``/v1/embeddings``,
``/v1/models``. The official ``openai`` client works against these unmodified.

Semantics follow OpenAI's API where it defines them: ``temperature`` defaults to 1 (sampling)
and 0 means greedy; a stream ends with ``data: [DONE]``.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from seq2serve.engine.generation import FINISH_LENGTH, SamplingParams
from seq2serve.engine.scheduler import GenerationStream, RequestFailed
from seq2serve.service import sse
from seq2serve.service.deps import ServingDep, StateDep
from seq2serve.service.errors import ApiError, error_responses, invalid
from seq2serve.service.inputs import as_list, check_text, param_names, tokenize
from seq2serve.service.middleware import new_id
from seq2serve.service.routes.encode import pooled, run_encoder
from seq2serve.service.schemas import (
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    sse_event_schema,
)
from seq2serve.service.settings import Limits
from seq2serve.service.state import ServiceState
from seq2serve.service.work import collect, open_stream

router = APIRouter(tags=["openai"])

_STREAM_DOC = (
    "Server-Sent Events (with `stream: true`): `data:` events holding completion chunks "
    "(`choices[0].text` is the new text; the last chunk has `finish_reason`), then, with "
    "`stream_options.include_usage`, a chunk with `usage` and no choices; then `data: [DONE]`."
)

COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion (JSON), or a stream of completion chunks (SSE).",
        "content": {
            "application/json": {},
            sse.MEDIA_TYPE: {"schema": sse_event_schema(None, _STREAM_DOC)},
        },
    },
    **error_responses(400, 401, 404, 413, 422, 429, 503),
}


def check_model(state: ServiceState, model: str) -> None:
    # 404, as OpenAI answers for a model that does not exist.
    if model != state.model_id:
        raise ApiError(
            404,
            f"model: {model!r} is not served here; this server serves {state.model_id!r}",
            param="model",
            code="model_not_found",
        )


def completion_params(body: CompletionRequest, limits: Limits) -> SamplingParams:
    if body.max_tokens is not None and body.max_tokens > limits.max_new_tokens:
        raise invalid(
            f"max_tokens: {body.max_tokens} is more than the limit of {limits.max_new_tokens} "
            "(max_new_tokens)",
            "max_tokens",
            "limit_exceeded",
        )
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    for i, stop in enumerate(stops):
        check_text(stop, "stop" if isinstance(body.stop, str) else f"stop.{i}")
    # OpenAI's temperature 0 is greedy decoding; the engine also decodes greedily below
    # GREEDY_BELOW_TEMPERATURE.
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingParams(
        max_new_tokens=body.max_tokens or limits.default_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        seed=body.seed,
        stop=tuple(stops),
    )


def finish_reason(engine_reason: str | None) -> str | None:
    if engine_reason is None:
        return None
    return "length" if engine_reason == FINISH_LENGTH else "stop"


async def completion_events(
    stream: GenerationStream, chunk: dict[str, Any], prompt_tokens: int, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    try:
        async for events in stream.chunks():
            out = []
            for event in events:
                last = event.finish_reason is not None
                if not event.text and not last:
                    continue  # a partial character or held-back text: nothing to show yet
                choice = {
                    "index": 0,
                    "text": event.text,
                    "finish_reason": finish_reason(event.finish_reason),
                    "logprobs": None,
                }
                out.append(sse.data_event({**chunk, "choices": [choice]}))
            if out:
                yield b"".join(out)
        if include_usage:
            n = len(stream.sequence.generated)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n,
                "total_tokens": prompt_tokens + n,
            }
            yield sse.data_event({**chunk, "choices": [], "usage": usage})
        yield sse.DONE
    except RequestFailed as err:
        yield sse.error_event(
            ApiError(500, f"the model failed on this request: {err}", code="engine_error")
        )
    finally:
        stream.cancel()


@router.post(
    "/v1/completions",
    summary="OpenAI-compatible completions; stream: true answers with Server-Sent Events",
    response_model=CompletionResponse,
    response_model_exclude_none=True,
    responses=COMPLETION_RESPONSES,
)
async def completions(
    body: CompletionRequest,
    request: Request,
    serving: ServingDep,
) -> Response:
    engine, limits, state = serving.engine, serving.limits, serving.state
    check_model(state, body.model)
    params = completion_params(body, limits)
    prompts = as_list(body.prompt, limits, "prompt")
    if body.stream and len(prompts) > 1:
        raise invalid("prompt: streaming takes one prompt, not a list", "prompt")
    ids = await tokenize(engine, prompts, param_names(body.prompt, "prompt"), limits, truncate=None)
    chunk = {
        "id": f"cmpl-{new_id()}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_id,
    }
    streams: list[GenerationStream] = []
    try:
        for row in ids:
            streams.append(open_stream(engine, row, params))
    except ApiError:
        for opened in streams:  # a refusal part way through releases what was admitted
            opened.cancel()
        raise
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        (stream,) = streams
        return sse.EventStreamResponse(
            completion_events(stream, chunk, len(ids[0]), include_usage),
            keepalive_s=state.settings.keepalive_s,
            on_close=stream.cancel,
        )
    choices = []
    completion_tokens = 0
    try:
        for i, stream in enumerate(streams):
            await collect(stream, request)
            seq = stream.sequence
            completion_tokens += len(seq.generated)
            choices.append(
                {
                    "index": i,
                    "text": seq.text,
                    "finish_reason": finish_reason(seq.finish_reason),
                    "logprobs": None,
                }
            )
    finally:
        for stream in streams:
            stream.cancel()
    prompt_tokens = sum(len(row) for row in ids)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return JSONResponse({**chunk, "choices": choices, "usage": usage})


@router.post(
    "/v1/embeddings",
    summary="OpenAI-compatible embeddings (mean-pooled, unit length)",
    response_model=EmbeddingResponse,
    responses=error_responses(400, 401, 404, 413, 422, 429, 503),
)
async def embeddings(body: EmbeddingRequest, serving: ServingDep) -> JSONResponse:
    check_model(serving.state, body.model)
    output, n_tokens = await run_encoder(
        serving.engine, body.input, serving.limits, truncate=False, param="input"
    )
    vectors = np.nan_to_num(pooled(output, "mean", normalize=True)).astype("<f4")
    data = []
    for i, vector in enumerate(vectors):
        embedding: list[float] | str
        if body.encoding_format == "base64":
            embedding = base64.b64encode(vector.tobytes()).decode("ascii")
        else:
            embedding = vector.astype(np.float64).tolist()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": serving.model_id,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }
    )


def _card(state: ServiceState) -> dict[str, Any]:
    return {
        "id": state.model_id,
        "object": "model",
        "created": state.created,
        "owned_by": "seq2serve",
    }


@router.get(
    "/v1/models",
    summary="The served model (OpenAI-compatible)",
    response_model=ModelList,
    responses=error_responses(401),
)
async def models(state: StateDep) -> dict[str, Any]:
    return {"object": "list", "data": [_card(state)]}


@router.get(
    "/v1/models/{model_id}",
    summary="One model (OpenAI-compatible)",
    response_model=ModelCard,
    responses=error_responses(401, 404),
)
async def model(model_id: str, state: StateDep) -> dict[str, Any]:
    if model_id != state.model_id:
        raise ApiError(
            404, f"model {model_id!r} is not served here", param="model_id", code="model_not_found"
        )
    return _card(state)
