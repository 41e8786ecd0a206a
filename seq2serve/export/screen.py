"""The step graphs' LM heads, screened in fewer bits and rescored exactly.

The fp32 step graph's head is screened in int8 (``screen_head``) and the int8 step graph's
in 4 bits at batch 1, when an export asks for it (``screen_int8_head``), by the same four
steps.

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
from seq2serve.export.quantize import EMBED_INT8, EMBED_SCALE, SATURATION_FREE_WEIGHT

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


def _shared_constants(k: int) -> list[TensorProto]:
    """The constants both screens' nodes read (``k``: candidates a row)."""
    return [
        _const("relative", np.array(1 + RELATIVE_MARGIN, np.float32)),
        _const("absolute", np.array(ABSOLUTE_MARGIN, np.float32)),
        _const("k_plus_1", np.array([k + 1], np.int64)),
        _const("zero", np.array([0], np.int64)),
        _const("k", np.array([k], np.int64)),
        _const("last", np.array([-1], np.int64)),
        _const("one", np.array([1], np.int64)),
        _const("no", np.array([0.0], np.float32)),
    ]


def _with_bias(bias: str | None, name: str, out: str, cand: str | None) -> list[onnx.NodeProto]:
    """``out`` = ``name`` plus the head's bias (``cand``: at those tokens only)."""
    if bias is None:
        return [helper.make_node("Identity", [name], [out])]
    if cand is None:
        return [helper.make_node("Add", [name, bias], [out])]
    return [
        helper.make_node("Gather", [bias, cand], [out + ".bias"], axis=0),
        helper.make_node("Add", [name, out + ".bias"], [out]),
    ]


def _candidates() -> list[onnx.NodeProto]:
    """The screen's logits ``A`` (B, T, V) -> ``cand``, the k best tokens a row (B, T, k),
    and ``next``, the (k+1)-th best screened logit (B, T, 1)."""
    p = PREFIX
    return [
        helper.make_node(
            "TopK", [p + "A", p + "k_plus_1"], [p + "top", p + "idx"], axis=-1, largest=1, sorted=1
        ),
        helper.make_node("Slice", [p + "idx", p + "zero", p + "k", p + "last"], [p + "cand"]),
        helper.make_node("Slice", [p + "top", p + "k", p + "k_plus_1", p + "last"], [p + "next"]),
    ]


def _certificate() -> list[onnx.NodeProto]:
    """``exact`` (the candidates' exact logits), ``next`` and the bound ``eps`` ->
    ``uncertified``, a bool scalar: some row's best candidate is not above every other
    token's upper bound. False when the screen had no rows."""
    p = PREFIX
    return [
        helper.make_node("ReduceMax", [p + "exact", p + "last"], [p + "best"], keepdims=1),
        helper.make_node("Add", [p + "next", p + "eps"], [p + "upper"]),
        helper.make_node("Less", [p + "best", p + "upper"], [p + "open"]),  # (B, T, 1)
        helper.make_node("Cast", [p + "open"], [p + "openf"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", [p + "openf", p + "last"], [p + "openv"]),
        # a 0 beside the rows' flags: the maximum of no rows is 0
        helper.make_node("Concat", [p + "openv", p + "no"], [p + "openz"], axis=0),
        helper.make_node("ReduceMax", [p + "openz"], [p + "anyopen"], keepdims=0),
        helper.make_node("Cast", [p + "anyopen"], [p + "uncertified"], to=TensorProto.BOOL),
    ]


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
        *_shared_constants(k),
        _const("two", np.array([2], np.int64)),
        _const("vocab", np.array([vocab], np.int64)),
        _const("rows_by_channels", np.array([-1, channels], np.int64)),
    ]
    graph.initializer.extend(added)

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
        *_with_bias(bias, p + "A0", p + "A", None),
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
        *_candidates(),
        helper.make_node("Gather", [table, p + "cand"], [p + "rows"], axis=0),  # (B, T, k, C)
        helper.make_node("Unsqueeze", [p + "h", p + "last"], [p + "hcol"]),  # (B, T, C, 1)
        helper.make_node("MatMul", [p + "rows", p + "hcol"], [p + "ex4"]),  # (B, T, k, 1)
        helper.make_node("Squeeze", [p + "ex4", p + "last"], [p + "ex0"]),
        *_with_bias(bias, p + "ex0", p + "exact", p + "cand"),
        # 4. the certificate: every row's best candidate above the rest's upper bound
        *_certificate(),
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
                    *_with_bias(bias, p + "full0", p + "full_out", None),
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


# The int8 step graph's screen: its head in 4 bits, symmetric, in blocks along d_model
# (onnxruntime's MatMulNBits, which quantizes the hidden state to int8 per block: accuracy
# level 4). It reads half the int8 head's bytes, but its kernel is for single rows. Measured
# opus-mt-sized (58,101 x 512) on a 2-core Xeon, 2 threads: MatMulNBits alone 390 against
# the int8 head's 881 us at one row, 4.2 against 1.25 ms at 16 rows. Whole steps, one
# session alternating exact_logits false / true: 0.84-0.93 of the int8 head's time at one
# row, 0.99-1.03 at two. So it runs at one row; more multiply by the int8 head.
INT4_SCREEN_MAX_ROWS = 1
# Block lengths MatMulNBits takes, longest first: the longest that divides d_model (fewer
# scales to read; at 512 x 58,101 blocks of 128 ran at 390 us, of 32 at 563).
INT4_BLOCKS = (128, 64, 32, 16)
INT4_LEVELS = 7  # codes 1..15 around the kernel's default zero point, 8
# The kernel's int8 activations: per block, scale max|h_block| / 127, so a value moves by
# at most half that; the bound takes a whole step, max|h| / 127, which holds for any
# rounding of that grid.
ACTIVATION_LEVELS = 127


def int8_screen_fits(d_model: int) -> bool:
    """Whether an int8 head over ``d_model`` channels can be screened in 4 bits: a block
    length divides it. The int8 screen is asked for (``export --screen-head on``), never
    chosen by default: it costs memory (the 4-bit head, 16 MB for opus-mt) and a copy of
    the logits at every step of more than one row (``screen_int8_head``)."""
    return _int4_block(d_model) is not None


def _int4_block(channels: int) -> int | None:
    return next((b for b in INT4_BLOCKS if channels % b == 0), None)


def int4_blocks(rows: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' B (V, C / block, block / 2) uint8 and scales (V * C / block,) float32
    for ``rows`` (V, C), 4-bit symmetric in blocks of ``block`` along C; and the values the
    kernel multiplies by (V, C) float64."""
    vocab, channels = rows.shape
    blocks = rows.reshape(vocab, channels // block, block)
    scale = (np.abs(blocks).max(axis=2) / INT4_LEVELS).astype(np.float32)
    safe = np.where(scale > 0, scale, 1).astype(np.float64)
    codes = np.clip(np.rint(blocks / safe[..., None]), -INT4_LEVELS, INT4_LEVELS)
    values = codes * scale.astype(np.float64)[..., None]
    nibbles = (codes + 8).astype(np.uint8)
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # two a byte, the first low
    return packed, scale.reshape(-1), values.reshape(vocab, channels)


def _descendants(nodes: list[onnx.NodeProto], start: onnx.NodeProto) -> list[onnx.NodeProto]:
    """``start`` and every node that reads what it computes, in graph order."""
    produced = set(start.output)
    found = [start]
    for node in nodes[nodes.index(start) + 1 :]:
        if produced.intersection(node.input):
            found.append(node)
            produced.update(node.output)
    return found


def screen_int8_head(step: onnx.ModelProto, candidates: int = SCREEN_CANDIDATES) -> None:
    """Rewrite the int8 ``step``'s LM head (``DynamicQuantizeLinear`` + ``MatMulInteger``
    over ``Transpose`` of the tied int8 table, ``seq2serve.export.quantize``) in place,
    adding the ``exact_logits`` input. With at most ``INT4_SCREEN_MAX_ROWS`` rows and exact
    logits not asked for:

    1. screen: ``A = h @ W4 + bias``, ``W4`` the int8 head's values in 4 bits (the table
       dequantized, then quantized in blocks: ``int4_blocks``);
    2. bound, against the int8 head's logits ``T_j = sum_c d_c w_jc`` (``d``: ``h``
       dequantized as the head's ``DynamicQuantizeLinear`` quantizes it, ``w``: the int8
       values): with ``a`` the kernel's int8 ``h``,
       ``|A_j - T_j| <= ||a||_1 * max|w4 - w| + max|a - d| * max_j ||w_j||_1``, where
       ``||a||_1 <= ||h||_1 + C * max|h| / 127`` and
       ``max|a - d| <= max|h| / 127 + max|h - d|``;
    3. rescore: the candidates' int8 logits as the head computes them (the same quantized
       ``h`` times the gathered int8 rows, scaled per token);
    4. certify, as the fp32 screen does. A batch with an uncertified row, more rows, or
       exact logits asked for runs the int8 head on every row, so its logits are the
       unscreened graph's.

    The int8 head stays in the main graph, over a slice of the rows that is empty when the
    screen certified, and the logits are the concatenation of its rows and the screen's.
    That concatenation copies a batch's logits at every step (0.16 ms at 16 rows of 58,101
    on the 2-core Xeon). The other ways measured cost more: the head in a branch of an
    ``If`` reading the table from the outer scope, where its weight is not packed for the
    kernel (1.3 against 0.9 ms at one row, 1.4 against 1.26 at 16); with a weight of the
    branch's own, which onnxruntime keeps resident beside the packed copy (30 MB more); or
    an ``If`` choosing between the two results, which copies as the concatenation does.
    """
    graph = step.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = list(graph.node)
    producer = {o: n for n in nodes for o in n.output}
    (head,) = [
        n
        for n in nodes
        if n.op_type == "MatMulInteger"
        and n.input[1] in producer
        and producer[n.input[1]].op_type == "Transpose"
        and producer[n.input[1]].input[0] == EMBED_INT8
    ]
    quantizer = producer[head.input[0]]
    if quantizer.op_type != "DynamicQuantizeLinear":
        raise ValueError(f"the int8 head's input comes from {quantizer.op_type}")
    hidden = quantizer.input[0]
    chain = _descendants(nodes, quantizer)
    last = producer["logits"]
    if last not in chain:
        raise ValueError("the logits do not come from the int8 head")
    bias: str | None = None
    if last.op_type == "Add" and last.input[1] in inits:
        bias = last.input[1]

    table = numpy_helper.to_array(inits[EMBED_INT8]).astype(np.float64)  # (V, C) codes
    scale = numpy_helper.to_array(inits[EMBED_SCALE]).astype(np.float64)  # (V,)
    weights = table * scale[:, None]  # the int8 head's values
    vocab, channels = weights.shape
    block = _int4_block(channels)
    if block is None:
        raise ValueError(f"no 4-bit block length {INT4_BLOCKS} divides d_model {channels}")
    packed, block_scale, values = int4_blocks(weights, block)
    k = min(candidates, vocab - 1)
    p = PREFIX
    graph.initializer.extend(
        [
            _const("weight", packed),
            _const("weight_scale", block_scale),
            _const("weight_error", np.array(np.abs(values - weights).max(), np.float32)),
            _const("max_l1", np.array(np.abs(weights).sum(axis=1).max(), np.float32)),
            _const("activation_step", np.array(1 / ACTIVATION_LEVELS, np.float32)),
            _const("channels", np.array(channels, np.float32)),
            _const("max_rows", np.array([INT4_SCREEN_MAX_ROWS], np.int64)),
            _const("to_end", np.array([np.iinfo(np.int64).max], np.int64)),
            _const("row_axis", np.array([-2], np.int64)),
            *_shared_constants(k),
        ]
    )

    i64 = TensorProto.INT64
    screen = [
        # 0. the screen's rows: all of a batch of at most INT4_SCREEN_MAX_ROWS, else none
        helper.make_node("Shape", [hidden], [p + "shape"]),  # (B, T, C)
        helper.make_node("Slice", [p + "shape", p + "zero", p + "one"], [p + "batch"]),
        helper.make_node("LessOrEqual", [p + "batch", p + "max_rows"], [p + "few"]),
        helper.make_node("Not", [contract.EXACT_LOGITS], [p + "inexact"]),
        helper.make_node("And", [p + "few", p + "inexact"], [p + "screening"]),
        helper.make_node("Cast", [p + "screening"], [p + "screening_i"], to=i64),
        helper.make_node("Mul", [p + "batch", p + "screening_i"], [p + "screened_rows"]),
        helper.make_node("Slice", [hidden, p + "zero", p + "screened_rows", p + "zero"], [p + "h"]),
        # 1. the screen: 4-bit logits A (B, T, V), T = 1
        helper.make_node(
            "MatMulNBits",
            [p + "h", p + "weight", p + "weight_scale"],
            [p + "A0"],
            domain="com.microsoft",
            K=channels,
            N=vocab,
            bits=4,
            block_size=block,
            accuracy_level=4,
        ),
        *_with_bias(bias, p + "A0", p + "A", None),
        # 2. the bound eps (B, T, 1)
        helper.make_node("DynamicQuantizeLinear", [p + "h"], [p + "hq", p + "hs", p + "hz"]),
        helper.make_node("DequantizeLinear", [p + "hq", p + "hs", p + "hz"], [p + "hd"]),
        helper.make_node("Sub", [p + "h", p + "hd"], [p + "herr"]),
        helper.make_node("Abs", [p + "herr"], [p + "herr_abs"]),
        helper.make_node("ReduceMax", [p + "herr_abs", p + "last"], [p + "int8_err"], keepdims=1),
        helper.make_node("Abs", [p + "h"], [p + "habs"]),
        helper.make_node("ReduceSum", [p + "habs", p + "last"], [p + "hl1"], keepdims=1),
        helper.make_node("ReduceMax", [p + "habs", p + "last"], [p + "hmax"], keepdims=1),
        helper.make_node("Mul", [p + "hmax", p + "activation_step"], [p + "int4_err"]),
        helper.make_node("Mul", [p + "int4_err", p + "channels"], [p + "spread"]),
        helper.make_node("Add", [p + "hl1", p + "spread"], [p + "al1"]),
        helper.make_node("Mul", [p + "al1", p + "weight_error"], [p + "e1"]),
        helper.make_node("Add", [p + "int4_err", p + "int8_err"], [p + "aerr"]),
        helper.make_node("Mul", [p + "aerr", p + "max_l1"], [p + "e2"]),
        helper.make_node("Add", [p + "e1", p + "e2"], [p + "e12"]),
        helper.make_node("Mul", [p + "e12", p + "relative"], [p + "e3"]),
        helper.make_node("Add", [p + "e3", p + "absolute"], [p + "eps"]),
        # 3. the candidates and their int8 logits (B, T, k)
        *_candidates(),
        helper.make_node("Gather", [EMBED_INT8, p + "cand"], [p + "rows"], axis=0),  # (B,T,k,C)
        helper.make_node("Transpose", [p + "rows"], [p + "rows_t"], perm=[0, 1, 3, 2]),
        helper.make_node("Unsqueeze", [p + "hq", p + "row_axis"], [p + "hq_row"]),  # (B,T,1,C)
        helper.make_node("MatMulInteger", [p + "hq_row", p + "rows_t", p + "hz"], [p + "acc4"]),
        helper.make_node("Squeeze", [p + "acc4", p + "row_axis"], [p + "acc"]),  # (B, T, k)
        helper.make_node("Cast", [p + "acc"], [p + "accf"], to=TensorProto.FLOAT),
        helper.make_node("Gather", [EMBED_SCALE, p + "cand"], [p + "cand_scale"], axis=0),
        helper.make_node("Mul", [p + "hs", p + "cand_scale"], [p + "scales"]),
        helper.make_node("Mul", [p + "accf", p + "scales"], [p + "ex0"]),
        *_with_bias(bias, p + "ex0", p + "exact", p + "cand"),
        # 4. the certificate; the int8 head's rows: all of them, or none
        *_certificate(),
        helper.make_node("Not", [p + "screening"], [p + "unscreened"]),
        helper.make_node("Or", [p + "uncertified", p + "unscreened"], [p + "full"]),
        helper.make_node("Cast", [p + "full"], [p + "full_i"], to=i64),
        helper.make_node("Mul", [p + "batch", p + "full_i"], [p + "full_rows"]),
        helper.make_node(
            "Slice", [hidden, p + "zero", p + "full_rows", p + "zero"], [p + "h_full"]
        ),
    ]
    quantizer.input[0] = p + "h_full"
    last.output[0] = p + "full_logits"
    merge = [
        helper.make_node(
            "ScatterElements", [p + "A", p + "cand", p + "exact"], [p + "screened"], axis=-1
        ),
        # the screened rows when the int8 head ran on none, else none of them
        helper.make_node(
            "Slice", [p + "screened", p + "full_rows", p + "to_end", p + "zero"], [p + "kept"]
        ),
        helper.make_node("Concat", [p + "full_logits", p + "kept"], ["logits"], axis=0),
    ]
    rest = [n for n in nodes if n not in chain]
    del graph.node[:]
    graph.node.extend([*rest, *screen, *chain, *merge])
    graph.input.append(helper.make_tensor_value_info(contract.EXACT_LOGITS, TensorProto.BOOL, []))
