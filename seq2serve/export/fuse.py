"""Graph rewrites that take nodes off the exported graphs, computing the same values.

At batch 1 an opus-mt-sized int8 step is about 2 ms for 229 onnxruntime nodes (once
onnxruntime has fused what it fuses), and a node costs its dispatch whatever its size. Two
rewrites of the decoder take 48 of them off (54 of 306 in fp32), and a third takes the head
transposes off the encoder's self-attention. None changes a result:

- ``fuse_projections`` (decoder): the query, key and value projections of a self-attention
  read the same activation. One MatMul over their weights side by side, one bias Add and a
  Split replace three MatMuls and three Adds; in int8, one DynamicQuantizeMatMul replaces a
  DynamicQuantizeLinear and three MatMulIntegerToFloat. The weights are quantized per
  output channel, so the int8 results are the same bits. The encoder keeps its projections
  apart: a call has many rows there, and the Split's copy costs more than the dispatches
  it saves.
- ``fold_head_transposes`` (the one-token step graph): with one new token a row, splitting
  a (B, 1, C) projection into heads, (B, H, 1, D), and merging heads back are reshapes of
  the same memory, where the exported graph has a Reshape and a Transpose each way. Each
  pair becomes one Reshape, which onnxruntime runs in place.
- ``attend_unsplit`` (encoder): ONNX's Attention takes queries, keys and values as
  (B, S, C) with the number of heads as attributes, and then returns (B, S, C). The encoder's
  self-attention reads its projections as they come, without the Reshape and Transpose
  that split each into heads, nor the Transpose that merged its output. (The decoder's
  attentions read 4-D caches, and onnxruntime wants queries of the keys' rank.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Swaps the token and head axes: (B, T, H, D) <-> (B, H, T, D).
HEAD_SWAP = [0, 2, 1, 3]


def _swaps_heads(node: onnx.NodeProto) -> bool:
    return node.op_type == "Transpose" and [
        list(a.ints) for a in node.attribute if a.name == "perm"
    ] == [HEAD_SWAP]


@dataclass
class _Links:
    """Who makes and who reads each value of a graph, and which values leave it."""

    producers: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    outputs: set[str]

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> _Links:
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        producers = {name: node for node in graph.node for name in node.output}
        return cls(producers, consumers, {o.name for o in graph.output})

    def read_only_by(self, node: onnx.NodeProto, reader: onnx.NodeProto) -> bool:
        """``node``'s output goes to ``reader`` alone, and not out of the graph."""
        name = node.output[0]
        return name not in self.outputs and all(r is reader for r in self.consumers[name])


def _rebuild(
    graph: onnx.GraphProto,
    dropped: set[int],
    before: dict[int, list[onnx.NodeProto]] | None = None,
) -> None:
    """The graph's nodes without those whose ids are in ``dropped``, with the nodes of
    ``before`` put in front of the node whose id keys them."""
    nodes = []
    for node in graph.node:
        nodes.extend((before or {}).get(id(node), []))
        if id(node) not in dropped:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _projection(
    node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], links: _Links
) -> tuple[onnx.NodeProto, str] | None:
    """``node``'s bias Add and the bias's name, when ``node`` is ``x @ W + b`` with W a 2-D
    float initializer, b a 1-D one and the product read by the Add alone."""
    if node.op_type != "MatMul" or node.input[1] not in inits:
        return None
    weight = inits[node.input[1]]
    if len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
        return None
    users = links.consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add" or not links.read_only_by(node, users[0]):
        return None
    others = [name for name in users[0].input if name != node.output[0]]
    if len(others) != 1 or others[0] not in inits:
        return None
    if list(inits[others[0]].dims) != [weight.dims[1]]:
        return None
    return users[0], others[0]


def fuse_projections(model: onnx.ModelProto) -> int:
    """Replace the ``x @ W_i + b_i`` that read the same ``x`` by one ``x @ [W_1 .. W_n] +
    [b_1 .. b_n]`` split into the same outputs; returns how many groups were fused."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    links = _Links.of(graph)
    groups: dict[str, list[tuple[onnx.NodeProto, onnx.NodeProto, str]]] = {}
    for node in graph.node:
        found = _projection(node, inits, links)
        if found is not None:
            groups.setdefault(node.input[0], []).append((node, *found))
    groups = {x: members for x, members in groups.items() if len(members) > 1}

    replaced: dict[int, list[onnx.NodeProto]] = {}  # first member's MatMul -> new nodes
    dropped: set[int] = set()
    for x, members in groups.items():
        weights = [numpy_helper.to_array(inits[mm.input[1]]) for mm, _, _ in members]
        biases = [numpy_helper.to_array(inits[bias]) for _, _, bias in members]
        name = members[0][0].name + ".fused"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.concatenate(weights, axis=1), name + ".weight"),
                numpy_helper.from_array(np.concatenate(biases), name + ".bias"),
                numpy_helper.from_array(
                    np.array([w.shape[1] for w in weights], np.int64), name + ".split"
                ),
            ]
        )
        replaced[id(members[0][0])] = [
            helper.make_node("MatMul", [x, name + ".weight"], [name + ".mm"], name=name + ".mm"),
            helper.make_node(
                "Add", [name + ".mm", name + ".bias"], [name + ".add"], name=name + ".add"
            ),
            helper.make_node(
                "Split",
                [name + ".add", name + ".split"],
                [add.output[0] for _, add, _ in members],
                axis=-1,
                name=name + ".split",
            ),
        ]
        dropped.update(id(n) for mm, add, _ in members for n in (mm, add))

    # The fused nodes take the place of the group's first MatMul: x is ready there, and
    # whatever reads a member's output came after that member, so after this place.
    _rebuild(graph, dropped, before=replaced)
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(groups)


def fold_head_transposes(step: onnx.ModelProto, n_heads: int, head_dim: int) -> int:
    """In a one-token step graph, make each head split (Reshape to (B, 1, H, D), then
    Transpose) one Reshape to (B, H, 1, D), and drop each head merge's Transpose before its
    Reshape to (B, 1, C); returns how many Transposes went.

    A split is recognized by what reads it (an Attention's query, or the keys/values a
    TensorScatter writes into the cache), a merge by what it reads (an Attention's output).
    The new shape spells the token axis as 1, so a call with more than one new token a row
    fails in the Reshape instead of mixing heads and tokens.
    """
    graph = step.graph
    links = _Links.of(graph)
    shape = "step.heads_shape"
    dropped: set[int] = set()
    splits = 0
    for node in graph.node:
        if not _swaps_heads(node) or node.output[0] in links.outputs:
            continue
        source = links.producers.get(node.input[0])
        users = links.consumers.get(node.output[0], [])
        reads_heads = users and all(
            (u.op_type == "Attention" and u.input[0] == node.output[0])
            or (u.op_type == "TensorScatter" and u.input[1] == node.output[0])
            for u in users
        )
        if (
            reads_heads
            and source is not None
            and source.op_type == "Reshape"
            and links.read_only_by(source, node)
        ):
            node.op_type = "Reshape"
            del node.attribute[:]
            node.input[:] = [source.input[0], shape]
            dropped.add(id(source))
            splits += 1
        elif (
            source is not None
            and source.op_type == "Attention"
            and users
            and all(u.op_type == "Reshape" and u.input[0] == node.output[0] for u in users)
        ):
            for u in users:
                u.input[0] = node.input[0]
            dropped.add(id(node))
    if splits:
        graph.initializer.append(
            numpy_helper.from_array(np.array([0, n_heads, 1, head_dim], np.int64), shape)
        )
    _rebuild(graph, dropped)
    return len(dropped)


def _head_split(name: str, links: _Links) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """The (Reshape to (B, S, H, D), Transpose to (B, H, S, D)) pair that makes ``name``."""
    swap = links.producers.get(name)
    if swap is None or not _swaps_heads(swap):
        return None
    view = links.producers.get(swap.input[0])
    return (view, swap) if view is not None and view.op_type == "Reshape" else None


def attend_unsplit(model: onnx.ModelProto, n_heads: int) -> int:
    """Give each Attention whose query, key and value are head splits of (B, S, C) tensors,
    and whose output is merged back by a Transpose and a Reshape, those tensors and
    ``n_heads`` instead; returns how many Attentions were rewritten."""
    graph = model.graph
    links = _Links.of(graph)
    dropped: set[int] = set()
    rewritten: set[str] = set()  # the rewritten Attentions' outputs
    count = 0
    for node in graph.node:
        if node.op_type != "Attention" or any(a.name.endswith("num_heads") for a in node.attribute):
            continue
        found = [_head_split(name, links) for name in node.input[:3]]
        splits = [s for s in found if s is not None]
        users = links.consumers.get(node.output[0], [])
        if len(splits) != 3 or len(users) != 1:
            continue
        merge = users[0]
        merged = links.consumers.get(merge.output[0], [])
        if (
            not _swaps_heads(merge)
            or not merged
            or any(u.op_type != "Reshape" or u.input[0] != merge.output[0] for u in merged)
        ):
            continue
        for i, (view, swap) in enumerate(splits):
            node.input[i] = view.input[0]
            if links.read_only_by(swap, node) and links.read_only_by(view, swap):
                dropped.update((id(view), id(swap)))
        node.attribute.extend(
            [
                helper.make_attribute("q_num_heads", n_heads),
                helper.make_attribute("kv_num_heads", n_heads),
            ]
        )
        for reshape in merged:  # to (B, S, C), which the output already is: done in place
            reshape.input[0] = node.output[0]
        dropped.add(id(merge))
        rewritten.update(node.output)
        count += 1
    _rebuild(graph, dropped)
    # The shapes the exporter inferred for the rewritten outputs were 4-D.
    shapes = [v for v in graph.value_info if v.name not in rewritten]
    del graph.value_info[:]
    graph.value_info.extend(shapes)
    return count
