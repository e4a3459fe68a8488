"""A static census of a Q/DQ ONNX graph: its Q/DQ pairs, those that feed no INT8 compute, INT8 MAC coverage, Casts."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline.errors import InputError
from pipeline.onnxinfo import graph_inputs, node_macs, resolve_shapes, tensor_of

if TYPE_CHECKING:
    import onnx

# What TensorRT runs in INT8 when its data input (0) and its weight or second operand (1) both come through
# DequantizeLinear; input 2 of Conv / Gemm is the bias, which stays float.
INT8_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Ops that move, split, join or retype a tensor without arithmetic: TensorRT propagates Q/DQ across them
# (explicit-quantization guide, "Q/DQ propagation"), so a DQ reaches an INT8 layer through them. Concat joins all its
# inputs; every other one moves its input 0 (the rest are shapes, indices or axes).
MOVES = frozenset({"Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Split",
                   "Concat"})
# The ops an FP16 / INT8 graph keeps in FP32: Casts at their borders are the glue counted in `casts_around`.
FP32_ISLANDS = ("Softmax", "LayerNormalization")


def load(model_or_path: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """An ONNX model as given, or read from a file (one line naming the file when it cannot be read)."""
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    path = os.fspath(model_or_path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(path)
    except Exception as e:  # protobuf's DecodeError and onnx's own errors
        raise InputError(f"{path}: not a readable ONNX model ({(str(e) or type(e).__name__).splitlines()[0]})") \
            from None
    if model.ir_version == 0 or not model.graph.node:  # protobuf decodes some arbitrary bytes without complaint
        raise InputError(f"{path}: not an ONNX model (no IR version or no graph nodes)")
    return model


class _Graph:
    """Producers, consumers, constant tensors and inferred element types and shapes of one graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for n in g.node:
            for i, name in enumerate(n.input):
                self.consumers[name].append((n, i))
        self.outputs = {o.name for o in g.output}
        # constant: an initializer, a Constant, or computed from constants only (nodes are in topological order)
        self.const = {t.name for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" or (n.input and all(i in self.const for i in n.input if i)):
                self.const.update(n.output)
        self.types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
        self.types.update({t.name: t.data_type for t in g.initializer})
        # inferred shapes, None where a dim is unknown
        self.shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                       for v in [*g.value_info, *g.input, *g.output] if v.type.tensor_type.HasField("shape")}
        self.shapes.update({t.name: list(t.dims) for t in g.initializer})
        self._dq: dict[str, bool] = {}

    def quantized(self, tensor: str) -> bool:
        """Whether `tensor` is a DequantizeLinear output, directly or through MOVES (all inputs of a Concat)."""
        if tensor not in self._dq:
            src = self.producer.get(tensor)
            if src is None:
                self._dq[tensor] = False
            elif src.op_type == "DequantizeLinear":
                self._dq[tensor] = True
            else:
                data = list(src.input) if src.op_type == "Concat" else list(src.input[:1])
                self._dq[tensor] = src.op_type in MOVES and all(self.quantized(t) for t in data)
        return self._dq[tensor]

    def reaches(self, tensor: str) -> tuple[set[str], bool]:
        """The op types that read `tensor` beyond MOVES ("graph output" for an output), and whether one of them is
        an INT8_OPS node reading it as its data or weight operand."""
        feeds, int8, todo, seen = set(), False, [tensor], set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in self.outputs:
                feeds.add("graph output")
            for node, index in self.consumers.get(t, []):
                if node.op_type in MOVES and (node.op_type == "Concat" or index == 0):
                    todo.extend(node.output)
                    continue
                feeds.add(node.op_type)
                int8 |= node.op_type in INT8_OPS and index < 2
        return feeds, int8


def census(model_or_path: onnx.ModelProto | str | os.PathLike, size: tuple[int, int] | None = None) -> dict:
    """Count what decides whether a Q/DQ graph runs fast in INT8, read without running it. Dynamic input dims are
    fixed as onnxinfo.resolve_shapes does (batch 1, H x W = `size`), then shapes are inferred.

    - A pair is one DequantizeLinear (DQ) with what it dequantizes. A weight pair dequantizes a constant: a
      QuantizeLinear (Q) of an initializer or constant subgraph, or an INT8 initializer read by DQ directly (a folded
      Q); it is per channel when its scale has more than one element. An activation pair is a DQ reading a Q of a
      computed tensor. A DQ of anything else is `other_dq`.
    - Dangling: an activation pair whose DQ output, followed through MOVES (data movement and Cast), is read by no
      INT8_OPS node as its input 0 or 1: it only rounds a tensor that float layers read (a residual Add, a Resize,
      a graph output). Each is listed with the op types it feeds.
    - INT8 MAC coverage: the MACs (node_macs) of the INT8_OPS nodes whose inputs 0 and 1 both come from a DQ through
      MOVES, over the MACs of all of them; every other one is listed in `float_compute`.
    - cast_pairs: Casts whose input another Cast makes; cast_roundtrips: those that cast back to the first Cast's
      source type (FP32 -> FP16 -> FP32); casts_around: Casts reading from or writing to each FP32_ISLANDS op."""
    import onnx
    from onnx import shape_inference

    where = "graph" if isinstance(model_or_path, onnx.ModelProto) else os.fspath(model_or_path)
    model = shape_inference.infer_shapes(_static(load(model_or_path), size, where), data_prop=True)
    g = _Graph(model)
    ops = Counter(n.op_type for n in model.graph.node)
    weight, activation, other = _pairs(model, g)
    per_channel = sum(any((d or 1) > 1 for d in g.shapes.get(dq.input[1], [])) for dq in weight)
    dangling = []
    for dq in activation:
        feeds, int8 = g.reaches(dq.output[0])
        if not int8:
            q = g.producer[dq.input[0]]
            dangling.append({"node": dq.name or dq.output[0], "tensor": q.input[0], "feeds": sorted(feeds)})
    return {"nodes": len(model.graph.node), "weight_pairs": len(weight), "per_channel_weight_pairs": per_channel,
            "activation_pairs": len(activation), "other_dq": other, "dangling_pairs": len(dangling),
            "casts": ops["Cast"], "transposes": ops["Transpose"], "reshapes": ops["Reshape"],
            **_coverage(model, g, where), **_casts(model, g), "dangling": dangling, "ops": dict(sorted(ops.items()))}


def _static(model: onnx.ModelProto, size: tuple[int, int] | None, where: str) -> onnx.ModelProto:
    """`model`, or a copy whose dynamic input dims are fixed (shape inference needs them for the MACs)."""
    import onnx

    dynamic = [tensor_of(v) for v in graph_inputs(model) if tensor_of(v).dynamic]
    if not dynamic:
        return model
    fixed = resolve_shapes([(t.name, t.shape) for t in dynamic], {}, 1, size, where)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for v in graph_inputs(model):
        for d, value in zip(v.type.tensor_type.shape.dim, fixed.get(v.name, ())):
            d.Clear()
            d.dim_value = value
    return model


def _pairs(model: onnx.ModelProto, g: _Graph) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto], int]:
    """(the DQ nodes of weight pairs, those of activation pairs, the number of other DQs), as census defines them."""
    weight, activation, other = [], [], 0
    for dq in model.graph.node:
        if dq.op_type != "DequantizeLinear":
            continue
        src = g.producer.get(dq.input[0])
        if src is not None and src.op_type == "QuantizeLinear":
            if src.input[0] in g.const:
                weight.append(dq)
            else:
                activation.append(dq)
        elif dq.input[0] in g.const:
            weight.append(dq)
        else:
            other += 1
    return weight, activation, other


def _coverage(model: onnx.ModelProto, g: _Graph, where: str) -> dict:
    total = int8 = 0
    floats = []
    for node, macs in node_macs(model, where):
        total += macs
        through = [g.quantized(node.input[0]), g.quantized(node.input[1])]
        if all(through):
            int8 += macs
        else:
            floats.append({"node": node.name, "op": node.op_type, "macs": macs, "through_dq": through})
    return {"macs": total, "int8_macs": int8, "int8_mac_coverage": int8 / total if total else 0.0,
            "float_compute": floats}


def _casts(model: onnx.ModelProto, g: _Graph) -> dict:
    pairs = roundtrips = 0
    around = dict.fromkeys(FP32_ISLANDS, 0)
    for cast in model.graph.node:
        if cast.op_type != "Cast":
            continue
        src = g.producer.get(cast.input[0])
        if src is not None and src.op_type == "Cast":
            pairs += 1
            to = next(a.i for a in cast.attribute if a.name == "to")
            roundtrips += to == g.types.get(src.input[0])
        neighbours = {src.op_type if src is not None else ""} | {n.op_type for n, _ in g.consumers[cast.output[0]]}
        for op in FP32_ISLANDS:
            around[op] += op in neighbours
    return {"cast_pairs": pairs, "cast_roundtrips": roundtrips, "casts_around": around}


# The rows of `table`: a label and how to read it from a census
ROWS = (
    ("nodes", lambda c: c["nodes"]),
    ("weight Q/DQ pairs", lambda c: c["weight_pairs"]),
    ("of which per channel", lambda c: c["per_channel_weight_pairs"]),
    ("activation Q/DQ pairs", lambda c: c["activation_pairs"]),
    ("dangling activation pairs (feed no INT8 op)", lambda c: c["dangling_pairs"]),
    ("INT8 MAC coverage", lambda c: f"{100 * c['int8_mac_coverage']:.1f} %"),
    ("GMACs (Conv, MatMul, Gemm)", lambda c: f"{c['macs'] / 1e9:.3f}"),
    ("float Conv/MatMul/Gemm nodes", lambda c: len(c["float_compute"])),
    ("Cast", lambda c: c["casts"]),
    ("Cast -> Cast", lambda c: c["cast_pairs"]),
    ("Cast round trips (A -> B -> A)", lambda c: c["cast_roundtrips"]),
    *((f"Casts next to {op}", lambda c, op=op: c["casts_around"][op]) for op in FP32_ISLANDS),
    ("Transpose", lambda c: c["transposes"]),
    ("Reshape", lambda c: c["reshapes"]),
)


def table(*censuses: dict, names: Sequence[str] = ("before", "after")) -> str:
    """A markdown table of `census` results side by side, one column each, named by `names`."""
    if len(names) != len(censuses):
        raise ValueError(f"table: {len(censuses)} censuses but {len(names)} names")
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(str(get(c)) for c in censuses) + " |" for label, get in ROWS]
    return "\n".join(lines)


__all__ = ["FP32_ISLANDS", "INT8_OPS", "MOVES", "census", "load", "table"]
