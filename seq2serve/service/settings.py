"""Server settings: one pydantic-settings class, read from ``SEQ2SERVE_*`` environment variables.

Nothing else in the service reads ``os.environ``; the CLI builds a ``Settings`` and overrides
fields with its flags. Limits that depend on the model (``max_input_tokens``,
``max_new_tokens``) are capped by it when the model is loaded (``Limits.resolve``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

import seq2serve
from seq2serve.config import ModelConfig

DEFAULT_MODEL_DIR = Path(seq2serve.__file__).resolve().parent.parent / "models" / "default"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEQ2SERVE_", extra="forbid", frozen=True)

    model_dir: Path = DEFAULT_MODEL_DIR
    runtime: Literal["onnx", "torch"] = "onnx"
    device: Literal["cpu", "cuda"] = "cpu"
    # The bundle's int8 graphs instead of fp32 (ONNX runtime only).
    quantized: bool = False
    # onnxruntime intra-op threads; None lets the runtime use every core.
    num_threads: int | None = Field(default=None, gt=0)
    # Nice value of the compute threads (engine and onnxruntime's pool), so the event loop
    # that reads requests and writes tokens never waits for them; 0 leaves them as they are.
    # None: 10 when a token costs 1 ms or more at start, else 0 (Engine.start).
    engine_nice: int | None = Field(default=None, ge=0, le=19)

    max_batch_size: int = Field(default=32, gt=0)
    max_wait_ms: float = Field(default=5.0, ge=0)
    max_queue: int = Field(default=256, gt=0)
    # None: the model's max_source_positions. Always capped by it.
    max_input_tokens: int | None = Field(default=None, gt=0)
    # Capped by the model's max_target_positions.
    max_new_tokens: int = Field(default=256, gt=0)
    max_body_bytes: int = Field(default=1 << 20, gt=0)
    max_inputs_per_request: int = Field(default=64, gt=0)

    # When set, every /v1/* route needs "Authorization: Bearer <key>".
    api_key: SecretStr | None = None
    log_level: LogLevel = "INFO"
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    # How long SIGTERM waits for in-flight requests before closing their connections.
    drain_timeout_s: float = Field(default=30.0, ge=0)
    # SSE comment sent when a stream has been idle this long (keeps proxies from timing out).
    keepalive_s: float = Field(default=15.0, gt=0)

    @field_validator("api_key", mode="after")
    @classmethod
    def _empty_key_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty SEQ2SERVE_API_KEY (an optional Kubernetes secret left blank) means no
        # auth, not "the empty string is the key".
        if value is not None and not value.get_secret_value():
            return None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level]


# Longest and most stop strings one request may carry: the stop matcher's cost is linear in
# their total length, so both are bounded.
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
# A smaller repetition penalty divides logits into overflow, as a tiny temperature does.
MIN_REPETITION_PENALTY = 1e-3
# Beam search runs num_beams rows for one request; more would crowd out other requests.
MAX_BEAMS = 8


@dataclass(frozen=True)
class Limits:
    """The limits requests are checked against, once the model is known."""

    max_input_tokens: int
    max_new_tokens: int
    default_new_tokens: int
    max_inputs_per_request: int
    max_body_bytes: int
    max_batch_size: int
    max_queue: int
    max_stop_strings: int = MAX_STOP_STRINGS
    max_stop_length: int = MAX_STOP_LENGTH
    max_beams: int = MAX_BEAMS

    @classmethod
    def resolve(cls, settings: Settings, config: ModelConfig) -> Limits:
        max_input = min(
            settings.max_input_tokens or config.max_source_positions, config.max_source_positions
        )
        max_new = min(settings.max_new_tokens, config.max_target_positions)
        return cls(
            max_input_tokens=max_input,
            max_new_tokens=max_new,
            # What a request gets when it does not say: enough for the bundled model's
            # longest outputs without letting every request run to the limit.
            default_new_tokens=min(64, max_new),
            max_inputs_per_request=settings.max_inputs_per_request,
            max_body_bytes=settings.max_body_bytes,
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
        )
