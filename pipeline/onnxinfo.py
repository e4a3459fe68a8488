"""What an ONNX file holds, read without running it: its inputs, outputs, precision, opset and metadata."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import InputError

if TYPE_CHECKING:
    import onnx

Shape = tuple[int, ...]
_SHAPE = re.compile(r"(.+):(\d+(?:x\d+)*)")  # greedy name: tensor names may contain ':' ("input:0")


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # numpy name: float32, float16, uint8, int32 ...
    shape: tuple[int | str, ...]  # a str is a dynamic dim (its ONNX dim_param, or "?")

    @property
    def dynamic(self) -> bool:
        return any(isinstance(d, str) for d in self.shape)


@dataclass(frozen=True)
class OnnxInfo:
    inputs: list[Tensor]
    outputs: list[Tensor]
    precision: str
    opset: int
    metadata: dict[str, str]


def fmt(shape: Sequence[int | str]) -> str:
    """trtexec's 1x3x512x1024; a dynamic dim shows as its name in brackets: <batch>x3x<height>x<width>."""
    return "x".join(str(d) if isinstance(d, int) else f"<{d}>" for d in shape)


def parse_shapes(text: str | None) -> dict[str, Shape]:
    """trtexec syntax: `image:1x3x512x1024` or several comma separated; None or "" -> {}."""
    shapes: dict[str, Shape] = {}
    for item in text.split(",") if text else []:
        m = _SHAPE.fullmatch(item.strip())
        if not m:
            raise InputError(f"shape {item.strip()!r}: expected name:DxDx... such as image:1x3x512x1024")
        name, dims = m[1], tuple(int(d) for d in m[2].split("x"))
        if min(dims) < 1 or name in shapes:
            raise InputError(f"shape {item.strip()!r}: " + ("dims must be >= 1" if min(dims) < 1 else "given twice"))
        shapes[name] = dims
    return shapes


def resolve_shapes(inputs: Sequence[tuple[str, Sequence[int | str | None]]], shapes: dict[str, Shape],
                   batch: int = 1, size: tuple[int, int] | None = None, where: str = "") -> dict[str, Shape]:
    """The concrete shape of every input of a graph or engine whose declared dims may be dynamic (a str, None or a
    negative int, as ONNX and TensorRT report them), the way trtexec takes them: an explicit `shapes` entry
    (`--shapes name:1x3x512x1024`) wins and must keep the input's rank and static dims; otherwise a dynamic dim 0 is
    `batch`, and in a 4-D image input (N x 3 x H x W, or N x H x W x 3) dynamic H and W are `size`. Any other dynamic
    dim, or an H x W with no `size`, is one line naming the input and how to give it."""
    where = f"{where}: " if where else ""
    names = [name for name, _ in inputs]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise InputError(f"{where}--shapes names {', '.join(map(repr, unknown))}, but the inputs are "
                         f"{', '.join(map(repr, names))}")
    resolved: dict[str, Shape] = {}
    for name, declared_dims in inputs:
        dims: list[int | None] = [None if isinstance(d, str) or d is None or d < 0 else int(d)
                                  for d in declared_dims]
        declared = "x".join(str(d) if d is not None else "?" for d in dims)
        if name in shapes:
            asked = shapes[name]
            if len(asked) != len(dims) or any(d is not None and d != a for d, a in zip(dims, asked)):
                raise InputError(f"{where}--shapes {name}:{fmt(asked)} does not fit the input's {declared}")
            resolved[name] = tuple(asked)
            continue
        hw: tuple[int, int] | tuple[()] = ()
        if len(dims) == 4:
            hw = (1, 2) if dims[3] == 3 and dims[1] != 3 else (2, 3)
        out: list[int] = []
        for i, d in enumerate(dims):
            if d is not None:
                out.append(d)
            elif i == 0:
                out.append(batch)
            elif i in hw and size is not None:
                out.append(size[hw.index(i)])
            else:
                need = "--size HxW" if i in hw else f"--shapes {name}:" + "x".join(
                    str(x) if x is not None else "N" for x in dims)
                raise InputError(f"{where}input {name!r} ({declared}) has a dynamic dim {i}: give {need}")
        resolved[name] = tuple(out)
    return resolved


def random_array(dtype: np.dtype, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Random data of one numpy dtype, for timing a network that is not ours (ONNX in pipeline/timing.py, engines in
    trt/engine.py):
    floats ~ N(0, 1), bool half true, uint8 over 0..255 and int8 over -128..127 (image bytes), other integers in
    0..3 (indices into small tables and counts stay in range)."""
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    lo, hi = {"uint8": (0, 256), "int8": (-128, 128)}.get(dtype.name, (0, 4))
    return rng.integers(lo, hi, shape).astype(dtype)


def onnx_precision(model: onnx.ModelProto) -> str:
    """"int8" for a Q/DQ graph, "fp16" when any tensor is float16 (weights, casts, I/O), else "fp32"."""
    from onnx import TensorProto

    g, f16 = model.graph, TensorProto.FLOAT16
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node):
        return "int8"
    typed = [*g.input, *g.output, *g.value_info]
    if (any(t.data_type == f16 for t in g.initializer) or any(v.type.tensor_type.elem_type == f16 for v in typed)
            or any(a.name == "to" and a.i == f16 for n in g.node if n.op_type == "Cast" for a in n.attribute)
            or any(a.t.data_type == f16 for n in g.node if n.op_type == "Constant" for a in n.attribute)):
        return "fp16"
    return "fp32"


def tensor_of(v: onnx.ValueInfoProto) -> Tensor:
    from onnx import helper

    t = v.type.tensor_type
    try:
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name
    except (KeyError, TypeError):  # a type numpy has no name for: keep ONNX's own
        dtype = helper.tensor_dtype_to_string(t.elem_type)
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
    return Tensor(v.name, dtype, dims)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds: old exporters also list the initializers (weights) among the graph inputs."""
    weights = {i.name for i in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in weights]


def node_macs(model: onnx.ModelProto, where: str = "graph") -> list[tuple[onnx.NodeProto, int]]:
    """(node, MACs at the graph's input shapes) for every Conv, ConvTranspose, MatMul and Gemm of `model`, which must
    carry inferred shapes (onnx.shape_inference.infer_shapes on static inputs); biases are not counted."""
    from onnx import numpy_helper

    g = model.graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
              for v in [*g.value_info, *g.output, *g.input]}
    shapes.update({t.name: list(numpy_helper.to_array(t).shape) for t in g.initializer})

    def known(name: str, node: onnx.NodeProto) -> list[int]:
        s = shapes.get(name)
        if not s or any(v <= 0 for v in s):
            raise InputError(f"{where}: cannot count {node.op_type} {node.name!r}: shape of {name!r} is unknown")
        return s

    out = []
    for node in g.node:
        if node.op_type == "Conv":  # every output element meets C_in / groups x kH x kW weights
            macs = _prod(known(node.output[0], node)) * _prod(known(node.input[1], node)[1:])
        elif node.op_type == "ConvTranspose":  # every input element meets C_out / groups x kH x kW weights
            macs = _prod(known(node.input[0], node)) * _prod(known(node.input[1], node)[1:])
        elif node.op_type in ("MatMul", "Gemm"):
            a = known(node.input[0], node)
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            macs = _prod(known(node.output[0], node)) * (a[-2] if trans_a else a[-1])
        else:
            continue
        out.append((node, macs))
    return out


def _prod(xs: Sequence[int]) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def inspect_onnx(path: str | os.PathLike) -> OnnxInfo:
    """Inputs, outputs, precision and metadata of an ONNX file; external weights are not loaded."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, or onnx's own errors: say which file, in one line
        raise InputError(f"{path}: not an ONNX model ({(str(e) or type(e).__name__).splitlines()[0]})") from None
    # protobuf decodes some arbitrary bytes without complaint: a real model has an IR version and nodes
    if model.ir_version == 0 or not model.graph.node:
        raise InputError(f"{path}: not an ONNX model (no IR version or no graph nodes)")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return OnnxInfo([tensor_of(v) for v in graph_inputs(model)],
                    [tensor_of(v) for v in model.graph.output], onnx_precision(model), opset,
                    {p.key: p.value for p in model.metadata_props})


__all__ = ["OnnxInfo", "Shape", "Tensor", "fmt", "graph_inputs", "inspect_onnx", "node_macs", "onnx_precision",
           "parse_shapes", "random_array", "resolve_shapes", "tensor_of"]
