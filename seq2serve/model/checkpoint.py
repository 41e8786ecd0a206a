"""Checkpoint weights as safetensors (never pickle): save and load a model."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from seq2serve import contract
from seq2serve.config import ModelConfig
from seq2serve.model.transformer import Transformer


def _is_alias(key: str) -> bool:
    # The token embedding is one tensor shared by encoder, decoder and the tied LM head; the
    # state dict lists it under three names, the file stores it once as tokens.weight.
    return key.endswith("embed.tokens.weight")


def save_weights(model: Transformer, path: Path) -> None:
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if not _is_alias(k)}
    save_file(weights, str(path), metadata={"format": "pt"})


def load_model(ckpt: Path) -> tuple[Transformer, Tokenizer]:
    """A checkpoint or bundle directory (config.json, tokenizer.json, model.safetensors) ->
    (model in eval mode, tokenizer)."""
    ckpt = Path(ckpt)
    cfg = ModelConfig.load(ckpt / contract.CONFIG_FILE)
    model = Transformer(cfg)
    weights_path = ckpt / contract.WEIGHTS_FILE
    if not weights_path.exists():
        raise FileNotFoundError(f"{weights_path}: missing")
    weights = load_file(str(weights_path))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not _is_alias(k)]
    if missing or unexpected:
        raise ValueError(
            f"{weights_path}: missing {', '.join(missing) or 'nothing'}, "
            f"unexpected {', '.join(unexpected) or 'nothing'}"
        )
    tokenizer_path = ckpt / contract.TOKENIZER_FILE
    if not tokenizer_path.exists():
        raise FileNotFoundError(f"{tokenizer_path}: missing")
    return model.eval(), Tokenizer.from_file(str(tokenizer_path))
