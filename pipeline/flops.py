"""Parameters and multiply-accumulates (what papers call "GFLOPs") of segmentation models, checkpoints and ONNX
graphs.

Two counts per model:
- paper: module hooks the way mmcv 1.x `get_model_complexity_info` counts (convolutions and linear layers with
  their biases, norms, ReLU, nn.Upsample); the attention matmuls are functional calls, not modules, so they are
  missed. This is the convention of the TransKD and SegFormer tables (B0 13.67, B2 113.84 at 512x1024).
- full: the paper count plus the matmuls every attention layer does functionally (Q K^T and A V, and LVT's
  fixed unfold/fold), which each attention module declares in its `attention_macs(*forward_args)`.
An ONNX file is counted from its graph instead: every Conv, ConvTranspose, MatMul and Gemm after shape inference,
without biases or norms (no paper count exists for a graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import InputError
from pipeline.models import VARIANTS, build_model, load_model
from pipeline.onnxinfo import graph_inputs, node_macs


@dataclass
class MacCount:
    """Multiply-accumulates of one forward pass at batch 1, split by where they come from."""

    params: int
    conv: int = 0  # weights of Conv2d
    conv_bias: int = 0  # one add per output element (mmcv)
    linear: int = 0  # weights of Linear
    linear_bias: int = 0  # mmcv adds out_features once per call, not per token: we keep that quirk
    norm: int = 0  # LayerNorm / BatchNorm: elements, x2 when affine
    activation: int = 0  # ReLU (mmcv counts no GELU)
    upsample: int = 0  # nn.Upsample modules: one per output element (mmcv); functional interpolation is not counted
    attention: int = 0  # functional matmuls each attention layer declares (attention_macs): Q K^T, A V, ...

    @property
    def paper(self) -> int:
        return (self.conv + self.conv_bias + self.linear + self.linear_bias + self.norm + self.activation
                + self.upsample)

    @property
    def full(self) -> int:
        return self.paper + self.attention


def count_model(model: nn.Module, size: tuple[int, int]) -> MacCount:
    """Run one batch-1 forward at `size` (H, W) with counting hooks on every leaf module."""
    count = MacCount(params=sum(p.numel() for p in model.parameters()))

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0]
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            count.conv += output.numel() * per_output
            count.conv_bias += output.numel() if module.bias is not None else 0
        elif isinstance(module, nn.Linear):
            count.linear += x.numel() * module.out_features
            count.linear_bias += module.out_features if module.bias is not None else 0
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            affine = getattr(module, "elementwise_affine", False) or getattr(module, "affine", False)
            count.norm += x.numel() * (2 if affine else 1)
        elif isinstance(module, nn.ReLU):
            count.activation += output.numel()
        elif isinstance(module, nn.Upsample):
            count.upsample += output.numel()
        if hasattr(module, "attention_macs"):  # an attention layer declares its own functional matmuls
            count.attention += module.attention_macs(*args)

    kinds = (nn.Conv2d, nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.ReLU, nn.Upsample)
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, kinds) or hasattr(m, "attention_macs")]
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, 3, *size))
    finally:
        for h in handles:
            h.remove()
    return count


def count_onnx(path: Path, size: tuple[int, int]) -> MacCount:
    """MACs of Conv, MatMul and Gemm nodes of an ONNX graph, with the image input fixed to batch 1 at `size`."""
    import onnx
    from onnx import numpy_helper, shape_inference

    try:
        model = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError and friends for a damaged file
        raise InputError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    inits = {i.name: i for i in model.graph.initializer}
    inputs = graph_inputs(model)
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4:
        raise InputError(f"{path}: expected one 4-D image input, found {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    channels_first = dims[1].HasField("dim_value") and dims[1].dim_value == 3
    shape = (1, 3, *size) if channels_first else (1, *size, 3)
    for d, v in zip(dims, shape):
        if d.HasField("dim_value") and d.dim_value != v:
            raise InputError(
                f"{path}: the graph's input is fixed to {[x.dim_value for x in dims]}; count it at that --size"
            )
        d.Clear()
        d.dim_value = v
    model = shape_inference.infer_shapes(model, data_prop=True)
    count = MacCount(params=sum(int(numpy_helper.to_array(t).size) for t in inits.values()
                                if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)))
    producer = {o: n for n in model.graph.node for o in n.output}
    for node, macs in node_macs(model, str(path)):
        if node.op_type in ("Conv", "ConvTranspose"):
            count.conv += macs
        elif _weight(node.input[1], inits, producer):  # against a weight: a linear layer; two activations: attention
            count.linear += macs
        else:
            count.attention += macs
    return count


# what lies between a weight initializer and the MatMul reading it: its Q/DQ pair, an FP16 Cast, a transpose
_WEIGHT_PATH = ("DequantizeLinear", "QuantizeLinear", "Cast", "Transpose")


def _weight(name: str, inits: dict, producer: dict) -> bool:
    """Whether `name` is an initializer, directly or through _WEIGHT_PATH ops (a quantized or FP16 weight)."""
    while name not in inits:
        node = producer.get(name)
        if node is None or node.op_type not in _WEIGHT_PATH:
            return False
        name = node.input[0]
    return True


def count(spec: str, size: tuple[int, int]) -> MacCount:
    """Count a variant name (mit_b0), a checkpoint load_model accepts, or an .onnx file."""
    if spec in VARIANTS:
        return count_model(build_model(spec), size)
    path = Path(spec)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        return count_onnx(path, size)
    if not path.exists():
        raise InputError(f"--model {spec}: not a variant ({', '.join(VARIANTS)}) nor an existing file")
    return count_model(load_model(path), size)


__all__ = ["MacCount", "count", "count_model", "count_onnx"]
