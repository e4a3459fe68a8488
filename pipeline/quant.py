"""INT8 fake quantization of the deploy student, in PyTorch: the one Q/DQ placement (PLACEMENT) that post-training
quantization, sensitivity-driven mixed precision and quantization-aware distillation (QAD) share, exported to ONNX
as QuantizeLinear / DequantizeLinear pairs by the same tracer as the FP32 graph.

Weights are quantized per output channel from their current values (so they follow training), activations per
tensor with a range calibrated on real frames (max, or TensorRT's entropy threshold) that QAD may go on learning
(LSQ gradient). Both are symmetric INT8 with zero point 0, as TensorRT's explicit quantization requires."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ExportError
from pipeline.models.mit import EfficientSelfAttention
from pipeline.models.segformer import SegFormer, deploy_copy

QMIN, QMAX = -128, 127  # ONNX INT8; symmetric scales are amax / 127, so a weight never reaches -128
_EPS = 1e-8
ENTROPY_BINS = 2048

# Where Q/DQ goes (one row per op pattern): the table the docs print and the code below follows.
PLACEMENT: tuple[tuple[str, str, str], ...] = (
    ("Conv, MatMul with weights (Linear)", "INT8: input per tensor, weight per output channel",
     "the MACs; TensorRT fuses DQ -> Conv/MatMul into an INT8 kernel and its bias, activation and residual Add"),
    ("attention Q K^T and softmax(.) V", "INT8: both inputs per tensor (softmax output calibrated with max)",
     "the quadratic MACs of attention; the key/value reduction keeps them small but not negligible"),
    ("stem conv (reads the image)", "float (FP16 in TensorRT)",
     "one quantized input with 3 channels: a per-tensor range clips bright pixels and saves few MACs"),
    ("classifier conv (writes the logits)", "float (FP16), FP32 behind it in a labels graph",
     "the logits decide the labels; a near-tie flipped by rounding is a wrong pixel"),
    ("LayerNorm, Softmax, GELU, Resize, residual Add", "float, no Q/DQ on inputs or outputs",
     "no INT8 compute to feed: a Q/DQ pair there only rounds the tensor (the skip path twelve times in a B0)"),
    ("outputs of weighted layers", "float, no Q/DQ",
     "TensorRT's placement guide: quantize inputs, not outputs, so bias and Add fuse into the layer"),
)
# Activations whose range is their maximum whatever export.calibration_method says: the attention probabilities
# (bounded by 1) and the GELU outputs feeding fc2, whose long positive tail an entropy threshold clips (MiT-B0's
# stage-1 FFN: entropy 3.2 against a maximum of 6.6, the largest noise source of the all-INT8 student).
MAX_CALIBRATED = ("attention probabilities", "fc2 inputs (GELU outputs)")


class _FakeQuant(torch.autograd.Function):
    """Symmetric INT8 fake quantization with a straight-through gradient for x inside the range, and LSQ's
    gradient for amax (Esser et al., 2020: d out / d scale is round(x/s) - x/s inside, the clip level outside,
    scaled by 1 / sqrt(numel * QMAX)) when `learn`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, amax: torch.Tensor, learn: bool, qmax: int = QMAX) -> torch.Tensor:
        scale = amax.clamp_min(_EPS) / qmax
        v = x / scale
        q = torch.clamp(torch.round(v), -qmax - 1, qmax)
        ctx.save_for_backward(v, q)
        ctx.learn, ctx.shape, ctx.qmax = learn, amax.shape, qmax
        return q * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        v, q = ctx.saved_tensors
        qmax = ctx.qmax
        inside = (v >= -qmax - 1) & (v <= qmax)
        gx = grad * inside
        if not ctx.learn:
            return gx, None, None, None
        ds = torch.where(inside, q - v, q)
        g_amax = (grad * ds).sum() / qmax / math.sqrt(v.numel() * qmax)
        return gx, g_amax.reshape(ctx.shape), None, None


class ActQuant(nn.Module):
    """Per-tensor INT8 fake quantization of an activation; `amax` is calibrated (`calibrate`), then fixed or learned.
    `method` overrides the calibration method (probabilities are calibrated with max)."""

    def __init__(self, method: str | None = None) -> None:
        super().__init__()
        self.amax = nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.method = method
        self.qmax = QMAX  # quantize(bits=...) narrows it for a stress test; only 8 bits export
        self.observer: _Observer | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(x)
            return x
        if torch.onnx.is_in_onnx_export():
            _check_exportable(self.qmax)
            with warnings.catch_warnings():  # the range is meant to become a constant of the graph
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                scale = max(float(self.amax), _EPS) / QMAX
            return torch.fake_quantize_per_tensor_affine(x, scale, 0, QMIN, QMAX)
        return _FakeQuant.apply(x, self.amax, self.amax.requires_grad and torch.is_grad_enabled(), self.qmax)


def _check_exportable(qmax: int) -> None:
    if qmax != QMAX:
        raise ExportError(f"a {int(math.log2(qmax + 1)) + 1}-bit fake-quantized model: only 8 bits export to Q/DQ "
                          "ONNX (fewer bits are a stress setting for PyTorch only)")


def quantize_weight(w: torch.Tensor, axis: int, qmax: int = QMAX) -> torch.Tensor:
    """Per-channel symmetric fake quantization of `w` along `axis` (INT8 unless `qmax` says otherwise), from its
    current values (straight-through)."""
    dims = [d for d in range(w.dim()) if d != axis]
    amax = w.detach().abs().amax(dim=dims, keepdim=True).clamp_min(_EPS)
    if torch.onnx.is_in_onnx_export():
        _check_exportable(qmax)
        scale = (amax / QMAX).flatten()
        return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), axis,
                                                      QMIN, QMAX)
    return _FakeQuant.apply(w, amax, False, qmax)


class QuantOp(nn.Module):
    """A unit that can run in INT8 or float: `int8` switches its input and weight quantization together."""

    int8: bool = True
    qmax: int = QMAX  # of its weights


class QuantConv2d(QuantOp):
    """nn.Conv2d with its input quantized per tensor (unless `quantize_input` is False: a parent quantized it) and
    its weight per output channel."""

    def __init__(self, conv: nn.Conv2d, quantize_input: bool = True) -> None:
        super().__init__()
        self.conv = conv
        self.input_quant = ActQuant() if quantize_input else None

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if not self.int8:
            return c(x)
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.conv2d(x, quantize_weight(c.weight, 0, self.qmax), c.bias, c.stride, c.padding, c.dilation,
                        c.groups)


class QuantLinear(QuantOp):
    """nn.Linear as x @ W^T + b with x quantized per tensor and W^T per output channel (axis 1): the traced weight is
    the transposed initializer itself, so DQ feeds the MatMul directly."""

    def __init__(self, linear: nn.Linear, quantize_input: bool = True) -> None:
        super().__init__()
        self.linear = linear
        self.input_quant = ActQuant() if quantize_input else None

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.linear
        if not self.int8:
            return lin(x)
        if self.input_quant is not None:
            x = self.input_quant(x)
        y = torch.matmul(x, quantize_weight(lin.weight.t(), 1, self.qmax))
        return y if lin.bias is None else y + lin.bias


class QuantAttention(QuantOp):
    """EfficientSelfAttention with explicit matmuls: the normalised input quantized once for the query projection
    and the key/value reduction, Q (pre-scaled by 1/sqrt(d)), K, V and the probabilities quantized per tensor."""

    def __init__(self, attn: EfficientSelfAttention) -> None:
        super().__init__()
        self.heads, self.sr_ratio = attn.heads, attn.sr_ratio
        self.input_quant = ActQuant()
        self.q = QuantLinear(attn.q, quantize_input=False)
        self.kv = QuantLinear(attn.kv, quantize_input=attn.sr_ratio > 1)
        self.proj = QuantLinear(attn.proj)
        if attn.sr_ratio > 1:
            self.sr = QuantConv2d(attn.sr, quantize_input=False)
            self.sr_norm = attn.sr_norm
        self.q_quant, self.k_quant, self.v_quant = ActQuant(), ActQuant(), ActQuant()
        self.p_quant = ActQuant(method="max")

    def _units(self) -> list[QuantOp]:
        return [self.q, self.kv, self.proj] + ([self.sr] if self.sr_ratio > 1 else [])

    def attention_macs(self, x: torch.Tensor, h: int, w: int) -> int:
        b, n, c = x.shape
        return 2 * b * n * (h // self.sr_ratio) * (w // self.sr_ratio) * c

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        from pipeline.models.mit import grid_of, tokens_of

        for unit in self._units():
            unit.int8 = self.int8
        b, n, c = x.shape
        d = c // self.heads
        if self.int8:
            x = self.input_quant(x)
        q = self.q(x).reshape(b, n, self.heads, d).transpose(1, 2) * d ** -0.5
        if self.sr_ratio > 1:
            x = self.sr_norm(tokens_of(self.sr(grid_of(x, h, w))))
        k, v = self.kv(x).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        if self.int8:
            q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        p = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        if self.int8:
            p = self.p_quant(p)
        return self.proj((p @ v).transpose(1, 2).reshape(b, n, c))


# ------------------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class Unit:
    """One quantized unit of a model: its module path, its group (the block it belongs to) and its module."""

    name: str
    group: str
    module: QuantOp


def group_of(name: str) -> str:
    """The block a unit belongs to: a transformer block's attention or feed-forward half
    (`encoder.stages.0.blocks.1.attn`), a patch embedding (`encoder.stages.1.embed`), a head module
    (`head.proj.2`)."""
    parts = name.split(".")
    if "blocks" in parts:
        return ".".join(parts[:parts.index("blocks") + 3])
    if parts[0] == "encoder":
        return ".".join(parts[:4])
    return ".".join(parts[:3]) if len(parts) > 2 and parts[2].isdigit() else ".".join(parts[:2])


def quantize(student: SegFormer, float_ends: bool = True, bits: int = 8) -> SegFormer:
    """A fake-quantized deploy copy of `student` (segformer.deploy_copy: folded head, Mix-FFN as convs) with every
    unit of PLACEMENT in INT8: each EfficientSelfAttention as a QuantAttention, every other Conv2d / Linear wrapped,
    but the stem (the first layer the image reaches) and the classifier (the last before the logits) kept float
    (`float_ends=False` quantizes them too: a stress setting, not a deployment one; so is `bits` < 8, which only
    runs in PyTorch). Activation ranges start at 1: `calibrate` next. Train mode is the caller's to set."""
    if not 2 <= bits <= 8:
        raise ExportError(f"quantization bits {bits}: expected 2..8")
    model = deploy_copy(student)
    order = _call_order(model)
    keep_float = {order[0], order[-1]} if float_ends else set()
    for name, module in list(model.named_modules()):
        if isinstance(module, EfficientSelfAttention):
            _replace(model, name, QuantAttention(module))
    for name, module in list(model.named_modules()):
        if name in keep_float or _inside_quant(model, name):
            continue
        if isinstance(module, nn.Conv2d):
            _replace(model, name, QuantConv2d(module))
        elif isinstance(module, nn.Linear):
            _replace(model, name, QuantLinear(module))
        else:
            continue
        if name.endswith(".fc2"):  # reads GELU's output: calibrated with max (MAX_CALIBRATED)
            model.get_submodule(name).input_quant.method = "max"
    for m in model.modules():
        if isinstance(m, (ActQuant, QuantOp)):
            m.qmax = 2 ** (bits - 1) - 1
    model.quantized = True  # type: ignore[assignment]
    model.float_ends, model.bits = float_ends, bits  # type: ignore[assignment]
    return model


def _call_order(model: nn.Module) -> list[str]:
    """Names of the Conv2d / Linear modules in the order a forward pass on a small input calls them."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: order.append(names[mod])) for m in names]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise ExportError(f"{model.config.variant}: no Conv2d or Linear layer to quantize")
    return order


def _inside_quant(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), QuantOp):
            return True
    return False


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def units(model: nn.Module) -> list[Unit]:
    """Every top-level quantized unit of `model` (QuantAttention counts as one), in module order."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, QuantOp) and not _inside_quant(model, name):
            out.append(Unit(name, group_of(name), module))
    return out


def groups(model: nn.Module) -> list[str]:
    """The groups of `model`'s units in module order: the granularity of sensitivity and mixed precision."""
    return list(dict.fromkeys(u.group for u in units(model)))


def set_float(model: nn.Module, float_groups: Iterable[str]) -> None:
    """Run the units of `float_groups` in float (FP16 in TensorRT) and every other unit in INT8."""
    chosen = set(float_groups)
    unknown = chosen - set(groups(model))
    if unknown:
        raise ExportError(f"quantization groups {sorted(unknown)}: not in the model (expected some of "
                          f"{', '.join(groups(model))})")
    for u in units(model):
        u.module.int8 = u.group not in chosen


def float_groups(model: nn.Module) -> list[str]:
    return [g for g in groups(model) if all(not u.module.int8 for u in units(model) if u.group == g)]


def act_quantizers(model: nn.Module) -> list[tuple[str, ActQuant]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuant)]


def learn_ranges(model: nn.Module, learn: bool) -> None:
    """Let QAD's optimizer move the activation ranges (LSQ) or keep them as calibrated."""
    for _, q in act_quantizers(model):
        q.amax.requires_grad_(learn)


# ------------------------------------------------------------------------------------------------ calibration
class _Observer:
    """Collects |x| of one activation: the maximum (first pass), then a histogram over [0, max] (second pass)."""

    def __init__(self) -> None:
        self.amax = 0.0
        self.hist: np.ndarray | None = None

    def observe(self, x: torch.Tensor) -> None:
        a = x.detach().abs().float()
        if self.hist is None:
            self.amax = max(self.amax, float(a.max()))
        elif self.amax > 0:
            self.hist += torch.histc(a, ENTROPY_BINS, 0.0, self.amax).cpu().numpy()


@contextmanager
def _observing(model: nn.Module) -> Iterator[dict[str, _Observer]]:
    quantizers = act_quantizers(model)
    observers = {n: _Observer() for n, _ in quantizers}
    for n, q in quantizers:
        q.observer = observers[n]
    try:
        yield observers
    finally:
        for _, q in quantizers:
            q.observer = None


def calibrate(model: nn.Module, frames: Sequence[torch.Tensor], method: str = "entropy") -> dict[str, float]:
    """Set every activation range of `model` from `frames` (network inputs, B x 3 x H x W): the largest |x| seen
    (`max`), or the threshold of TensorRT's entropy calibration on a 2048-bin histogram of |x| (`entropy`,
    precision.entropy_threshold); probabilities always take max. The observed network runs in float, so every range
    is that of the float student's tensor. Returns {quantizer: amax}."""
    from pipeline.precision import entropy_threshold

    if method not in ("entropy", "max"):
        raise ExportError(f"calibration method {method!r}: expected entropy or max")
    if not frames:
        raise ExportError("calibration: no frames")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _observing(model) as observers:
            for x in frames:
                model(x)
            if method == "entropy":
                for o in observers.values():
                    o.hist = np.zeros(ENTROPY_BINS)
                for x in frames:
                    model(x)
    finally:
        model.train(was_training)
    ranges = {}
    for name, q in act_quantizers(model):
        o = observers[name]
        amax = o.amax
        if method == "entropy" and (q.method or method) == "entropy" and o.hist is not None and o.hist.sum() > 0:
            amax = entropy_threshold(o.hist) * o.amax / ENTROPY_BINS
        with torch.no_grad():
            q.amax.fill_(max(amax, _EPS))
        ranges[name] = float(q.amax)
    return ranges


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "quantized", False))


_STATE_KEY = re.compile(r".*\.amax$")


def range_state(model: nn.Module) -> dict[str, float]:
    """{quantizer: amax}, the calibrated or learned ranges (a QAD record's details)."""
    return {k: float(v) for k, v in model.state_dict().items() if _STATE_KEY.match(k)}


# ------------------------------------------------------------------------------------------------ QAD state
QAD_FORMAT = "transkd-deploy/segformer-qad"  # the safetensors header's `format` of a fake-quantized state


def qad_metadata(model: SegFormer, source: str = "", source_sha256: str = "", training: dict | None = None,
                 quantization: dict | None = None):
    """The record of a fake-quantized state: the float student's record (checkpoint_metadata) as kind
    checkpoint-qad, INT8, with its float groups and activation ranges in details.quantization."""
    from dataclasses import replace

    from pipeline.models.checkpoints import checkpoint_metadata

    base = checkpoint_metadata(model, source, training)
    details = {**base.details, "quantization": {"placement": "pipeline.quant", "float_groups": float_groups(model),
                                                "float_ends": bool(getattr(model, "float_ends", True)),
                                                "bits": int(getattr(model, "bits", 8)),
                                                "ranges": range_state(model), **(quantization or {})}}
    return replace(base, kind="checkpoint-qad", precision="int8", source_sha256=source_sha256, details=details)


def save_qad(model: SegFormer, path, *, source: str = "", source_sha256: str = "", training: dict | None = None,
             quantization: dict | None = None):
    """Write the fake-quantized `model` (from `quantize`) as `path` (.safetensors) and its sidecar; returns the
    record. Everything that rebuilds it (config, float groups) is in the record, the tensors in the file."""
    from pathlib import Path

    from safetensors.torch import save_file

    from pipeline import artifacts

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ExportError(f"{path}: expected a .safetensors file name")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = qad_metadata(model, source, source_sha256, training, quantization)
    return artifacts.save(path, lambda tmp: save_file(state, tmp, metadata={"format": QAD_FORMAT}), meta)


def load_qad(path) -> SegFormer:
    """The fake-quantized student `save_qad` wrote (eval mode), rebuilt from its record and filled strictly;
    CheckpointError naming the file otherwise."""
    from pathlib import Path

    from safetensors.torch import load_file

    from pipeline import artifacts
    from pipeline.errors import CheckpointError, InputError
    from pipeline.models.registry import SegFormerConfig
    from pipeline.models.segformer import ModelMeta

    path = Path(path)
    try:
        meta = artifacts.read_sidecar(path, verify=True)
    except InputError as e:
        raise CheckpointError(str(e)) from None
    if meta.kind != "checkpoint-qad":
        raise CheckpointError(f"{artifacts.sidecar_path(path)}: field 'kind' is {meta.kind!r}, expected "
                              "'checkpoint-qad' (a fake-quantized state)")
    cfg = SegFormerConfig.from_dict(meta.details["config"])
    float_model = SegFormer(cfg, ModelMeta(list(meta.classes), [list(c) for c in meta.palette],
                                           tuple(meta.normalization.mean), tuple(meta.normalization.std),
                                           tuple(meta.contract.size or (512, 1024)), meta.source)).eval()
    q = meta.details["quantization"]
    model = quantize(float_model, float_ends=bool(q.get("float_ends", True)), bits=int(q.get("bits", 8)))
    result = model.load_state_dict(load_file(str(path)), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: not the state of a quantized {cfg.variant} (missing: "
                              f"{result.missing_keys[:3]}, unexpected: {result.unexpected_keys[:3]})")
    set_float(model, meta.details["quantization"].get("float_groups", []))
    return model.eval()


def is_qad_file(path) -> bool:
    """Whether `path` is a safetensors file `save_qad` wrote (its header's format)."""
    from pathlib import Path

    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format") == QAD_FORMAT
    except Exception:  # an unreadable file is load_model's to report
        return False
