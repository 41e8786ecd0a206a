"""Request and response bodies. Requests are strict (a bool is not an int, a string is not a
number, unknown fields are refused) so a client's mistake is a 422 that names the field,
never a silent coercion."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from seq2serve.service.settings import (
    MAX_BEAMS,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    MIN_REPETITION_PENALTY,
)

FinishReason = Literal["length", "eos_token", "stop_sequence"]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]
Text = Annotated[str, Field(min_length=1)]
Texts = Annotated[list[Text], Field(min_length=1)]
# Seeds are unsigned 64-bit, as in TGI.
Seed = Annotated[int, Field(ge=0, le=2**64 - 1)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# -- encode / classify --------------------------------------------------------------------


class EncodeRequest(StrictModel):
    inputs: Text | Texts = Field(description="A text, or a list of texts.")
    pooling: Literal["mean", "first", "none"] = Field(
        default="mean",
        description="mean: average over tokens; first: the first token's state; "
        "none: every token's state (hidden_states instead of embeddings).",
    )
    normalize: bool = Field(default=True, description="Scale every returned vector to unit length.")
    truncate: bool = Field(
        default=False,
        description="Cut inputs longer than the token limit instead of refusing them.",
    )


class EncodeUsage(BaseModel):
    input_tokens: int


class EncodeResponse(BaseModel):
    model: str
    embeddings: list[list[float]] | None = Field(
        default=None, description="Unless pooling is none."
    )
    hidden_states: list[list[list[float]]] | None = Field(
        default=None, description="When pooling is none: per input, per token."
    )
    usage: EncodeUsage


class ClassifyRequest(StrictModel):
    inputs: Text | Texts = Field(description="A text, or a list of texts.")
    top_k: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Labels to return per input, best first (null: all)."
    )
    truncate: bool = Field(
        default=False,
        description="Cut inputs longer than the token limit instead of refusing them.",
    )


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    model: str
    results: list[list[LabelScore]]
    usage: EncodeUsage


# -- generate (Text Generation Inference's shapes) ----------------------------------------


class GenerateParameters(StrictModel):
    max_new_tokens: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="At most this many tokens (default 64, capped by the server limit).",
    )
    do_sample: bool = Field(default=False, description="Sample; false is greedy decoding.")
    temperature: Annotated[float, Field(ge=0)] | None = Field(
        default=None,
        description="Sampling temperature, > 0 when do_sample (below 1e-5: greedy).",
    )
    top_k: Annotated[int, Field(ge=0)] | None = Field(default=None, description="0 or null: off.")
    top_p: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None, description="1 or null: off."
    )
    repetition_penalty: Annotated[float, Field(ge=MIN_REPETITION_PENALTY)] | None = Field(
        default=None,
        description="CTRL-style penalty on tokens generated so far; 1 or null: off.",
    )
    num_beams: Annotated[int, Field(ge=1, le=MAX_BEAMS)] = Field(
        default=1, description="Beam search width; not with stream or do_sample."
    )
    # Bounded: length ** length_penalty overflows (or underflows to a division by zero) for
    # large magnitudes; useful values are around 0.5 to 2.
    length_penalty: Annotated[float, Field(ge=-10, le=10)] = Field(
        default=1.0, description="Beam search: scores are divided by length ** length_penalty."
    )
    seed: Seed | None = Field(default=None, description="Sampling seed.")
    stop: Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] = Field(
        default_factory=list,
        description="Stop at the first of these strings; it is not part of the output.",
    )
    details: bool = Field(default=False, description="Return details (non-streaming).")


class GenerateRequest(StrictModel):
    inputs: Text
    parameters: GenerateParameters = Field(default_factory=lambda: GenerateParameters())
    stream: bool = Field(default=False, description="Answer with Server-Sent Events.")


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class GenerateDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    input_length: int
    seed: int | None
    tokens: list[Token]


class GenerateResponse(BaseModel):
    generated_text: str
    details: GenerateDetails | None = Field(default=None, description="When parameters.details.")


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    input_length: int
    seed: int | None


class StreamEvent(BaseModel):
    """One ``data:`` event of a generation stream; the last carries text and details.

    ``index`` counts tokens from 1."""

    index: int
    token: Token
    generated_text: str | None
    details: StreamDetails | None


# -- OpenAI-compatible subset -------------------------------------------------------------


class StreamOptions(StrictModel):
    include_usage: bool = False


class CompletionRequest(StrictModel):
    model: str = Field(description="The served model's id (GET /v1/models).")
    prompt: Text | Texts
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="At most this many tokens (default 64, capped by the server limit).",
    )
    temperature: Annotated[float, Field(ge=0, le=2)] | None = Field(
        default=None,
        description="0 (or below 1e-5) is greedy; default 1 (sampling), as in OpenAI's API.",
    )
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(default=1, description="Only 1 is supported.")
    user: str | None = Field(default=None, description="Accepted and ignored.")


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class EmbeddingRequest(StrictModel):
    model: str = Field(description="The served model's id (GET /v1/models).")
    input: Text | Texts
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: little-endian float32 bytes, base64-encoded."
    )
    user: str | None = Field(default=None, description="Accepted and ignored.")


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


# -- operations ---------------------------------------------------------------------------


class Status(BaseModel):
    status: str


def sse_event_schema(data_schema: dict[str, object] | None, description: str) -> dict[str, object]:
    """One Server-Sent Event as OpenAPI 3.1 describes a ``text/event-stream`` item: an object
    with ``event`` (``message`` unless named) and ``data`` (a string, here JSON)."""
    data: dict[str, object] = {"type": "string", "description": description}
    if data_schema is not None:
        data |= {"contentMediaType": "application/json", "contentSchema": data_schema}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"type": "string", "enum": ["message", "error"]},
            "data": data,
            "id": {"type": "string"},
            "retry": {"type": "integer", "minimum": 0},
        },
    }
