"""The model configuration: one frozen dataclass, read by training, export and serving alike.

Torch-free on purpose: the server validates a bundle's ``config.json`` with it without PyTorch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Activation = Literal["relu", "gelu", "gelu_tanh", "silu"]
PositionKind = Literal["sinusoidal", "learned"]


class ConfigError(ValueError):
    """A config.json that cannot describe a model; the message names the file and the field."""


@dataclass(frozen=True)
class ModelConfig:
    # Sizes. head_dim is derived: d_model must split evenly across the heads.
    vocab_size: int
    d_model: int = 192
    n_heads: int = 4
    d_ff: int = 768
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    # Longest sequences the position table covers; the server refuses longer inputs (422).
    max_source_positions: int = 128
    max_target_positions: int = 128

    # Architecture switches, so Marian- and BART-style checkpoints map onto the same code.
    # Post-norm (the original paper, Marian, BART) normalizes after each residual add;
    # pre-norm (mBART, most modern models) normalizes the sublayer input and ends in a final norm.
    norm_first: bool = True
    # Sinusoidal needs no weights and extrapolates; learned is what BART ships.
    positions: PositionKind = "sinusoidal"
    # BART's learned position table starts at index 2 (a fairseq legacy); Marian's at 0.
    position_offset: int = 0
    # Multiply token embeddings by sqrt(d_model) (Marian yes, BART no).
    scale_embedding: bool = True
    # BART normalizes the summed embeddings before the first layer.
    embedding_norm: bool = False
    activation: Activation = "gelu"
    layer_norm_eps: float = 1e-5
    # Marian carries a (usually zero) bias on the output logits.
    final_logits_bias: bool = False
    dropout: float = 0.1

    # Special tokens. The decoder is primed with decoder_start_token_id (Marian uses the pad id).
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 1

    # Classification head over the mean-pooled encoder output; empty means no head.
    id2label: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "vocab_size",
            "d_model",
            "n_heads",
            "d_ff",
            "n_encoder_layers",
            "n_decoder_layers",
            "max_source_positions",
            "max_target_positions",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.d_model % self.n_heads:
            problems.append(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.activation not in ("relu", "gelu", "gelu_tanh", "silu"):
            problems.append(
                f"activation must be relu, gelu, gelu_tanh or silu, got {self.activation!r}"
            )
        if self.positions not in ("sinusoidal", "learned"):
            problems.append(f"positions must be sinusoidal or learned, got {self.positions!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < max(self.vocab_size, 1):
                problems.append(f"{name} must be a token id below vocab_size, got {value!r}")
        if sorted(self.id2label) != list(range(len(self.id2label))):
            problems.append("id2label keys must be 0..num_labels-1")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.id2label[i] for i in range(self.num_labels))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown field(s) {', '.join(unknown)}")
        data = dict(data)
        if "id2label" in data:
            try:
                data["id2label"] = {int(k): str(v) for k, v in data["id2label"].items()}
            except (AttributeError, ValueError) as err:
                raise ConfigError("id2label must map integer ids to label strings") from err
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(str(err)) from err

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise ConfigError(f"{path}: missing") from err
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: must hold a JSON object")
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err
