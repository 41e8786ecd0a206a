"""The fp32 step graph's LM head, screened in int8 and rescored exactly.

A batch-1 fp32 decode step is bound by the bytes it reads, and the tied LM head (58,101 x 512
for opus-mt: 119 MB of the step's 210) is most of them. ``screen_head`` rewrites the head of
``decoder_step.onnx`` so that a step reads an int8 copy of it (30 MB) instead, without
changing which token greedy decoding picks:

1. screen: ``A = dequant(quant(h) @ Wq) + bias``, the int8 logits (``Wq``: the embedding
   quantized per row, symmetric, to 7 bits, so that the uint8 x int8 product is exact on
   every CPU (see ``quantize``); ``h`` quantized per call, as onnxruntime's dynamic
   quantization does);
2. bound: ``|logit_j - A_j| <= ||h_q||_1 * max|w_j - w_q,j| + max|h - h_q| * ||w_j||_1`` for
   every token j (``h_q``, ``w_q``: the dequantized values), from the two rounding errors: the
   weights' measured at export, the hidden state's each call. The graph takes the largest
   over tokens: one bound ``eps`` per row;
3. rescore: the ``SCREEN_CANDIDATES`` tokens with the highest ``A`` get their exact fp32
   logits, from the embedding rows themselves (a gather and a small matmul);
4. certify: when the best exact candidate is above every other token's upper bound (the
   next-highest ``A`` plus ``eps``), it is the exact argmax. The step returns ``A`` with the
   candidates' exact logits written in; when any row is not certified, or the ``exact_logits``
   input asks for it, the whole batch's logits are computed exactly (``E @ h``, which reads
   the embedding rows as stored, so no transposed copy of the table is kept for it).

So greedy decoding picks exactly the fp32 graph's token; the other logits are int8-accurate,
which moves the chosen token's log-probability by the screen's error in the normalizer only.
The engine asks for exact logits whenever a row samples, searches beams or penalizes
repetition. The fp32 table is read by the lookup, the rescoring and the exact path, so the
int8 copy is the only weight added, and the step no longer keeps the packed transposed fp32
head (119 MB for opus-mt) that ``MatMul(h, Transpose(E))`` made.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from seq2serve import contract
from seq2serve.export.quantize import SATURATION_FREE_WEIGHT

# Exactly rescored tokens a row: the certificate needs the best of them above the bound of
# the rest. A first token is the hard case: its logits can be nearly flat at the top (the
# opus-mt-sized random-weight Marian: 0.43 between the best and the 17th). Of 60 first
# tokens there, 16 candidates certified 26, 32 certified 57 and 64 all 60; an uncertified
# row costs its whole call the exact head (a batch-1 first token: 12.9 ms against 6.0 ms
# certified, and a joining batch waits on its least certain row). Later steps certified
# with 16 already. 64 cost no measurable time at batch 1; the TopK over a batch of 16 rows
# takes 0.72 ms against 0.50 ms.
SCREEN_CANDIDATES = 64
# Margin on the bound for float rounding: the int8 dot products are exact in int32 (the
# weights stay within SATURATION_FREE_WEIGHT: a saturating kernel would break the bound), and the
# scaling and the fp32 rescoring round at about 1e-6 of a logit, so an absolute 1e-3 covers
# logits into the hundreds (those measured are below 30).
RELATIVE_MARGIN = 1e-3
ABSOLUTE_MARGIN = 1e-3

# Screen a head only when reading it is a real part of a step: below this many fp32 bytes
# (the default bundle's head is 0.8 MB) it sits in the cache, and the screen's extra nodes
# would cost more than they save.
SCREEN_MIN_BYTES = 16 << 20

PREFIX = "screen."


def wants_screen(vocab_size: int, d_model: int) -> bool:
    """Whether an fp32 step graph's head of this size is screened by default."""
    return 4 * vocab_size * d_model >= SCREEN_MIN_BYTES


def is_screened(step: onnx.ModelProto) -> bool:
    return any(i.name == contract.EXACT_LOGITS for i in step.graph.input)


def _const(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(value, PREFIX + name)


def _find(graph: onnx.GraphProto, name: str) -> TensorProto:
    return next(i for i in graph.initializer if i.name == name)


def _table_of(graph: onnx.GraphProto, table: np.ndarray) -> str:
    """The name of the initializer the graph gathers rows from that holds ``table`` (V, C),
    added when none does."""
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    for init in graph.initializer:
        same_shape = init.name in gathered and tuple(init.dims) == table.shape
        if same_shape and np.array_equal(numpy_helper.to_array(init), table):
            return init.name
    name = PREFIX + "table"
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table), name))
    return name


def screen_head(step: onnx.ModelProto, candidates: int = SCREEN_CANDIDATES) -> None:
    """Rewrite ``step``'s tied LM head (``MatMul(h, Transpose(E))`` plus the optional
    ``final_logits_bias``) in place as above, adding the ``exact_logits`` input."""
    graph = step.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = list(graph.node)
    producer = {o: n for n in nodes for o in n.output}
    (logits_out,) = [o for o in graph.output if o.name == "logits"]
    last = producer[logits_out.name]
    bias: str | None = None
    if last.op_type == "Add" and last.input[1] in inits:
        bias, head = last.input[1], producer[last.input[0]]
        removed = [last, head]
    else:
        head, removed = last, [last]
    if head.op_type != "MatMul":
        raise ValueError(f"the logits come from {head.op_type}, not the tied head's MatMul")
    hidden, weight = head.input
    if sum(weight in n.input for n in nodes) != 1:
        raise ValueError("the LM head's weight feeds more than the head")
    transpose = producer.get(weight)
    if transpose is not None and transpose.op_type == "Transpose" and transpose.input[0] in inits:
        table = transpose.input[0]  # MatMul(h, Transpose(E)), as exported
        removed.append(transpose)
    elif weight in inits:  # the exporter folded the transpose of a small table: E.T stored
        table = _table_of(graph, numpy_helper.to_array(inits[weight]).T)
        graph.initializer.remove(inits[weight])
    else:
        raise ValueError("the LM head is not MatMul(h, Transpose(embedding))")

    embedding = numpy_helper.to_array(_find(graph, table)).astype(np.float32)  # (V, C)
    vocab, channels = embedding.shape
    k = min(candidates, vocab - 1)
    levels = SATURATION_FREE_WEIGHT
    scale = np.abs(embedding).max(axis=1) / levels  # (V,), 0 for an all-zero row
    rows_q = np.clip(np.rint(embedding / np.where(scale > 0, scale, 1)[:, None]), -levels, levels)
    rows_q = rows_q.astype(np.int8)
    weight_error = np.abs(embedding - rows_q * scale[:, None]).max()
    l1 = np.abs(embedding).sum(axis=1)
    p = PREFIX
    added = [
        _const("weight", np.ascontiguousarray(rows_q.T)),  # (C, V) int8
        _const("weight_scale", scale.astype(np.float32)),  # (V,)
        _const("weight_error", np.array(weight_error, np.float32)),
        _const("max_l1", np.array(l1.max(), np.float32)),
        _const("relative", np.array(1 + RELATIVE_MARGIN, np.float32)),
        _const("absolute", np.array(ABSOLUTE_MARGIN, np.float32)),
        _const("k_plus_1", np.array([k + 1], np.int64)),
        _const("zero", np.array([0], np.int64)),
        _const("k", np.array([k], np.int64)),
        _const("last", np.array([-1], np.int64)),
        _const("one", np.array([1], np.int64)),
        _const("two", np.array([2], np.int64)),
        _const("vocab", np.array([vocab], np.int64)),
        _const("no", np.array([0.0], np.float32)),
        _const("rows_by_channels", np.array([-1, channels], np.int64)),
    ]
    graph.initializer.extend(added)

    def with_bias(name: str, out: str, cand: str | None = None) -> list[onnx.NodeProto]:
        if bias is None:
            return [helper.make_node("Identity", [name], [out])]
        if cand is None:
            return [helper.make_node("Add", [name, bias], [out])]
        return [
            helper.make_node("Gather", [bias, cand], [out + ".bias"], axis=0),
            helper.make_node("Add", [name, out + ".bias"], [out]),
        ]

    f = TensorProto.FLOAT
    new = [
        # 0. the screen's rows: every row, or none when exact logits are asked for (the
        #    screen's work then costs nothing: a sampling step pays only the exact head)
        helper.make_node("Shape", [hidden], [p + "shape"]),  # (B, T, C)
        helper.make_node("Slice", [p + "shape", p + "zero", p + "one"], [p + "batch"]),
        helper.make_node("Cast", [contract.EXACT_LOGITS], [p + "exact_i"], to=TensorProto.INT64),
        helper.make_node("Mul", [p + "batch", p + "exact_i"], [p + "skipped"]),
        helper.make_node("Sub", [p + "batch", p + "skipped"], [p + "screened_rows"]),
        helper.make_node("Slice", [hidden, p + "zero", p + "screened_rows", p + "zero"], [p + "h"]),
        # 1. the screen: int8 logits A (B, T, V), T = 1
        helper.make_node("DynamicQuantizeLinear", [p + "h"], [p + "hq", p + "hs", p + "hz"]),
        helper.make_node("MatMulInteger", [p + "hq", p + "weight", p + "hz"], [p + "acc"]),
        helper.make_node("Cast", [p + "acc"], [p + "accf"], to=f),
        helper.make_node("Mul", [p + "hs", p + "weight_scale"], [p + "scales"]),
        helper.make_node("Mul", [p + "accf", p + "scales"], [p + "A0"]),
        *with_bias(p + "A0", p + "A"),
        # 2. the bound eps (B, T, 1)
        helper.make_node("DequantizeLinear", [p + "hq", p + "hs", p + "hz"], [p + "hd"]),
        helper.make_node("Abs", [p + "hd"], [p + "habs"]),
        helper.make_node("ReduceSum", [p + "habs", p + "last"], [p + "hl1"], keepdims=1),
        helper.make_node("Mul", [p + "hl1", p + "weight_error"], [p + "e1"]),
        helper.make_node("Sub", [p + "h", p + "hd"], [p + "herr"]),
        helper.make_node("Abs", [p + "herr"], [p + "herr_abs"]),
        helper.make_node("ReduceMax", [p + "herr_abs", p + "last"], [p + "hmax"], keepdims=1),
        helper.make_node("Mul", [p + "hmax", p + "max_l1"], [p + "e2"]),
        helper.make_node("Add", [p + "e1", p + "e2"], [p + "e12"]),
        helper.make_node("Mul", [p + "e12", p + "relative"], [p + "e3"]),
        helper.make_node("Add", [p + "e3", p + "absolute"], [p + "eps"]),
        # 3. the candidates and their exact logits (B, T, k)
        helper.make_node(
            "TopK", [p + "A", p + "k_plus_1"], [p + "top", p + "idx"], axis=-1, largest=1, sorted=1
        ),
        helper.make_node("Slice", [p + "idx", p + "zero", p + "k", p + "last"], [p + "cand"]),
        helper.make_node("Slice", [p + "top", p + "k", p + "k_plus_1", p + "last"], [p + "next"]),
        helper.make_node("Gather", [table, p + "cand"], [p + "rows"], axis=0),  # (B, T, k, C)
        helper.make_node("Unsqueeze", [p + "h", p + "last"], [p + "hcol"]),  # (B, T, C, 1)
        helper.make_node("MatMul", [p + "rows", p + "hcol"], [p + "ex4"]),  # (B, T, k, 1)
        helper.make_node("Squeeze", [p + "ex4", p + "last"], [p + "ex0"]),
        *with_bias(p + "ex0", p + "exact", p + "cand"),
        # 4. the certificate: every row's best candidate above the rest's upper bound
        helper.make_node("ReduceMax", [p + "exact", p + "last"], [p + "best"], keepdims=1),
        helper.make_node("Add", [p + "next", p + "eps"], [p + "upper"]),
        helper.make_node("Less", [p + "best", p + "upper"], [p + "open"]),  # (B, T, 1)
        helper.make_node("Cast", [p + "open"], [p + "openf"], to=f),
        helper.make_node("Reshape", [p + "openf", p + "last"], [p + "openv"]),
        # a 0 beside the rows' flags: the maximum of no rows (exact logits asked for) is 0
        helper.make_node("Concat", [p + "openv", p + "no"], [p + "openz"], axis=0),
        helper.make_node("ReduceMax", [p + "openz"], [p + "anyopen"], keepdims=0),
        helper.make_node("Cast", [p + "anyopen"], [p + "uncertified"], to=TensorProto.BOOL),
        helper.make_node("Or", [p + "uncertified", contract.EXACT_LOGITS], [p + "full"]),
        # Out here, not in the branch: onnxruntime's Slice elimination warns, at every session
        # start, about a Slice whose output a subgraph reads (it may not rename it there).
        helper.make_node("Equal", [p + "batch", p + "one"], [p + "single"]),
        helper.make_node(
            "If",
            [p + "full"],
            [logits_out.name],
            then_branch=helper.make_graph(
                [
                    helper.make_node("Reshape", [hidden, p + "rows_by_channels"], [p + "h2"]),
                    # The table is an outer-scope value here, so no kernel packs a copy of
                    # it: one row reads it as stored (E h) at the packed head's speed; more
                    # rows go faster as (E h^T)^T (2.5 against 3.7 ms, and 3.8 against
                    # 5.4 ms at 8 rows, opus-mt-sized).
                    helper.make_node(
                        "If",
                        [p + "single"],
                        [p + "full_bv"],
                        then_branch=helper.make_graph(
                            [helper.make_node("Gemm", [p + "h2", table], [p + "one_bv"], transB=1)],
                            "exact_head_one_row",
                            [],
                            [helper.make_tensor_value_info(p + "one_bv", f, None)],
                        ),
                        else_branch=helper.make_graph(
                            [
                                helper.make_node("Transpose", [p + "h2"], [p + "ht"], perm=[1, 0]),
                                helper.make_node("MatMul", [table, p + "ht"], [p + "rows_vb"]),
                                helper.make_node(
                                    "Transpose", [p + "rows_vb"], [p + "rows_bv"], perm=[1, 0]
                                ),
                            ],
                            "exact_head_rows",
                            [],
                            [helper.make_tensor_value_info(p + "rows_bv", f, None)],
                        ),
                    ),
                    helper.make_node("Slice", [p + "shape", p + "zero", p + "two"], [p + "bt"]),
                    helper.make_node("Concat", [p + "bt", p + "vocab"], [p + "out_shape"], axis=0),
                    helper.make_node("Reshape", [p + "full_bv", p + "out_shape"], [p + "full0"]),
                    *with_bias(p + "full0", p + "full_out"),
                ],
                "exact_head",
                [],
                [helper.make_tensor_value_info(p + "full_out", f, None)],
            ),
            else_branch=helper.make_graph(
                [
                    helper.make_node(
                        "ScatterElements",
                        [p + "A", p + "cand", p + "exact"],
                        [p + "screened"],
                        axis=-1,
                    ),
                ],
                "screened_head",
                [],
                [helper.make_tensor_value_info(p + "screened", f, None)],
            ),
        ),
    ]
    kept = [n for n in nodes if n not in removed]
    del graph.node[:]
    graph.node.extend([*kept, *new])
    graph.input.append(helper.make_tensor_value_info(contract.EXACT_LOGITS, TensorProto.BOOL, []))
