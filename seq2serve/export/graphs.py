"""Thin wrappers that give each graph the flat signature of the contract, and the export.

The decoder graph takes any number of new tokens (1 for a step, many for a prefill) and a past
that may be empty; the encoder graph also returns the cross-attention keys/values, so a
request computes them once.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn
from torch.export import Dim

from seq2serve import contract
from seq2serve.config import ModelConfig
from seq2serve.export import dropping
from seq2serve.export.fuse import attend_unsplit, fold_head_transposes, fuse_projections
from seq2serve.model.cache import KV, KVCache
from seq2serve.model.transformer import Transformer

log = logging.getLogger(__name__)

OPSET = 23
STEP_OPSET = 24  # TensorScatter, the in-place cache write of decoder_step.onnx
TORCH_REGISTRY = "torch.onnx._internal.exporter._registration"


class EncoderGraph(nn.Module):
    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        hidden = m.encode(input_ids, attention_mask)  # (B, S, C)
        pooled = m.pool(hidden, attention_mask)  # (B, C)
        # (B, num_labels); without a head the contract's output still exists, empty (B, 0).
        class_logits = m.classifier(pooled) if m.classifier is not None else pooled[:, :0]
        cross = m.cross_kv(hidden)  # L x (B, H, S, D)
        return (hidden, pooled, class_logits, *(t for kv in cross for t in (kv.key, kv.value)))


class DecoderGraph(nn.Module):
    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        decoder_attention_mask: Tensor,
        encoder_attention_mask: Tensor,
        *past: Tensor,
    ) -> tuple[Tensor, ...]:
        # past holds, per layer: decoder key, decoder value, encoder key, encoder value.
        n = self.model.cfg.n_decoder_layers
        cache = KVCache([KV(past[4 * i], past[4 * i + 1]) for i in range(n)])
        cross = [KV(past[4 * i + 2], past[4 * i + 3]) for i in range(n)]
        logits = self.model.decode(
            input_ids, position_ids, decoder_attention_mask, cache, cross, encoder_attention_mask
        )
        return (logits, *(t for kv in cache.layers for t in (kv.key, kv.value)))


def _example_inputs(model: Transformer) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Sample inputs with every dynamic axis >= 2 (torch.export specializes sizes 0 and 1)."""
    cfg = model.cfg
    b, s, t, p = 2, 5, 3, 4
    ids = torch.full((b, s), cfg.eos_token_id, dtype=torch.long)
    enc = (ids, torch.ones(b, s, dtype=torch.long))
    # Every past/cross input is a distinct tensor: torch.export would merge inputs that are
    # the same object, wiring one graph input where two belong.
    past = [torch.zeros(b, cfg.n_heads, p, cfg.head_dim) for _ in range(2 * cfg.n_decoder_layers)]
    cross = [torch.zeros(b, cfg.n_heads, s, cfg.head_dim) for _ in range(2 * cfg.n_decoder_layers)]
    layers = [
        t
        for i in range(cfg.n_decoder_layers)
        for t in (past[2 * i], past[2 * i + 1], cross[2 * i], cross[2 * i + 1])
    ]
    dec = (
        torch.full((b, t), cfg.decoder_start_token_id, dtype=torch.long),
        torch.arange(p, p + t).expand(b, t).contiguous(),
        torch.ones(b, p + t, dtype=torch.long),
        torch.ones(b, s, dtype=torch.long),
        *layers,
    )
    return enc, dec


def export_graphs(model: Transformer, out_dir: Path) -> None:
    """Export encoder.onnx and decoder.onnx (weights inline; ``bundle`` moves them out), the
    decoder with each self-attention's projections fused (``fuse.fuse_projections``), the
    encoder's self-attention over unsplit heads (``fuse.attend_unsplit``)."""
    model = model.eval()
    cfg = model.cfg
    enc_args, dec_args = _example_inputs(model)
    batch = Dim("batch_size")
    source = Dim("encoder_sequence_length", max=cfg.max_source_positions)
    target = Dim("decoder_sequence_length", max=cfg.max_target_positions)
    past = Dim("past_decoder_sequence_length", min=0, max=cfg.max_target_positions)
    enc_dims = ({0: batch, 1: source}, {0: batch, 1: source})
    dec_dims = (
        {0: batch, 1: target},
        {0: batch, 1: target},
        {0: batch, 1: Dim.AUTO},  # past + target: torch.export cannot add two Dims
        {0: batch, 1: source},
        tuple(
            d
            for _ in range(cfg.n_decoder_layers)
            for d in (
                {0: batch, 2: past},
                {0: batch, 2: past},
                {0: batch, 2: source},
                {0: batch, 2: source},
            )
        ),
    )
    jobs = [
        (
            EncoderGraph(model),
            enc_args,
            enc_dims,
            contract.encoder_inputs(),
            contract.encoder_outputs(cfg),
            contract.ENCODER_FILE,
        ),
        (
            DecoderGraph(model),
            dec_args,
            dec_dims,
            contract.decoder_inputs(cfg),
            contract.decoder_outputs(cfg),
            contract.DECODER_FILE,
        ),
    ]
    for module, args, dims, inputs, outputs, file in jobs:
        # The exporter's registry announces each torchvision operator it skips (8 lines an
        # export): these graphs have none.
        with torch.no_grad(), warnings.catch_warnings(), dropping(TORCH_REGISTRY, "torchvision"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                external_data=False,
                opset_version=OPSET,
                dynamic_shapes=dims,
                input_names=[i.name for i in inputs],
                output_names=[o.name for o in outputs],
                verbose=False,
            )
        proto = program.model_proto
        if file == contract.DECODER_FILE:
            fuse_projections(proto)
        else:
            attend_unsplit(proto, cfg.n_heads)
        _name_axes(proto, inputs, outputs)
        onnx.save_model(proto, str(out_dir / file))


def step_graph(decoder: onnx.ModelProto, cfg: ModelConfig) -> onnx.ModelProto:
    """``decoder_step.onnx`` from ``decoder.onnx``: each ``Concat(past, new)`` of the
    self-attention cache becomes ``TensorScatter(past, new, write_indices)``, which writes the
    new column into the buffer instead of copying the past into a wider one (see
    ``contract.decoder_step_inputs``), and its heads are split and merged by reshapes alone
    (``fuse.fold_head_transposes``: one token a row). Everything else, weights included, is
    the decoder's.

    The causal mask stays right over a buffer wider than the tokens written so far: for one
    new token its triangle covers the whole buffer, and the mask input hides the columns
    after the new one (``model.transformer.causal_mask``).
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(decoder)
    graph = proto.graph
    past = {
        v.name
        for v in graph.input
        if v.name.startswith("past_key_values.") and ".decoder." in v.name
    }
    rewritten = 0
    for node in graph.node:
        if node.op_type == "Concat" and node.input[0] in past:
            (axis,) = [a.i for a in node.attribute if a.name == "axis"]
            node.op_type = "TensorScatter"
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("axis", axis))
            node.input.append(contract.WRITE_INDICES)
            rewritten += 1
    if rewritten != len(past):
        raise ValueError(f"{rewritten} cache Concat nodes for {len(past)} cache inputs")
    fold_head_transposes(proto, cfg.n_heads, cfg.head_dim)
    graph.input.append(
        onnx.helper.make_tensor_value_info(
            contract.WRITE_INDICES, onnx.TensorProto.INT64, [contract.BATCH]
        )
    )
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = STEP_OPSET
    _name_axes(proto, contract.decoder_step_inputs(cfg), contract.decoder_step_outputs(cfg))
    del graph.value_info[:]  # shapes inferred for the Concat outputs no longer hold
    return proto


def _name_axes(
    proto: onnx.ModelProto, inputs: list[contract.TensorSpec], outputs: list[contract.TensorSpec]
) -> None:
    """Give every dynamic axis the contract's name (the exporter invents some, like 's55')."""
    specs = {s.name: s for s in [*inputs, *outputs]}
    for value in [*proto.graph.input, *proto.graph.output]:
        spec = specs[value.name]
        for dim, want in zip(value.type.tensor_type.shape.dim, spec.shape, strict=True):
            if isinstance(want, str):
                dim.dim_param = want


def log_softmax_model() -> onnx.ModelProto:
    """The engine's ``log_softmax.onnx``: log_softmax over the last axis of (rows, vocab_size)
    float32 logits, one LogSoftmax node. The file ships with the engine, which has no onnx
    package to build it with; a test checks the file is exactly this model."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("LogSoftmax", ["logits"], ["logprobs"], axis=-1)],
        "log_softmax",
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["rows", "vocab"])],
        [onnx.helper.make_tensor_value_info("logprobs", onnx.TensorProto.FLOAT, ["rows", "vocab"])],
    )
    # A fixed IR version and opset: the bytes stay the same whatever onnx builds them.
    return onnx.helper.make_model(
        graph, ir_version=8, opset_imports=[onnx.helper.make_opsetid("", 13)]
    )
