"""Request text to token ids, with the limits the web layer owns: how many inputs, how many
tokens each (a 422 naming the limit, or truncation when the client asked for it)."""

from __future__ import annotations

import asyncio

from tokenizers import Tokenizer

from seq2serve.engine.scheduler import Engine
from seq2serve.service.errors import invalid
from seq2serve.service.settings import Limits

# Above this many characters in one request, tokenizing moves off the event loop so that
# other clients' streams keep flowing while it runs.
_INLINE_CHARS = 8192


def as_list(inputs: str | list[str], limits: Limits, param: str) -> list[str]:
    """One or many inputs as a list, checked: not empty, not too many, valid text."""
    texts = [inputs] if isinstance(inputs, str) else inputs
    if not texts:
        raise invalid(f"{param}: must hold at least one input", param, "empty_input")
    if len(texts) > limits.max_inputs_per_request:
        raise invalid(
            f"{param}: {len(texts)} inputs, more than the limit of "
            f"{limits.max_inputs_per_request} per request (max_inputs_per_request)",
            param,
            "too_many_inputs",
        )
    for text, name in zip(texts, param_names(inputs, param), strict=True):
        check_text(text, name)
    return texts


def check_text(text: str, param: str) -> None:
    if not text:
        raise invalid(f"{param}: must not be empty", param, "empty_input")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        # JSON can carry lone surrogates ("\ud800"); no tokenizer can encode them.
        raise invalid(
            f"{param}: not valid Unicode text ({err.reason} at {err.start})",
            param,
            "invalid_text",
        ) from err


def _encode(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    if len(texts) == 1:
        return [tokenizer.encode(texts[0]).ids]
    return [e.ids for e in tokenizer.encode_batch(texts)]


def param_names(inputs: str | list[str], param: str) -> list[str]:
    """The name each input goes by in error messages: "inputs" or "inputs.3"."""
    return [param] if isinstance(inputs, str) else [f"{param}.{i}" for i in range(len(inputs))]


async def tokenize(
    engine: Engine,
    texts: list[str],
    names: list[str],
    limits: Limits,
    *,
    truncate: bool | None,
) -> list[list[int]]:
    """Token ids per text (each ending with the end-of-sequence id), at most
    ``max_input_tokens`` long: longer is a 422 unless ``truncate``, which keeps the first
    ``limit - 1`` ids and re-appends the end-of-sequence id. ``truncate=None``: the route
    offers no truncation."""
    if sum(len(t) for t in texts) > _INLINE_CHARS:
        ids = await asyncio.to_thread(_encode, engine.tokenizer, texts)
    else:
        ids = _encode(engine.tokenizer, texts)
    limit = limits.max_input_tokens
    eos = engine.config.eos_token_id
    for i, row in enumerate(ids):
        if len(row) <= limit:
            continue
        if truncate:
            ids[i] = [*row[: limit - 1], eos]
            continue
        hint = "; shorten it" + (" or send truncate: true" if truncate is not None else "")
        raise invalid(
            f"{names[i]}: {len(row)} tokens, more than the limit of {limit} "
            f"(max_input_tokens){hint}",
            names[i],
            "too_many_tokens",
        )
    return ids
