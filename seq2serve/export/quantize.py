"""int8 graphs: onnxruntime's dynamic quantization, with the tied embedding quantized once.

``quantize_dynamic`` turns every MatMul whose weight is an initializer into int8 weights
(per output channel) with activations quantized per call. Two things it does not do, and
that matter most for a translation-sized vocabulary, where the tied embedding is over half
of the weights (58101 x 512 for opus-mt):

- the LM head is ``hidden @ embedding.T``; the exporter writes ``MatMul(h, Transpose(E))``,
  and a MatMul fed by a node is left in fp32. ``expose_transposed_weights`` folds such a
  transpose into an initializer first, so the head is quantized like every other MatMul: the
  step reads 30 MB of int8 for it instead of 119 MB of fp32.
- the embedding lookup (``Gather``) would keep the fp32 table besides the int8 head.
  ``tie_int8_embedding`` makes the lookup read the head's own int8 rows and scales
  (a row of the head's per-channel quantization is an embedding vector), so the int8 bundle
  stores the table once, as int8, and the fp32 table is gone from it.

Weights are quantized to 7 bits (``reduce_range``: -64..64). Activations are uint8, and on
x86 CPUs without VNNI (AVX2: AMD Zen 1-3, Intel before Cascade Lake) onnxruntime's u8 x s8
kernel adds pairs of products in 16 bits with saturation (``vpmaddubsw``): with 8-bit
weights a pair reaches 2 x 255 x 127 = 64,770 and is clipped to 32,767. Measured on such a
CPU (AMD EPYC, Zen 1): a MatMulInteger of 255s by 127s came out at half its value, and a
tiny model's int8 logits correlated 0.973 with fp32's (above 0.99 with 7 bits). With 7-bit weights a
pair is at most 2 x 255 x 64 = 32,640: exact on every CPU, so a bundle computes the same
everywhere, at the price of a coarser weight grid (its figures are in the manifest).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from seq2serve.export import dropping

# The largest weight magnitude that no x86 int8 kernel saturates on (see above).
SATURATION_FREE_WEIGHT = 64

# The int8 table, stored as embedding rows (V, C), and its per-row scale (V,).
EMBED_INT8 = "embed_tokens.int8"
EMBED_SCALE = "embed_tokens.scale"


def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if name in n.input]


def expose_transposed_weights(model: onnx.ModelProto) -> list[str]:
    """Replace ``Transpose(W)`` of a 2-D initializer feeding only MatMul weights by the
    transposed initializer itself; returns the new initializers' names."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    exposed = []
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        source = numpy_helper.to_array(inits[node.input[0]])
        if source.ndim != 2 or perm not in ([], [[1, 0]]):
            continue
        users = _consumers(graph, node.output[0])
        if not users or any(u.op_type != "MatMul" or u.input[1] != node.output[0] for u in users):
            continue
        graph.node.remove(node)
        graph.initializer.append(
            numpy_helper.from_array(np.ascontiguousarray(source.T), node.output[0])
        )
        exposed.append(node.output[0])
    return exposed


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of every MatMul weight, the LM head included."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    expose_transposed_weights(model)
    exposed = src.with_name(src.stem + ".exposed.onnx")
    onnx.save_model(model, str(exposed))
    # It advises its pre-processing (shape inference and graph optimization, after its
    # image-classification example) on the root logger at every call. The exporter's
    # graphs carry their shapes, onnxruntime optimizes them when a session opens, and the
    # int8 graphs' agreement with fp32 is tested: the advice is dropped, not the checks.
    with dropping("", "Please consider"):
        quantize_dynamic(
            exposed,
            dst,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=True,  # 7-bit weights: -64..64, SATURATION_FREE_WEIGHT
        )
    exposed.unlink()


def tied_head(decoder: onnx.ModelProto, embedding: str) -> tuple[str, np.ndarray, np.ndarray]:
    """The quantized LM head of ``decoder``: the int8 weight that quantized the transpose of
    ``embedding`` -- its name, its values (C, V) and its per-column scale (V,)."""
    inits = {i.name: i for i in decoder.graph.initializer}
    table = numpy_helper.to_array(inits[embedding])
    for name, init in inits.items():
        if not name.endswith("_quantized") or tuple(init.dims) != table.shape[::-1]:
            continue
        base = name.removesuffix("_quantized")
        scale = numpy_helper.to_array(inits[base + "_scale"])
        zero = numpy_helper.to_array(inits[base + "_zero_point"])
        if np.any(zero != 0):
            raise ValueError(f"{name}: the head's quantization is not symmetric")
        weight = numpy_helper.to_array(init)
        # The head quantized this table if dequantizing it gives the table back.
        if np.allclose(weight[:, :8].T * scale[:8, None], table[:8], atol=float(scale.max())):
            return name, weight, scale
    raise ValueError(f"no int8 LM head over {embedding} in the decoder graph")


def _int8_lookup(gather: onnx.NodeProto) -> tuple[list[onnx.NodeProto], onnx.TensorProto]:
    """Nodes that replace ``Gather(E, ids)`` by an int8 lookup, rows times their scales, and
    the initializer they need."""
    ids, out = gather.input[1], gather.output[0]
    p = out + ".int8"
    nodes = [
        helper.make_node("Gather", [EMBED_INT8, ids], [p + ".rows"], axis=0),  # (B, T, C)
        helper.make_node("Cast", [p + ".rows"], [p + ".float"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Gather", [EMBED_SCALE, ids], [p + ".scale"], axis=0),  # (B, T)
        helper.make_node("Unsqueeze", [p + ".scale", p + ".axis"], [p + ".scale3"]),
        helper.make_node("Mul", [p + ".float", p + ".scale3"], [out]),  # (B, T, C)
    ]
    return nodes, numpy_helper.from_array(np.array([-1]), p + ".axis")


def tie_int8_embedding(graphs: dict[str, onnx.ModelProto], decoder_file: str) -> None:
    """Make every graph's embedding lookup read the decoder's int8 LM head, and drop the
    fp32 table. The head reads its weight as a Transpose of the stored rows, which
    onnxruntime folds at load time; the lookup gathers whole rows."""
    decoder = graphs[decoder_file]
    gathers = [n for n in decoder.graph.node if n.op_type == "Gather"]
    inits = {i.name for i in decoder.graph.initializer}
    embedding = next(n.input[0] for n in gathers if n.input[0] in inits)
    head, weight, scale = tied_head(decoder, embedding)
    rows = numpy_helper.from_array(np.ascontiguousarray(weight.T), EMBED_INT8)  # (V, C)
    scales = numpy_helper.from_array(scale.astype(np.float32), EMBED_SCALE)
    table = numpy_helper.to_array(next(i for i in decoder.graph.initializer if i.name == embedding))
    for name, model in graphs.items():
        graph = model.graph
        # The same table may carry another name in another graph: match it by value.
        here = {
            i.name
            for i in graph.initializer
            if tuple(i.dims) == table.shape and np.array_equal(numpy_helper.to_array(i), table)
        }
        lookups = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in here]
        if not lookups:
            raise ValueError(f"{name}: no lookup of the embedding table")
        nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            if node in lookups:
                lookup, axis = _int8_lookup(node)
                nodes += lookup
                graph.initializer.append(axis)
            else:
                nodes.append(node)
        if name == decoder_file:
            nodes.insert(0, helper.make_node("Transpose", [EMBED_INT8], [head], perm=[1, 0]))
        kept = [i for i in graph.initializer if i.name not in {*here, head}]
        del graph.initializer[:]
        graph.initializer.extend([*kept, rows, scales])
        del graph.node[:]
        graph.node.extend(nodes)
        if any(t in n.input for n in graph.node for t in here):
            raise ValueError(f"{name}: the fp32 embedding is still read outside the lookup")
