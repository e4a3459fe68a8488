"""Run a TensorRT engine built by trt/build.py: the TensorRT 10 tensor-address API on a cuda-python stream.

The plan's sidecar (TensorRT version, GPU, shape profile) is checked before TensorRT reads the plan; then `TrtRunner`
serves numpy (`infer`, through pinned host buffers) or torch CUDA tensors (`infer_torch`, no host copies), and the
timing primitives of the latency benchmark, measured with CUDA events on the runner's own stream.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ExportError, InputError
from trt.build import fmt, sidecar_path, tensorrt_unavailable, trt_logger

if TYPE_CHECKING:
    import tensorrt
    import torch

Shape = tuple[int, ...]
NO_CUDA_PYTHON = "cuda-python is not installed (pip install -r requirements-gpu.txt on a CUDA machine)"
SIDECAR_KEYS = ("file", "tensorrt", "gpu", "inputs", "outputs", "build")
# TensorRT I/O types numpy can hold; BF16, FP8, FP4 and INT4 have no numpy type (trt.nptype refuses them too)
NUMPY_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64",
                "BOOL": "bool", "UINT8": "uint8"}


def load_sidecar(plan: str | os.PathLike) -> dict:
    """The `<plan>.json` trt/build.py wrote beside the engine."""
    plan, side = Path(plan), sidecar_path(plan)
    if not plan.is_file():
        raise InputError(f"{plan}: no such TensorRT engine file")
    try:
        data = json.loads(side.read_text())
    except FileNotFoundError:
        raise InputError(f"{side}: missing; expected the sidecar trt/build.py writes beside {plan.name}") from None
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise InputError(f"{side}: unreadable engine sidecar ({(str(e) or type(e).__name__).splitlines()[0]})") \
            from None
    missing = [k for k in SIDECAR_KEYS if k not in data] if isinstance(data, dict) else list(SIDECAR_KEYS)
    if not missing and not (data["inputs"] and {"name", "shape"} <= set(data["inputs"][0])):
        missing = ["inputs[0].name/shape"]
    if missing:
        raise InputError(f"{side}: not a trt/build.py engine sidecar (missing {', '.join(missing)})")
    return data


def _numbers(version: str) -> Shape:
    return tuple(int(p) for p in re.findall(r"\d+", version))


def sidecar_mismatch(sidecar: dict, trt_version: str, gpu_name: str, compute_capability: str) -> str | None:
    """None when the engine may run with this TensorRT on this GPU, else one line saying what differs."""
    build, gpu, built = sidecar["build"], sidecar["gpu"], sidecar["tensorrt"]
    version, cc, problems = _numbers(trt_version), _numbers(compute_capability), []
    # a plan is tied to its exact TensorRT version unless built version-compatible, when later runtimes take it too
    # (trt/build.py promises later 10.x only: TensorRT removes APIs at major versions)
    if build.get("version_compatible"):
        if version[:1] != _numbers(built)[:1] or version < _numbers(built):
            problems.append(f"the engine was built version-compatible with TensorRT {built} (here {trt_version}); "
                            f"it runs on {built} or a later {_numbers(built)[0]}.x")
    elif version != _numbers(built):
        problems.append(f"the engine was built with TensorRT {built} (here {trt_version})")
    compat, built_cc = build.get("hardware_compat", "none"), gpu["compute_capability"]
    if compat == "ampere+":
        fits, target = cc >= (8, 0), "Ampere or newer GPUs (compute capability 8.0 or more)"
    elif compat == "same":
        fits, target = cc == _numbers(built_cc), f"GPUs of compute capability {built_cc}"
    else:  # a plain plan runs only on the GPU model it was built on
        fits, target = cc == _numbers(built_cc) and gpu_name == gpu["name"], f"GPU {gpu['name']} ({built_cc})"
    if not fits:
        problems.append(f"the engine was built for {target} (here {gpu_name}, {compute_capability})")
    return "; ".join(problems) or None


def check_shape(sidecar: dict, shape: Sequence[int]) -> None:
    """The input shape must be the engine's static shape, or lie within the optimisation profile it was built with."""
    inp, asked = sidecar["inputs"][0], tuple(int(d) for d in shape)
    dims, profile = inp["shape"], inp.get("profile")
    where = f"{sidecar['file']}: input {inp['name']!r} shape {fmt(asked)}"
    if len(asked) != len(dims):
        raise InputError(f"{where}: expected {len(dims)} dims ({fmt(dims)})")
    if profile is None and asked != tuple(dims):
        raise InputError(f"{where}: the engine's input is static, {fmt(dims)}")
    for i, (d, lo, hi) in enumerate(zip(asked, profile["min"], profile["max"]) if profile else ()):
        if not lo <= d <= hi:
            dim = dims[i] if isinstance(dims[i], str) else f"dim {i}"
            raise InputError(f"{where}: {dim} {d} is outside the engine's profile {lo}..{hi} "
                             f"(min {fmt(profile['min'])}, max {fmt(profile['max'])})")


def numpy_dtype(trt_dtype: str, tensor: str = "tensor") -> np.dtype:
    """TensorRT's DataType name (FLOAT, HALF, INT8 ...) -> the numpy dtype of a buffer for `tensor`."""
    if trt_dtype not in NUMPY_DTYPES:
        raise ExportError(f"{tensor}: TensorRT type {trt_dtype} has no numpy equivalent "
                          f"(supported: {', '.join(NUMPY_DTYPES)})")
    return np.dtype(NUMPY_DTYPES[trt_dtype])


def pinned_array(address: int, dtype: np.dtype, shape: Shape) -> np.ndarray:
    """A numpy view of `shape` elements of `dtype` at host `address` (pinned memory from cudaMallocHost); no copy."""
    count = int(np.prod(shape, dtype=np.int64))
    raw = memoryview((ctypes.c_byte * (count * dtype.itemsize)).from_address(address))
    return np.frombuffer(raw, dtype, count).reshape(shape)


def _dims(dims: tensorrt.Dims) -> Shape:
    return tuple(dims[i] for i in range(len(dims)))


def _check(call: str, result: tuple) -> Any:
    """cuda-python returns (error, *values): raise on an error, else the value (a tuple for several, None for none)."""
    err, *values = result
    if err:  # cudaError_t is an IntEnum and cudaSuccess is 0
        raise ExportError(f"{call} failed: {getattr(err, 'name', err)} (error {int(err)})")
    return values[0] if len(values) == 1 else tuple(values) or None


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime  # cuda-python before 12.6.1 (no cuda.bindings)
    return runtime


@dataclass
class _Buffer:
    """Device memory and its pinned host mirror, kept at the largest size asked so far."""
    device: int = 0
    host: int = 0
    nbytes: int = 0


class TrtRunner:
    """One engine, one execution context and one non-blocking stream; one input tensor and one output tensor."""

    def __init__(self, plan: str | os.PathLike, device: int = 0) -> None:
        self.plan, self.device = Path(plan), device
        self.sidecar = load_sidecar(self.plan)
        reason = tensorrt_unavailable()
        if reason is None:
            try:
                self._rt = _cudart()
            except ImportError:
                reason = NO_CUDA_PYTHON
        if reason:
            raise ExportError(f"{self.plan}: cannot run the engine: {reason}")
        import tensorrt as trt

        rt = self._rt
        _check("cudaSetDevice", rt.cudaSetDevice(device))
        props = _check("cudaGetDeviceProperties", rt.cudaGetDeviceProperties(device))
        name = props.name.decode(errors="replace").rstrip("\0")  # the name torch and nvidia-smi report
        why = sidecar_mismatch(self.sidecar, trt.__version__, name, f"{props.major}.{props.minor}")
        if why:
            raise InputError(f"{self.plan}: {why}; rebuild it here with python -m trt.build")
        self._errors: list[str] = []
        self._runtime = trt.Runtime(trt_logger(self._errors))  # kept: the runtime must outlive its engine
        if self.sidecar["build"].get("version_compatible") and not self.sidecar["build"].get("exclude_lean_runtime"):
            self._runtime.engine_host_code_allowed = True  # the plan carries its lean runtime, which is host code
        engine = self._runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if engine is None:  # the stubs say ICudaEngine; the documented failure value is None
            raise ExportError(f"{self.plan}: TensorRT could not deserialize the engine: {self._last_error()}")
        self.engine: tensorrt.ICudaEngine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ExportError(f"{self.plan}: expected one input and one output, found {inputs} and {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_dtype, self.output_dtype = (numpy_dtype(engine.get_tensor_dtype(n).name, f"{self.plan} {n!r}")
                                               for n in (self.input_name, self.output_name))
        self._dynamic = min(_dims(engine.get_tensor_shape(self.input_name)), default=0) < 0
        context = engine.create_execution_context()
        if context is None:  # as for the engine: None on failure, typically out of GPU memory
            raise ExportError(f"{self.plan}: TensorRT could not create an execution context: {self._last_error()}")
        self.context: tensorrt.IExecutionContext = context
        # TensorRT documents that the default stream costs extra synchronisation: use a non-blocking one of our own
        self._stream = _check("cudaStreamCreateWithFlags", rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
        self._events = [_check("cudaEventCreate", rt.cudaEventCreate()) for _ in range(4)]
        self._in, self._out = _Buffer(), _Buffer()
        self._torch_out: torch.Tensor | None = None
        self.input_shape: Shape = ()
        self.output_shape: Shape = ()
        profile = self.sidecar["inputs"][0].get("profile")
        try:
            self.set_input_shape(profile["opt"] if profile else self.sidecar["inputs"][0]["shape"])
        except BaseException:
            self.close()
            raise

    def _last_error(self) -> str:
        return self._errors[-1] if self._errors else "no error reported"

    def set_input_shape(self, shape: Sequence[int]) -> None:
        """Set the input shape; the buffers are reallocated only when they must grow."""
        shape = tuple(int(d) for d in shape)
        check_shape(self.sidecar, shape)
        if self._dynamic and not self.context.set_input_shape(self.input_name, shape):
            raise InputError(f"{self.plan}: TensorRT refused input shape {fmt(shape)}: {self._last_error()}")
        out = _dims(self.context.get_tensor_shape(self.output_name))
        if min(out, default=0) < 0:
            raise ExportError(f"{self.plan}: output {self.output_name!r} has a data-dependent shape {fmt(out)}")
        self.input_shape, self.output_shape = shape, out
        for buf, dtype, s in ((self._in, self.input_dtype, shape), (self._out, self.output_dtype, out)):
            if (nbytes := int(np.prod(s, dtype=np.int64)) * dtype.itemsize) > buf.nbytes:
                self._free(buf)
                buf.device = _check("cudaMalloc", self._rt.cudaMalloc(nbytes))
                buf.host = _check("cudaMallocHost", self._rt.cudaMallocHost(nbytes))
                buf.nbytes = nbytes
                ctypes.memset(buf.host, 0, nbytes)  # time_compute may run before any input: time zeros, not junk
        self._host_in = pinned_array(self._in.host, self.input_dtype, shape)
        self._host_out = pinned_array(self._out.host, self.output_dtype, out)

    def _free(self, buf: _Buffer) -> None:
        if buf.device:
            _check("cudaFree", self._rt.cudaFree(buf.device))
        if buf.host:
            _check("cudaFreeHost", self._rt.cudaFreeHost(buf.host))
        buf.device = buf.host = buf.nbytes = 0

    def _bind(self, input_ptr: int, output_ptr: int) -> None:
        for name, ptr in ((self.input_name, input_ptr), (self.output_name, output_ptr)):
            if not self.context.set_tensor_address(name, ptr):
                raise ExportError(f"{self.plan}: TensorRT refused the address of {name!r}: {self._last_error()}")

    def _execute(self, stream: int) -> None:
        if not self.context.execute_async_v3(stream):
            raise ExportError(f"{self.plan}: TensorRT execution failed: {self._last_error()}")

    def _copy(self, to_device: bool) -> None:
        rt = self._rt
        if to_device:
            args = (self._in.device, self._in.host, self._host_in.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice)
        else:
            args = (self._out.host, self._out.device, self._host_out.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        _check("cudaMemcpyAsync", rt.cudaMemcpyAsync(*args, self._stream))

    def _load(self, x: np.ndarray) -> None:
        if x.dtype != self.input_dtype:
            raise InputError(f"{self.plan}: input {self.input_name!r} takes {self.input_dtype}, got {x.dtype}")
        if tuple(x.shape) != self.input_shape:
            self.set_input_shape(x.shape)
        np.copyto(self._host_in, x)
        self._bind(self._in.device, self._out.device)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """x -> a new array with the engine's output; H2D, execute and D2H on the runner's stream, then a sync."""
        self._load(x)
        self._copy(to_device=True)
        self._execute(int(self._stream))
        self._copy(to_device=False)
        _check("cudaStreamSynchronize", self._rt.cudaStreamSynchronize(self._stream))
        return self._host_out.copy()

    def infer_torch(self, x: torch.Tensor) -> torch.Tensor:
        """x a CUDA tensor on the runner's device, read in place; the output tensor is allocated once per shape and
        overwritten by the next call. Runs on torch's current stream, so it is ordered with the caller's work."""
        import torch

        dtype = torch.from_numpy(np.empty(0, self.input_dtype)).dtype
        if not x.is_cuda or x.device.index != self.device or x.dtype != dtype:
            raise InputError(f"{self.plan}: input {self.input_name!r} takes {dtype} on cuda:{self.device}, "
                             f"got {x.dtype} on {x.device}")
        x = x.contiguous()
        if tuple(x.shape) != self.input_shape:
            self.set_input_shape(x.shape)
        if self._torch_out is None or tuple(self._torch_out.shape) != self.output_shape:
            out_dtype = torch.from_numpy(np.empty(0, self.output_dtype)).dtype
            self._torch_out = torch.empty(self.output_shape, dtype=out_dtype, device=x.device)
        self._bind(x.data_ptr(), self._torch_out.data_ptr())
        self._execute(torch.cuda.current_stream(x.device).cuda_stream)
        return self._torch_out

    def _record(self, event: Any) -> None:
        _check("cudaEventRecord", self._rt.cudaEventRecord(event, self._stream))

    def _elapsed(self, start: Any, end: Any) -> float:
        return float(_check("cudaEventElapsedTime", self._rt.cudaEventElapsedTime(start, end)))

    def time_compute(self, iterations: int, warmup: int, cuda_graph: bool = False) -> list[float]:
        """Milliseconds per execute (the input already on the device), or per launch of a CUDA graph of one execute.
        Each iteration waits for the last, so the host's launch overhead counts: what a CUDA graph saves."""
        rt, stream, (start, end) = self._rt, int(self._stream), self._events[:2]
        self._bind(self._in.device, self._out.device)
        self._copy(to_device=True)
        graph = graph_exec = None
        captured = True
        if cuda_graph:
            # TensorRT updates shape-dependent state on the first enqueue after set_input_shape, work that must stay
            # out of the graph: execute once before capturing
            self._execute(stream)
            _check("cudaStreamSynchronize", rt.cudaStreamSynchronize(self._stream))
            mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal  # other threads' CUDA calls are not ours
            _check("cudaStreamBeginCapture", rt.cudaStreamBeginCapture(self._stream, mode))
            captured = self.context.execute_async_v3(stream)
            graph = _check("cudaStreamEndCapture", rt.cudaStreamEndCapture(self._stream))  # ended even on failure
        try:
            if not captured:
                raise ExportError(f"{self.plan}: TensorRT could not be captured in a CUDA graph: {self._last_error()}")
            if cuda_graph:
                graph_exec = _check("cudaGraphInstantiate", rt.cudaGraphInstantiate(graph, 0))
            times = []
            for i in range(warmup + iterations):
                self._record(start)
                if graph_exec is None:
                    self._execute(stream)
                else:
                    _check("cudaGraphLaunch", rt.cudaGraphLaunch(graph_exec, self._stream))
                self._record(end)
                _check("cudaEventSynchronize", rt.cudaEventSynchronize(end))
                if i >= warmup:
                    times.append(self._elapsed(start, end))
            return times
        finally:
            if graph_exec is not None:
                _check("cudaGraphExecDestroy", rt.cudaGraphExecDestroy(graph_exec))
            if graph is not None:
                _check("cudaGraphDestroy", rt.cudaGraphDestroy(graph))

    def time_end_to_end(self, x: np.ndarray, iterations: int, warmup: int) -> dict[str, list[float]]:
        """Milliseconds per iteration for H2D, execute, D2H and all three, pinned host buffer to pinned host buffer
        (the numpy copies into and out of the pinned buffers are host work that CUDA events do not see)."""
        self._load(x)
        e0, e1, e2, e3 = self._events
        times: dict[str, list[float]] = {"h2d": [], "compute": [], "d2h": [], "total": []}
        for i in range(warmup + iterations):
            self._record(e0)
            self._copy(to_device=True)
            self._record(e1)
            self._execute(int(self._stream))
            self._record(e2)
            self._copy(to_device=False)
            self._record(e3)
            _check("cudaEventSynchronize", self._rt.cudaEventSynchronize(e3))
            if i >= warmup:
                for key, (a, b) in zip(times, ((e0, e1), (e1, e2), (e2, e3), (e0, e3))):
                    times[key].append(self._elapsed(a, b))
        return times

    def close(self) -> None:
        """Free the buffers, events and stream; safe to call twice."""
        if self._stream is None:
            return
        _check("cudaStreamSynchronize", self._rt.cudaStreamSynchronize(self._stream))
        self._torch_out = None
        for buf in (self._in, self._out):
            self._free(buf)
        for event in self._events:
            _check("cudaEventDestroy", self._rt.cudaEventDestroy(event))
        _check("cudaStreamDestroy", self._rt.cudaStreamDestroy(self._stream))
        self._stream, self._events = None, []

    def __enter__(self) -> TrtRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
