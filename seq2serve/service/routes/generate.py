"""``POST /v1/generate`` in Text Generation Inference's shapes, JSON or Server-Sent Events.

TGI's own paths are served too (not in the OpenAPI document): ``POST /generate``,
``POST /generate_stream`` and ``POST /``, which is where
``huggingface_hub.InferenceClient(base_url).text_generation`` posts.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Awaitable, Callable
from json.encoder import encode_basestring
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from seq2serve.engine.generation import SamplingParams, TokenEvent
from seq2serve.engine.scheduler import GenerationStream, RequestFailed
from seq2serve.service import sse
from seq2serve.service.deps import Serving, ServingDep
from seq2serve.service.errors import ApiError, error_responses, invalid
from seq2serve.service.inputs import check_text, tokenize
from seq2serve.service.schemas import (
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    sse_event_schema,
)
from seq2serve.service.settings import Limits
from seq2serve.service.work import collect, open_stream

router = APIRouter(tags=["generate"])

_STREAM_DOC = (
    "Server-Sent Events (with `stream: true`): one `data:` event per token, "
    "`{index, token: {id, text, logprob, special}, generated_text: null, details: null}`; the "
    "last event carries `generated_text` and `details`. After the stream has opened, an error "
    "is sent as `event: error` with the error JSON, and the stream closes. A `: keep-alive` "
    "comment is sent when the stream is idle."
)

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The generated text (JSON), or a stream of token events (SSE).",
        "content": {
            "application/json": {},
            sse.MEDIA_TYPE: {
                "schema": sse_event_schema(
                    {
                        "oneOf": [
                            {"$ref": "#/components/schemas/StreamEvent"},
                            {"$ref": "#/components/schemas/ErrorBody"},
                        ]
                    },
                    _STREAM_DOC,
                )
            },
        },
    },
    **error_responses(400, 401, 413, 422, 429, 503),
}


def sampling_params(p: GenerateParameters, limits: Limits, *, stream: bool) -> SamplingParams:
    """Checks that depend on several fields or on the server's limits, then the engine's
    parameters. (Single-field ranges are in the schema.)"""
    if p.max_new_tokens is not None and p.max_new_tokens > limits.max_new_tokens:
        raise invalid(
            f"parameters.max_new_tokens: {p.max_new_tokens} is more than the limit of "
            f"{limits.max_new_tokens} (max_new_tokens)",
            "parameters.max_new_tokens",
            "limit_exceeded",
        )
    if p.num_beams > 1 and stream:
        raise invalid(
            "parameters.num_beams: beam search (num_beams > 1) cannot stream; "
            "send stream: false or num_beams: 1",
            "parameters.num_beams",
        )
    if p.num_beams > 1 and p.do_sample:
        raise invalid(
            "parameters.num_beams: beam search (num_beams > 1) does not sample; "
            "send do_sample: false or num_beams: 1",
            "parameters.num_beams",
        )
    if p.do_sample and p.temperature is not None and p.temperature <= 0:
        raise invalid(
            "parameters.temperature: must be greater than 0 when do_sample is true",
            "parameters.temperature",
        )
    for i, stop in enumerate(p.stop):
        check_text(stop, f"parameters.stop.{i}")
    return SamplingParams(
        max_new_tokens=p.max_new_tokens or limits.default_new_tokens,
        do_sample=p.do_sample,
        temperature=p.temperature if p.temperature is not None else 1.0,
        top_k=p.top_k or 0,
        top_p=p.top_p if p.top_p is not None else 1.0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        seed=p.seed,
        stop=tuple(p.stop),
        num_beams=p.num_beams,
        length_penalty=p.length_penalty,
    )


def _finite(value: float) -> float | None:
    # JSON has no NaN or infinity; a model that produced one still gets a valid answer.
    return value if math.isfinite(value) else None


def token_json(event: TokenEvent) -> dict[str, Any]:
    return {
        "id": event.token_id,
        "text": event.text,
        "logprob": _finite(event.logprob),
        "special": event.special,
    }


def token_event(index: int, event: TokenEvent) -> bytes:
    """The SSE event of a token that is not the stream's last: the bytes ``sse.data_event``
    writes for ``{"index", "token": token_json(event), "generated_text": None, "details":
    None}``, formatted directly (one per token per stream; a fifth of the general encoder's
    time). ``tests/test_service_stream.py`` holds the two equal."""
    logprob = _finite(event.logprob)
    return sse.json_event(
        f'{{"index": {index}, "token": {{"id": {event.token_id}, '
        f'"text": {encode_basestring(event.text)}, '
        f'"logprob": {"null" if logprob is None else float.__repr__(logprob)}, '
        f'"special": {"true" if event.special else "false"}}}, '
        '"generated_text": null, "details": null}'
    )


def _details(stream: GenerationStream, input_length: int) -> dict[str, Any]:
    seq = stream.sequence
    return {
        "finish_reason": seq.finish_reason,
        "generated_tokens": len(seq.generated),
        "input_length": input_length,
        "seed": seq.seed,
    }


async def tgi_events(stream: GenerationStream, input_length: int) -> AsyncGenerator[bytes, None]:
    index = 0
    try:
        async for events in stream.chunks():
            chunk = []
            for event in events:
                index += 1
                if event.finish_reason is None:
                    chunk.append(token_event(index, event))
                    continue
                chunk.append(
                    sse.data_event(
                        {
                            "index": index,
                            "token": token_json(event),
                            "generated_text": stream.sequence.text,
                            "details": _details(stream, input_length),
                        }
                    )
                )
            yield b"".join(chunk)
    except RequestFailed as err:
        yield sse.error_event(
            ApiError(500, f"the model failed on this request: {err}", code="engine_error")
        )
    finally:
        stream.cancel()


async def _generate(
    body: GenerateRequest, request: Request, serving: Serving, *, stream: bool
) -> Response:
    engine, limits = serving.engine, serving.limits
    params = sampling_params(body.parameters, limits, stream=stream)
    check_text(body.inputs, "inputs")
    (ids,) = await tokenize(engine, [body.inputs], ["inputs"], limits, truncate=None)
    generation = open_stream(engine, ids, params)
    if stream:
        return sse.EventStreamResponse(
            tgi_events(generation, len(ids)),
            keepalive_s=serving.settings.keepalive_s,
            on_close=generation.cancel,
        )
    events = await collect(generation, request)
    out: dict[str, Any] = {"generated_text": generation.sequence.text}
    if body.parameters.details:
        out["details"] = {
            **_details(generation, len(ids)),
            "tokens": [token_json(e) for e in events],
        }
    return JSONResponse(out)


@router.post(
    "/v1/generate",
    summary="Generate text (TGI-compatible); stream: true answers with Server-Sent Events",
    response_model=GenerateResponse,
    responses=RESPONSES,
)
async def generate(body: GenerateRequest, request: Request, serving: ServingDep) -> Response:
    return await _generate(body, request, serving, stream=body.stream)


def _tgi_route(stream: bool | None) -> Callable[..., Awaitable[Response]]:
    """TGI's own paths: `/generate` and `/generate_stream` fix the answer's kind; `/` (where
    InferenceClient(base_url).text_generation posts) reads it from the body."""

    async def route(body: GenerateRequest, request: Request, serving: ServingDep) -> Response:
        streaming = body.stream if stream is None else stream
        return await _generate(body, request, serving, stream=streaming)

    return route


for _path, _stream in (("/", None), ("/generate", False), ("/generate_stream", True)):
    router.add_api_route(_path, _tgi_route(_stream), methods=["POST"], include_in_schema=False)
