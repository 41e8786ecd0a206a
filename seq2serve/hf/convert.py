"""Hugging Face MarianMT / BART checkpoint -> seq2serve checkpoint (config, weights, tokenizer).

Both architectures are post-norm encoder-decoders with one shared token embedding and a tied
LM head, which is what ``seq2serve.model.transformer`` expresses through its config switches:

| Hugging Face                                   | seq2serve                                  |
|------------------------------------------------|--------------------------------------------|
| Marian sinusoidal positions (sin half, cos half) | ``positions="sinusoidal"``, offset 0     |
| BART learned positions, table starts at 2      | ``positions="learned"``, ``position_offset=2`` |
| ``scale_embedding``                            | ``scale_embedding`` (sqrt(d_model))        |
| BART ``layernorm_embedding``                   | ``embedding_norm=True``                    |
| ``activation_function`` gelu / gelu_new / swish | ``gelu`` / ``gelu_tanh`` / ``silu``       |
| ``final_logits_bias`` (1, V)                   | ``final_logits_bias`` (V,)                 |
| ``shared`` = embed_tokens = ``lm_head``        | ``tokens.weight`` (stored once)            |

Anything the model cannot compute the same way is refused with a message naming the option,
never approximated: an import either reproduces ``transformers``' logits or does not happen.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from seq2serve import contract
from seq2serve.atomic import atomic_directory
from seq2serve.config import Activation, ModelConfig
from seq2serve.hf.tokenizer import TokenizerImportError, convert_tokenizer, save_tokenizer

log = logging.getLogger(__name__)

SOURCE_FILE = contract.HF_SOURCE_FILE

SUPPORTED_ARCHITECTURES = {
    "marian": {"MarianMTModel", "MarianModel"},
    "bart": {"BartForConditionalGeneration", "BartModel"},
}
ACTIVATIONS: dict[str, Activation] = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "swish": "silu",
    "silu": "silu",
}
# Options of older BART-family configs that select a different computation than the plain
# post-norm model (mBART's pre-norm and final norm, static positions, a logits bias layer):
# (option, value under which the checkpoint is still plain BART/Marian).
VARIANT_OPTIONS = (
    ("normalize_before", False),
    ("add_final_layer_norm", False),
    ("static_position_embeddings", None),
    ("add_bias_logits", False),
    ("do_blenderbot_90_layernorm", False),
)


class UnsupportedModel(ValueError):
    """A checkpoint seq2serve's model cannot reproduce; the message names the option."""


@dataclass(frozen=True)
class ImportResult:
    config: ModelConfig
    model_type: str
    source: Path


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (is {hf_dir} a Hugging Face model directory?)")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise UnsupportedModel(f"{path}: must hold a JSON object")
    return data


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map a Marian or BART ``config.json`` onto ``ModelConfig``, refusing what does not map."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported (only marian and bart: post-norm "
            "encoder-decoders with a shared embedding)"
        )
    unknown = set(hf.get("architectures") or []) - SUPPORTED_ARCHITECTURES[model_type]
    if unknown:
        raise UnsupportedModel(
            f"architectures {sorted(unknown)} is not supported for {model_type} (only "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES[model_type]))}: a sequence-to-sequence "
            "LM head)"
        )
    for option, plain in VARIANT_OPTIONS:
        if option in hf and hf[option] not in (plain, None, False):
            raise UnsupportedModel(
                f"{option}={hf[option]!r} is not supported (seq2serve imports the post-norm "
                f"{model_type} architecture that transformers' {model_type} class runs)"
            )
    if model_type == "bart" and hf.get("extra_pos_embeddings", 2) != 2:
        raise UnsupportedModel(
            f"extra_pos_embeddings={hf['extra_pos_embeddings']!r} is not supported (BART's "
            "position table starts at 2)"
        )
    if model_type == "bart" and hf.get("normalize_embedding", True) is not True:
        raise UnsupportedModel("normalize_embedding=False is not supported (BART normalizes)")
    if hf.get("share_encoder_decoder_embeddings", True) is not True:
        raise UnsupportedModel(
            "share_encoder_decoder_embeddings=False is not supported: seq2serve's model has "
            "one token embedding shared by the encoder, the decoder and the LM head"
        )
    vocab_size = hf.get("vocab_size")
    decoder_vocab = hf.get("decoder_vocab_size")
    if decoder_vocab not in (None, vocab_size):
        raise UnsupportedModel(
            f"decoder_vocab_size={decoder_vocab} differs from vocab_size={vocab_size}: "
            "seq2serve's model has one vocabulary for source and target"
        )
    for enc, dec in (
        ("encoder_attention_heads", "decoder_attention_heads"),
        ("encoder_ffn_dim", "decoder_ffn_dim"),
    ):
        if hf.get(enc) != hf.get(dec):
            raise UnsupportedModel(
                f"{enc}={hf.get(enc)} differs from {dec}={hf.get(dec)}: seq2serve's encoder "
                "and decoder layers share n_heads and d_ff"
            )
    activation = hf.get("activation_function", "gelu")
    if activation not in ACTIVATIONS:
        raise UnsupportedModel(
            f"activation_function={activation!r} is not supported "
            f"(supported: {', '.join(ACTIVATIONS)})"
        )
    scale = hf.get("scale_embedding", False)
    if not isinstance(scale, bool):
        raise UnsupportedModel(f"scale_embedding={scale!r} is not supported (true or false)")

    def token_id(name: str) -> int:
        value = hf.get(name)
        if isinstance(value, list):
            if len(value) != 1:
                raise UnsupportedModel(f"{name}={value!r} is not supported (one id)")
            value = value[0]
        if not isinstance(value, int):
            raise UnsupportedModel(f"{name}={value!r}: an integer token id is needed")
        return value

    pad, eos = token_id("pad_token_id"), token_id("eos_token_id")
    start = token_id("decoder_start_token_id")
    # Marian has no BOS (it starts decoding from the pad id); seq2serve's field only matters
    # for training, where the decoder start token plays that part.
    bos = hf.get("bos_token_id")
    max_positions = hf.get("max_position_embeddings")
    try:
        return ModelConfig(
            vocab_size=vocab_size,
            d_model=hf.get("d_model"),
            n_heads=hf.get("encoder_attention_heads"),
            d_ff=hf.get("encoder_ffn_dim"),
            n_encoder_layers=hf.get("encoder_layers"),
            n_decoder_layers=hf.get("decoder_layers"),
            max_source_positions=max_positions,
            max_target_positions=max_positions,
            norm_first=False,
            positions="sinusoidal" if model_type == "marian" else "learned",
            position_offset=0 if model_type == "marian" else 2,
            scale_embedding=scale,
            embedding_norm=model_type == "bart",
            activation=ACTIVATIONS[activation],
            layer_norm_eps=1e-5,  # transformers' nn.LayerNorm default for both
            final_logits_bias=True,
            dropout=float(hf.get("dropout", 0.1)),
            pad_token_id=pad,
            bos_token_id=bos if isinstance(bos, int) else start,
            eos_token_id=eos,
            decoder_start_token_id=start,
        )
    except (TypeError, ValueError) as err:
        raise UnsupportedModel(f"config.json does not describe a usable model: {err}") from err


def read_hf_weights(hf_dir: Path) -> dict[str, Tensor]:
    """``model.safetensors``, else ``pytorch_model.bin`` loaded with ``weights_only=True``
    (plain tensors only: a pickle that wants to run code is refused by torch)."""
    safetensors_file = hf_dir / "model.safetensors"
    if safetensors_file.exists():
        from safetensors.torch import load_file

        return load_file(str(safetensors_file))
    bin_file = hf_dir / "pytorch_model.bin"
    if bin_file.exists():
        state = torch.load(str(bin_file), map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise UnsupportedModel(f"{bin_file}: not a state dict")
        return state
    if any(hf_dir.glob("*.index.json")):
        raise UnsupportedModel(f"{hf_dir}: sharded checkpoints are not supported")
    raise FileNotFoundError(f"{hf_dir}: has neither model.safetensors nor pytorch_model.bin")


LAYER_PARTS = {
    # HF layer submodule -> seq2serve layer submodule
    "self_attn.": "self_attn.",
    "encoder_attn.": "cross_attn.",
    "fc1.": "ffn.fc1.",
    "fc2.": "ffn.fc2.",
}
ENCODER_NORMS = {
    "self_attn_layer_norm.": "attn_block.norm.",
    "final_layer_norm.": "ffn_block.norm.",
}
DECODER_NORMS = {
    "self_attn_layer_norm.": "self_block.norm.",
    "encoder_attn_layer_norm.": "cross_block.norm.",
    "final_layer_norm.": "ffn_block.norm.",
}


def _rename(stack: str, rest: str) -> str | None:
    """``layers.3.fc1.weight`` (under ``encoder``/``decoder``) -> seq2serve's name."""
    if rest.startswith("layernorm_embedding."):
        return f"{stack}.embed.norm.{rest.split('.', 1)[1]}"
    if rest == "embed_positions.weight":
        return f"{stack}.embed.positions.weight"
    if not rest.startswith("layers."):
        return None
    _, index, part = rest.split(".", 2)
    norms = ENCODER_NORMS if stack == "encoder" else DECODER_NORMS
    for table in (norms, LAYER_PARTS):
        for hf_prefix, ours in table.items():
            if part.startswith(hf_prefix):
                return f"{stack}.layers.{index}.{ours}{part[len(hf_prefix) :]}"
    return None


def weights_from_hf(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename and check a ``transformers`` state dict into seq2serve's ``model.safetensors``."""
    state = {k.removeprefix("model."): v for k, v in state.items()}
    embeddings = {
        k: state.pop(k)
        for k in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
        if k in state
    }
    if not embeddings:
        raise UnsupportedModel("no token embedding (shared.weight) in the checkpoint")
    tokens = next(iter(embeddings.values()))
    head = state.pop("lm_head.weight", None)
    for name, tensor in [*embeddings.items(), ("lm_head.weight", head)]:
        if tensor is not None and not torch.equal(tensor, tokens):
            raise UnsupportedModel(
                f"{name} differs from the shared token embedding (untied weights, "
                "tie_word_embeddings=False): seq2serve's LM head is tied to its one embedding"
            )
    out = {"tokens.weight": tokens}
    bias = state.pop("final_logits_bias", None)
    out["final_logits_bias"] = (
        bias.reshape(-1) if bias is not None else torch.zeros(cfg.vocab_size, dtype=tokens.dtype)
    )
    unexpected = []
    for key, tensor in state.items():
        stack, _, rest = key.partition(".")
        name = _rename(stack, rest) if stack in ("encoder", "decoder") else None
        if name is None:
            unexpected.append(key)
        elif cfg.positions == "sinusoidal" and name.endswith("embed.positions.weight"):
            continue  # Marian's table is a fixed function of the shape; seq2serve computes it
        else:
            out[name] = tensor
    if unexpected:
        raise UnsupportedModel(
            f"weights seq2serve's model has no place for: {', '.join(sorted(unexpected)[:8])}"
            + (" ..." if len(unexpected) > 8 else "")
        )
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}


def import_hf(hf_dir: Path, out: Path) -> ImportResult:
    """Convert the Hugging Face directory ``hf_dir`` into the checkpoint directory ``out``."""
    from safetensors.torch import save_file

    from seq2serve.model.transformer import Transformer

    hf_dir, out = Path(hf_dir), Path(out)
    hf = read_hf_config(hf_dir)
    cfg = config_from_hf(hf)
    log.info("reading %s weights from %s", hf["model_type"], hf_dir)
    weights = weights_from_hf(read_hf_weights(hf_dir), cfg)
    # Check every tensor against the model before writing anything: a name or shape mismatch
    # is a refusal, not a checkpoint that fails later at export.
    expected = {
        k: tuple(v.shape)
        for k, v in Transformer(cfg).state_dict().items()
        if not k.endswith("embed.tokens.weight")
    }
    problems = sorted(set(expected) ^ set(weights))
    problems += [
        f"{k} has shape {tuple(weights[k].shape)}, expected {shape}"
        for k, shape in expected.items()
        if k in weights and tuple(weights[k].shape) != shape
    ]
    if problems:
        raise UnsupportedModel(f"weights do not fit the mapped model: {'; '.join(problems[:8])}")
    log.info("converting the %s tokenizer", hf["model_type"])
    try:
        tokenizer, _ = convert_tokenizer(hf_dir, hf["model_type"], cfg.vocab_size)
    except TokenizerImportError as err:
        raise UnsupportedModel(f"tokenizer: {err}") from err
    with atomic_directory(out) as tmp:
        cfg.save(tmp / contract.CONFIG_FILE)
        save_tokenizer(tokenizer, tmp / contract.TOKENIZER_FILE)
        save_file(weights, str(tmp / contract.WEIGHTS_FILE), metadata={"format": "pt"})
        source = {"hf_source": str(hf_dir.resolve()), "model_type": hf["model_type"]}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    return ImportResult(config=cfg, model_type=hf["model_type"], source=hf_dir)
