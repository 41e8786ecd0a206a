"""The Transformer encoder-decoder, top to bottom: masks, attention, feed-forward, layers,
encoder, decoder, and the model with its public verbs ``encode``, ``classify``, ``cross_kv``
and ``decode``.

Shapes: B batch, S source length, T target length (new decoder tokens), P past (cached)
decoder length, H heads, D head_dim, C d_model, V vocab, L layers.

Mask convention, for the whole project: a boolean mask is True where attention is allowed,
as ``F.scaled_dot_product_attention`` takes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seq2serve.config import ModelConfig
from seq2serve.model.cache import KV, KVCache

# ----------------------------------------------------------------------------------------
# Masks


def padding_mask(attention_mask: Tensor) -> Tensor:
    """(B, S) ints, 1 = token -> (B, 1, 1, S): every query sees every real key, left and right.

    The encoder's self-attention and all cross-attention use this one: no triangle.
    """
    return attention_mask.bool()[:, None, None, :]


def causal_mask(decoder_attention_mask: Tensor, num_new: int) -> Tensor:
    """(B, P + T) ints, 1 = real cached or new token -> (B, 1, T, P + T).

    New token j (absolute place P + j) sees real keys at places <= P + j, never after: the
    triangle. A query row with no key to see (a padded query over an all-padding row) sees
    every key instead of none, which would make softmax NaN; its output is never read. Real
    queries are untouched: their own key is real. (Not "always see itself": in a cache
    buffer wider than the tokens written so far, the last column need not be the query's.)
    """
    total = decoder_attention_mask.shape[1]
    past = total - num_new
    query_place = torch.arange(num_new, device=decoder_attention_mask.device)[:, None] + past
    key_place = torch.arange(total, device=decoder_attention_mask.device)[None, :]
    triangle = key_place <= query_place  # (T, P + T)
    real = decoder_attention_mask.bool()[:, None, None, :]  # (B, 1, 1, P + T)
    allowed = real & triangle
    return allowed | ~allowed.any(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------
# Attention


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D) + mask) v, written out: the oracle the fast path is tested on."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def fast_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    # One row of the mask per query, not one broadcast over them: exported at opset 23 this
    # call is a single ONNX Attention node, and onnxruntime's kernel for it wants the mask's
    # query axis spelled out.
    mask = mask.expand(-1, -1, q.shape[-2], -1)  # (B, 1, T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """Multi-head attention whose keys/values arrive as a ``KV`` computed by the caller:
    from the same tokens (self-attention, appended to the cache) or once from the encoder
    output (cross-attention)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.attend = fast_attention

    def split_heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def project_kv(self, x: Tensor) -> KV:
        return KV(self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x)))

    def forward(self, x: Tensor, kv: KV, mask: Tensor) -> Tensor:
        q = self.split_heads(self.q_proj(x))  # (B, H, T, D)
        out = self.attend(q, kv.key, kv.value, mask)  # (B, H, T, D)
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, C)


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.act = ACTIVATIONS[cfg.activation]
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class Residual(nn.Module):
    """One sublayer with its residual add and layer norm, pre- or post-norm by config."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm_first = cfg.norm_first

    def forward(self, x: Tensor, sublayer) -> Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


# ----------------------------------------------------------------------------------------
# Layers


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn, self.ffn = Attention(cfg), FeedForward(cfg)
        self.attn_block, self.ffn_block = Residual(cfg), Residual(cfg)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.attn_block(x, lambda h: self.self_attn(h, self.self_attn.project_kv(h), mask))
        return self.ffn_block(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn, self.cross_attn, self.ffn = Attention(cfg), Attention(cfg), FeedForward(cfg)
        self.self_block, self.cross_block, self.ffn_block = (
            Residual(cfg),
            Residual(cfg),
            Residual(cfg),
        )

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor,
        cache: KVCache,
        layer: int,
        cross: KV,
        cross_mask: Tensor,
    ) -> Tensor:
        def self_attention(h: Tensor) -> Tensor:
            kv = cache.update(layer, self.self_attn.project_kv(h))  # (B, H, P + T, D)
            return self.self_attn(h, kv, self_mask)

        x = self.self_block(x, self_attention)
        x = self.cross_block(x, lambda h: self.cross_attn(h, cross, cross_mask))
        return self.ffn_block(x, self.ffn)


# ----------------------------------------------------------------------------------------
# Embeddings


def sinusoidal_table(n_positions: int, dim: int) -> Tensor:
    """Marian's layout: sines in the first half of the channels, cosines in the second."""
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = position * freq  # (n_positions, ceil(dim / 2))
    table = torch.cat([angles.sin(), angles.cos()], dim=-1)[:, :dim]
    return table.float()


class Embeddings(nn.Module):
    """Token embedding (shared by encoder, decoder and the tied LM head) plus positions."""

    def __init__(self, cfg: ModelConfig, tokens: nn.Embedding, max_positions: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.offset = cfg.position_offset
        if cfg.positions == "learned":
            self.positions: nn.Module | None = nn.Embedding(
                max_positions + self.offset, cfg.d_model
            )
        else:
            self.positions = None
            self.register_buffer(
                "table", sinusoidal_table(max_positions, cfg.d_model), persistent=False
            )
        self.norm = (
            nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.embedding_norm else None
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        x = self.tokens(input_ids) * self.scale  # (B, T, C)
        if self.positions is not None:
            x = x + self.positions(position_ids + self.offset)
        else:
            x = x + self.table[position_ids]
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


# ----------------------------------------------------------------------------------------
# Encoder and decoder stacks


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed = Embeddings(cfg, tokens, cfg.max_source_positions)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, cfg.layer_norm_eps) if cfg.norm_first else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        x = self.embed(input_ids, positions)  # (B, S, C)
        mask = padding_mask(attention_mask)  # (B, 1, 1, S)
        for layer in self.layers:
            x = layer(x, mask)
        return self.final_norm(x) if self.final_norm is not None else x


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed = Embeddings(cfg, tokens, cfg.max_target_positions)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, cfg.layer_norm_eps) if cfg.norm_first else None

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        decoder_attention_mask: Tensor,
        cache: KVCache,
        cross: list[KV],
        encoder_attention_mask: Tensor,
    ) -> Tensor:
        x = self.embed(input_ids, position_ids)  # (B, T, C)
        self_mask = causal_mask(decoder_attention_mask, input_ids.shape[1])  # (B, 1, T, P + T)
        cross_mask = padding_mask(encoder_attention_mask)  # (B, 1, 1, S)
        for i, layer in enumerate(self.layers):
            x = layer(x, self_mask, cache, i, cross[i], cross_mask)
        return self.final_norm(x) if self.final_norm is not None else x


# ----------------------------------------------------------------------------------------
# The model


@dataclass
class Seq2SeqOutput:
    logits: Tensor  # (B, T, V)
    class_logits: Tensor | None  # (B, num_labels), None without a classification head


class Transformer(nn.Module):
    """Encoder-decoder with a tied LM head and a classification head on the pooled encoder."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.encoder = Encoder(cfg, self.tokens)
        self.decoder = Decoder(cfg, self.tokens)
        bias = torch.zeros(cfg.vocab_size) if cfg.final_logits_bias else None
        self.register_buffer("final_logits_bias", bias)
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels) if cfg.num_labels else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=module.embedding_dim**-0.5)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def use_reference_attention(self, enabled: bool = True) -> None:
        """Switch every attention to the written-out reference path (for tests)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.attend = reference_attention if enabled else fast_attention

    # -- the public verbs ------------------------------------------------------------------

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Contextual embeddings (B, S, C); every token sees its left and right context."""
        return self.encoder(input_ids, attention_mask)

    @staticmethod
    def pool(encoder_hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean over real tokens only (B, C): padding never shifts the embedding."""
        weights = attention_mask.to(encoder_hidden_states.dtype)[:, :, None]  # (B, S, 1)
        total = (encoder_hidden_states * weights).sum(dim=1)
        return total / weights.sum(dim=1).clamp(min=1.0)

    def classify(self, encoder_hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        """Class logits (B, num_labels) from the pooled encoder output."""
        if self.classifier is None:
            raise ValueError("this model has no classification head (config id2label is empty)")
        return self.classifier(self.pool(encoder_hidden_states, attention_mask))

    def cross_kv(self, encoder_hidden_states: Tensor) -> list[KV]:
        """Cross-attention keys/values for every decoder layer, (B, H, S, D) each.

        Computed once per request; every decode step reuses them.
        """
        return [layer.cross_attn.project_kv(encoder_hidden_states) for layer in self.decoder.layers]

    def decode(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        decoder_attention_mask: Tensor,
        cache: KVCache,
        cross: list[KV],
        encoder_attention_mask: Tensor,
    ) -> Tensor:
        """Logits (B, T, V) for T new decoder tokens (1 per step, many for a prefill).

        ``decoder_attention_mask`` is (B, P + T), covering the cached and the new tokens; the
        cache grows by T in place.
        """
        hidden = self.decoder(
            input_ids, position_ids, decoder_attention_mask, cache, cross, encoder_attention_mask
        )
        return self.lm_head(hidden)

    def lm_head(self, hidden: Tensor) -> Tensor:
        logits = hidden @ self.tokens.weight.T  # (B, T, V), tied to the embeddings
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias
        return logits

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        decoder_input_ids: Tensor,
        decoder_attention_mask: Tensor,
    ) -> Seq2SeqOutput:
        """Teacher-forced pass over whole sequences (training, and the uncached oracle)."""
        hidden = self.encode(input_ids, attention_mask)
        b, t = decoder_input_ids.shape
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        logits = self.decode(
            decoder_input_ids,
            positions,
            decoder_attention_mask,
            KVCache.empty(self.cfg, b, device=input_ids.device, dtype=hidden.dtype),
            self.cross_kv(hidden),
            attention_mask,
        )
        class_logits = (
            self.classify(hidden, attention_mask) if self.classifier is not None else None
        )
        return Seq2SeqOutput(logits=logits, class_logits=class_logits)
