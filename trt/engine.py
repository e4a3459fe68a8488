"""Any TensorRT engine, with or without a record: its I/O read from the engine itself (`EngineRunner`), inputs
resolved the way trtexec takes them, random data of each input's type; what `trt.timing.foreign_engine_step` times."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import ExportError, InputError
from pipeline.onnxinfo import fmt, random_array, resolve_shapes
from trt.runtime import (
    LEAN_RUNTIME_ENV,
    NUMPY_DTYPES,
    EngineBase,
    Shape,
    _Buffer,
    _dims,
    numpy_dtype,
    open_engine,
    pinned_array,
    require_runtime,
)

if TYPE_CHECKING:
    import tensorrt

# TensorRT I/O types by the bytes of one element; INT4 and FP4 pack two to a byte and are not served here
ITEMSIZE = {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT8": 1, "UINT8": 1, "INT32": 4, "INT64": 8, "BOOL": 1, "FP8": 1}
PRECISION = {"HALF": "fp16", "BF16": "bf16", "INT8": "int8", "FP8": "fp8"}  # I/O types that name one


@dataclass(frozen=True)
class IoTensor:
    """An I/O tensor as the engine reports it: dims -1 where dynamic; for a dynamic input the (min, opt, max) of
    optimisation profile 0; `vector` (dim, components) for a vectorized format such as CHW32; `host` for a shape
    tensor, whose values (not an address) TensorRT reads on the host."""
    name: str
    mode: str  # "input" or "output"
    dtype: str  # TensorRT's DataType name: FLOAT, HALF, INT8 ...
    shape: Shape
    profile: tuple[Shape, Shape, Shape] | None = None
    vector: tuple[int, int] | None = None
    host: bool = False


def engine_io(engine: tensorrt.ICudaEngine) -> list[IoTensor]:
    """Every I/O tensor of `engine`, in its order."""
    import tensorrt as trt

    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        shape = _dims(engine.get_tensor_shape(name))
        profile = None
        if is_input and min(shape, default=0) < 0:
            mn, opt, mx = (_dims(d) for d in engine.get_tensor_profile_shape(name, 0))
            profile = (mn, opt, mx)
        dim = engine.get_tensor_vectorized_dim(name)
        vector = (dim, engine.get_tensor_components_per_element(name)) if dim >= 0 else None
        host = engine.get_tensor_location(name) == trt.TensorLocation.HOST
        tensors.append(IoTensor(name, "input" if is_input else "output", engine.get_tensor_dtype(name).name, shape,
                                profile, vector, host))
    return tensors


def resolve_engine_shapes(tensors: Sequence[IoTensor], shapes: dict[str, Shape], batch: int,
                          size: tuple[int, int] | None, where: str) -> dict[str, Shape]:
    """The shape of every input, as trtexec takes them (pipeline.onnxinfo.resolve_shapes: --shapes, else batch and
    size for the dynamic dims), within optimisation profile 0; one line naming the input and dim otherwise."""
    inputs = [t for t in tensors if t.mode == "input"]
    for t in inputs:
        if t.host:
            raise InputError(f"{where}: input {t.name!r} is a shape tensor (values read on the host): not supported")
    resolved = resolve_shapes([(t.name, t.shape) for t in inputs], shapes, batch, size, where)
    for t in inputs:
        if t.profile is not None:
            mn, _, mx = t.profile
            for i, (d, lo, hi) in enumerate(zip(resolved[t.name], mn, mx)):
                if not lo <= d <= hi:
                    raise InputError(f"{where}: input {t.name!r} dim {i} is {d}, outside profile 0's {lo}..{hi} "
                                     f"(min {fmt(mn)}, max {fmt(mx)})")
    return resolved


def tensor_bytes(t: IoTensor, shape: Shape, where: str) -> int:
    """Bytes of `t`'s buffer at `shape`; a vectorized format pads its vector dim to whole vectors."""
    if t.dtype not in ITEMSIZE:
        raise InputError(f"{where}: tensor {t.name!r} is TensorRT type {t.dtype}; supported: {', '.join(ITEMSIZE)}")
    dims = list(shape)
    if t.vector is not None:
        dim, n = t.vector
        dims[dim] = -(-dims[dim] // n) * n
    return int(np.prod(dims, dtype=np.int64)) * ITEMSIZE[t.dtype]


def random_input(t: IoTensor, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random elements in `t`'s type, to fill its whole buffer: normal floats, integers in a small range
    (indices stay valid), bytes in full; BF16 (no numpy type) as the upper halves of float32s, FP8 as raw bytes."""
    if t.dtype == "BF16":
        return (rng.standard_normal(count, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    if t.dtype == "FP8":
        return rng.integers(0, 0x78, count, dtype=np.uint8)  # positive finite E4M3 codes
    return random_array(numpy_dtype(t.dtype, t.name), (count,), rng)


def engine_precision(tensors: Sequence[IoTensor]) -> str:
    """The precision the I/O types name (HALF: fp16 ...); "unknown" for float32 or integer I/O, which an engine of
    any precision may have."""
    return next((PRECISION[t.dtype] for t in tensors if t.dtype in PRECISION), "unknown")


def describe_io(tensors: Sequence[IoTensor], shapes: dict[str, Shape]) -> tuple[dict[str, str], dict[str, str]]:
    """{name: "1x3x512x1024 float32"} for the inputs and for the outputs."""
    def text(t: IoTensor) -> str:
        return f"{fmt(shapes.get(t.name, t.shape))} {NUMPY_DTYPES.get(t.dtype, t.dtype.lower())}"

    return ({t.name: text(t) for t in tensors if t.mode == "input"},
            {t.name: text(t) for t in tensors if t.mode == "output"})


class EngineRunner(EngineBase):
    """Any engine, with or without a record: every I/O tensor read from the engine, a device buffer and a pinned
    host mirror for each. `set_shapes` then `fill_random`, then the primitives trt/timing.py times. A plan built with
    --exclude-lean-runtime by another TensorRT needs `lean_runtime` (else $TRANSKD_TRT_LEAN_RUNTIME), as trtexec's
    --leanDLLPath; with it the plan's host code is allowed, as trtexec's --versionCompatible does."""

    def __init__(self, plan: str | os.PathLike, device: int = 0, lean_runtime: str | os.PathLike | None = None) -> None:
        self.plan, self.device = Path(plan), device
        if not self.plan.is_file():
            raise InputError(f"{self.plan}: no such TensorRT engine file")
        self._rt = require_runtime(self.plan)
        lean = str(lean_runtime) if lean_runtime else os.environ.get(LEAN_RUNTIME_ENV) or None
        self._errors: list[str] = []
        self.shapes: dict[str, Shape] = {}
        with self.on_device():
            self._runtimes, self.engine = open_engine(self.plan, self._errors, lean, host_code=lean is not None)
            self.tensors = engine_io(self.engine)
            self._make_context(self.engine)
        self._buffers = {t.name: _Buffer() for t in self.tensors}

    def set_shapes(self, shapes: dict[str, Shape]) -> None:
        """Set every input's shape (resolve_engine_shapes), size every buffer for it and bind them."""
        with self.on_device():
            for t in self.tensors:
                dynamic = t.mode == "input" and t.profile is not None
                if dynamic and not self.context.set_input_shape(t.name, shapes[t.name]):
                    raise InputError(f"{self.plan}: TensorRT refused input {t.name!r} shape {fmt(shapes[t.name])}: "
                                     f"{self.last_error()}")
            for t in self.tensors:
                shape = shapes[t.name] if t.mode == "input" else _dims(self.context.get_tensor_shape(t.name))
                if min(shape, default=0) < 0:
                    raise ExportError(f"{self.plan}: output {t.name!r} has a data-dependent shape {fmt(shape)}")
                self.shapes[t.name] = shape
                self._buffers[t.name].reserve(self._rt, max(tensor_bytes(t, shape, str(self.plan)), 1))
            self.bind()

    def _nbytes(self, t: IoTensor) -> int:
        return tensor_bytes(t, self.shapes[t.name], str(self.plan))

    def fill_random(self, seed: int = 0) -> None:
        """Random data (random_input, seeded) in every input's pinned host buffer; copy_to_device moves it."""
        rng = np.random.default_rng(seed)
        for t in self.tensors:
            if t.mode == "input":
                x = random_input(t, self._nbytes(t) // ITEMSIZE[t.dtype], rng)
                np.copyto(pinned_array(self._buffers[t.name].host, x.dtype, x.shape), x)

    def host(self, name: str) -> np.ndarray:
        """A numpy view of tensor `name`'s pinned host buffer at its shape (a type numpy has: numpy_dtype)."""
        t = next(t for t in self.tensors if t.name == name)
        return pinned_array(self._buffers[name].host, numpy_dtype(t.dtype, name), self.shapes[name])

    def bind(self) -> None:
        for t in self.tensors:
            if not self.context.set_tensor_address(t.name, self._buffers[t.name].device):
                raise ExportError(f"{self.plan}: TensorRT refused the address of {t.name!r}: {self.last_error()}")

    def copy_to_device(self) -> None:
        """Enqueue every input's H2D copy on the runner's stream."""
        for t in self.tensors:
            if t.mode == "input":
                buf = self._buffers[t.name]
                self._copy(buf.device, buf.host, self._nbytes(t), "cudaMemcpyHostToDevice")

    def copy_to_host(self) -> None:
        """Enqueue every output's D2H copy on the runner's stream."""
        for t in self.tensors:
            if t.mode == "output":
                buf = self._buffers[t.name]
                self._copy(buf.host, buf.device, self._nbytes(t), "cudaMemcpyDeviceToHost")

    def _free(self) -> None:
        for buf in self._buffers.values():
            buf.free(self._rt)
