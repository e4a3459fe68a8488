"""Run a TensorRT engine built by trt/build.py (TensorRT 10 tensor-address API, cuda-python stream) once its record
fits this TensorRT and GPU; the timing loops over the runner's primitives are in trt/timing.py."""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import artifacts
from pipeline.artifacts import Metadata, sidecar_path
from pipeline.errors import ExportError, InputError
from pipeline.onnxinfo import fmt
from trt.build import HARDWARE_COMPAT, tensorrt_unavailable, trt_logger

if TYPE_CHECKING:
    import tensorrt
    import torch

Shape = tuple[int, ...]
NO_CUDA_PYTHON = "cuda-python is not installed (pip install -r requirements-gpu.txt on a CUDA machine)"
# TensorRT I/O types numpy can hold; BF16, FP8, FP4 and INT4 have no numpy type (trt.nptype refuses them too)
NUMPY_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64",
                "BOOL": "bool", "UINT8": "uint8"}


def load_sidecar(plan: str | os.PathLike) -> Metadata:
    """The validated record beside an engine (`<plan>.json`, artifacts.read_sidecar), of an engine kind, whose
    details hold what the runtime checks, each of the type it is read as: the TensorRT version, the GPU, the build
    settings and the input with its shape and profile; the plan must be the file the record describes (sha256)."""
    plan = Path(plan)
    if not plan.is_file():
        raise InputError(f"{plan}: no such TensorRT engine file")
    meta, where = artifacts.read_sidecar(plan), sidecar_path(plan)
    engines = artifacts.kinds("tensorrt")
    if meta.kind not in engines:
        raise InputError(f"{where}: field 'kind' is {meta.kind!r}; an engine's record is one of {', '.join(engines)}")
    problem = _details_problem(meta.details) or _contract_problem(meta)
    if problem:
        raise InputError(f"{where}: field {problem[0]!r}: expected {problem[1]}")
    artifacts.read_sidecar(plan, verify=True)  # last: a wrong record is named as such, not as a changed plan
    return meta


_VERSION = re.compile(r"\d+(\.\d+)*")
_INPUT = "details.inputs[0]"


def _details_problem(d: dict) -> tuple[str, str] | None:
    """The first field of an engine record's details that the runtime could not use: (field, what it must be)."""
    gpu, build, inputs = d["gpu"], d["build"], d["inputs"]
    if not (isinstance(d["tensorrt"], str) and _VERSION.fullmatch(d["tensorrt"])):
        return "details.tensorrt", "a version string such as 10.13.3.9"
    if not (isinstance(gpu, dict) and isinstance(gpu.get("name"), str)
            and isinstance(gpu.get("compute_capability"), str) and _VERSION.fullmatch(gpu["compute_capability"])):
        return "details.gpu", "an object with name and compute_capability (such as 8.9)"
    if not isinstance(build, dict):
        return "details.build", "an object"
    if not (isinstance(build.get("hardware_compat"), str) and build["hardware_compat"] in HARDWARE_COMPAT):
        return "details.build.hardware_compat", f"one of {', '.join(HARDWARE_COMPAT)}"
    for key in ("version_compatible", "exclude_lean_runtime"):
        if not isinstance(build.get(key), bool):
            return f"details.build.{key}", "true or false"
    if not (isinstance(inputs, list) and inputs and isinstance(inputs[0], dict)
            and isinstance(inputs[0].get("name"), str) and isinstance(inputs[0].get("dtype"), str)):
        return _INPUT, "an object with name, dtype and shape"
    return _input_problem(inputs[0])


def _input_problem(inp: dict) -> tuple[str, str] | None:
    """The input's shape (dims: positive integers, names where dynamic) and, where any dim is dynamic, the profile
    it was built with: min, opt and max of the shape's rank, equal to it in its static dims, min <= opt <= max."""
    shape, profile = inp.get("shape"), inp.get("profile")
    if not (isinstance(shape, list) and shape and all(_positive(d) or (isinstance(d, str) and d) for d in shape)):
        return f"{_INPUT}.shape", "a list of dims, positive integers or the names of dynamic ones"
    if profile is None:
        dynamic = any(isinstance(d, str) for d in shape)
        return (f"{_INPUT}.profile", "min, opt and max shapes for its dynamic dims") if dynamic else None

    def fits(dims: object) -> bool:
        return (isinstance(dims, list) and len(dims) == len(shape) and all(map(_positive, dims))
                and all(isinstance(s, str) or s == v for s, v in zip(shape, dims)))

    if not (isinstance(profile, dict) and all(fits(profile.get(k)) for k in ("min", "opt", "max"))
            and all(lo <= opt <= hi for lo, opt, hi in zip(profile["min"], profile["opt"], profile["max"]))):
        return f"{_INPUT}.profile", (f"min, opt and max, each {len(shape)} positive integers fitting the shape "
                                     "(min <= opt <= max)")
    return None


def _contract_problem(meta: Metadata) -> tuple[str, str] | None:
    """The contract the Segmenter batches and sizes frames by is the engine input's: N x 3 x H x W (float) or
    N x H x W x 3 (uint8), dynamic where the input has dynamic dims, its batch (null where that is dynamic), and
    its size where it is static."""
    c, shape = meta.contract, meta.details["inputs"][0]["shape"]
    nhwc = c.input == "uint8"
    if len(shape) != 4 or shape[3 if nhwc else 1] != 3:
        return f"{_INPUT}.shape", f"N x {'H x W x 3' if nhwc else '3 x H x W'} for a {c.input} input, not {fmt(shape)}"
    dynamic = any(isinstance(d, str) for d in shape)
    if c.dynamic != dynamic:
        return "contract.dynamic", f"{str(dynamic).lower()} for the engine's input {fmt(shape)}"
    batch = shape[0] if isinstance(shape[0], int) else None  # None: any, within the profile
    if c.batch != batch:
        return "contract.batch", f"{batch if batch else 'null (any)'} for the engine's input {fmt(shape)}"
    hw = shape[1:3] if nhwc else shape[2:4]
    if not dynamic and c.size != hw:
        return "contract.size", f"[{hw[0]}, {hw[1]}] for the engine's input {fmt(shape)}"
    return None


def _positive(d: object) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 1


def _numbers(version: str) -> Shape:
    return tuple(int(p) for p in re.findall(r"\d+", version))


def sidecar_mismatch(meta: Metadata, trt_version: str, gpu_name: str, compute_capability: str) -> str | None:
    """None when the engine of record `meta` may run with this TensorRT on this GPU, else one line saying what
    differs."""
    build, gpu, built = meta.details["build"], meta.details["gpu"], meta.details["tensorrt"]
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


def check_shape(meta: Metadata, shape: Sequence[int]) -> None:
    """The input shape must be the engine's static shape, or lie within the optimisation profile it was built with."""
    inp, asked = meta.details["inputs"][0], tuple(int(d) for d in shape)
    dims, profile = inp["shape"], inp.get("profile")
    where = f"{meta.file}: input {inp['name']!r} shape {fmt(asked)}"
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


def cuda_check(call: str, result: tuple) -> Any:
    """cuda-python returns (error, *values): raise on an error, else the value (a tuple for several, None for none)."""
    err, *values = result
    if err:  # cudaError_t is an IntEnum and cudaSuccess is 0
        raise ExportError(f"{call} failed: {getattr(err, 'name', err)} (error {int(err)})")
    return values[0] if len(values) == 1 else tuple(values) or None


def cudart() -> Any:
    """cuda-python's runtime module (ImportError where cuda-python is missing)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime  # cuda-python before 12.6.1 (no cuda.bindings)
    return runtime


def require_runtime(plan: Path) -> Any:
    """cuda-python's runtime module; ExportError where TensorRT, a CUDA GPU or cuda-python is missing."""
    reason = tensorrt_unavailable()
    if reason is None:
        try:
            return cudart()
        except ImportError:
            reason = NO_CUDA_PYTHON
    raise ExportError(f"{plan}: cannot run the engine: {reason}")


@dataclass
class _Buffer:
    """Device memory and its pinned host mirror, kept at the largest size asked so far."""
    device: int = 0
    host: int = 0
    nbytes: int = 0

    def reserve(self, rt: Any, nbytes: int) -> None:
        if nbytes > self.nbytes:
            self.free(rt)
            self.device = cuda_check("cudaMalloc", rt.cudaMalloc(nbytes))
            self.host = cuda_check("cudaMallocHost", rt.cudaMallocHost(nbytes))
            self.nbytes = nbytes
            ctypes.memset(self.host, 0, nbytes)  # time_compute may run before any input: time zeros, not junk

    def free(self, rt: Any) -> None:
        if self.device:
            cuda_check("cudaFree", rt.cudaFree(self.device))
        if self.host:
            cuda_check("cudaFreeHost", rt.cudaFreeHost(self.host))
        self.device = self.host = self.nbytes = 0


class TrtRunner:
    """One engine, one execution context and one non-blocking stream; one input tensor and one output tensor.
    `infer` serves numpy through pinned host buffers, `infer_torch` CUDA tensors in place; `load`, `bind`,
    `copy_to_device`, `execute` and `copy_to_host` are the steps trt/timing.py times on `stream`."""

    def __init__(self, plan: str | os.PathLike, device: int = 0) -> None:
        self.plan, self.device = Path(plan), device
        self.meta = load_sidecar(self.plan)  # first: a bad record is refused on any machine, before TensorRT
        self._rt = require_runtime(self.plan)
        import tensorrt as trt

        cuda_check("cudaSetDevice", self._rt.cudaSetDevice(device))
        self._refuse_mismatch(trt.__version__)
        self._errors: list[str] = []
        self._runtime = trt.Runtime(trt_logger(self._errors))  # kept: the runtime must outlive its engine
        self.engine = self._deserialize()
        self.input_name, self.output_name = self._io_names()
        self.input_dtype, self.output_dtype = (numpy_dtype(self.engine.get_tensor_dtype(n).name, f"{self.plan} {n!r}")
                                               for n in (self.input_name, self.output_name))
        self._dynamic = min(_dims(self.engine.get_tensor_shape(self.input_name)), default=0) < 0
        context = self.engine.create_execution_context()
        if context is None:  # as for the engine: None on failure, typically out of GPU memory
            raise ExportError(f"{self.plan}: TensorRT could not create an execution context: {self.last_error()}")
        self.context: tensorrt.IExecutionContext = context
        # TensorRT documents that the default stream costs extra synchronisation: use a non-blocking one of our own
        flags = self._rt.cudaStreamNonBlocking
        self.stream: Any = cuda_check("cudaStreamCreateWithFlags", self._rt.cudaStreamCreateWithFlags(flags))
        self._in, self._out = _Buffer(), _Buffer()
        self._torch_out: torch.Tensor | None = None
        self.input_shape: Shape = ()
        self.output_shape: Shape = ()
        inp = self.meta.details["inputs"][0]
        try:
            self.set_input_shape(inp["profile"]["opt"] if "profile" in inp else inp["shape"])
        except BaseException:
            self.close()
            raise

    def _refuse_mismatch(self, trt_version: str) -> None:
        props = cuda_check("cudaGetDeviceProperties", self._rt.cudaGetDeviceProperties(self.device))
        name = props.name.decode(errors="replace").rstrip("\0")  # the name torch and nvidia-smi report
        why = sidecar_mismatch(self.meta, trt_version, name, f"{props.major}.{props.minor}")
        if why:
            raise InputError(f"{self.plan}: {why}; rebuild it here with python -m trt.build")

    def _deserialize(self) -> tensorrt.ICudaEngine:
        build = self.meta.details["build"]
        if build.get("version_compatible") and not build.get("exclude_lean_runtime"):
            self._runtime.engine_host_code_allowed = True  # the plan carries its lean runtime, which is host code
        engine = self._runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if engine is None:  # the stubs say ICudaEngine; the documented failure value is None
            raise ExportError(f"{self.plan}: TensorRT could not deserialize the engine: {self.last_error()}")
        return engine

    def _io_names(self) -> tuple[str, str]:
        import tensorrt as trt

        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ExportError(f"{self.plan}: expected one input and one output, found {inputs} and {outputs}")
        return inputs[0], outputs[0]

    def last_error(self) -> str:
        """TensorRT's last logged error, for the one-line message of a failed call."""
        return self._errors[-1] if self._errors else "no error reported"

    def set_input_shape(self, shape: Sequence[int]) -> None:
        """Set the input shape; the buffers are reallocated only when they must grow."""
        shape = tuple(int(d) for d in shape)
        check_shape(self.meta, shape)
        if self._dynamic and not self.context.set_input_shape(self.input_name, shape):
            raise InputError(f"{self.plan}: TensorRT refused input shape {fmt(shape)}: {self.last_error()}")
        out = _dims(self.context.get_tensor_shape(self.output_name))
        if min(out, default=0) < 0:
            raise ExportError(f"{self.plan}: output {self.output_name!r} has a data-dependent shape {fmt(out)}")
        self.input_shape, self.output_shape = shape, out
        for buf, dtype, s in ((self._in, self.input_dtype, shape), (self._out, self.output_dtype, out)):
            buf.reserve(self._rt, int(np.prod(s, dtype=np.int64)) * dtype.itemsize)
        self._host_in = pinned_array(self._in.host, self.input_dtype, shape)
        self._host_out = pinned_array(self._out.host, self.output_dtype, out)

    def bind(self, input_ptr: int | None = None, output_ptr: int | None = None) -> None:
        """Point the engine's input and output at device memory: the runner's own buffers unless given."""
        for name, ptr in ((self.input_name, self._in.device if input_ptr is None else input_ptr),
                          (self.output_name, self._out.device if output_ptr is None else output_ptr)):
            if not self.context.set_tensor_address(name, ptr):
                raise ExportError(f"{self.plan}: TensorRT refused the address of {name!r}: {self.last_error()}")

    def execute(self, stream: int | None = None) -> None:
        """Enqueue one inference on `stream` (the runner's by default); returns before it has run."""
        if not self.context.execute_async_v3(int(self.stream) if stream is None else stream):
            raise ExportError(f"{self.plan}: TensorRT execution failed: {self.last_error()}")

    def copy_to_device(self) -> None:
        """Enqueue the pinned host input's copy into the device input buffer on the runner's stream."""
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_check("cudaMemcpyAsync", self._rt.cudaMemcpyAsync(self._in.device, self._in.host, self._host_in.nbytes,
                                                               kind, self.stream))

    def copy_to_host(self) -> None:
        """Enqueue the device output's copy into the pinned host output on the runner's stream."""
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_check("cudaMemcpyAsync", self._rt.cudaMemcpyAsync(self._out.host, self._out.device,
                                                               self._host_out.nbytes, kind, self.stream))

    def synchronize(self) -> None:
        cuda_check("cudaStreamSynchronize", self._rt.cudaStreamSynchronize(self.stream))

    def load(self, x: np.ndarray) -> None:
        """Put `x` in the pinned host input (resizing for a new shape) and bind the runner's own buffers."""
        if x.dtype != self.input_dtype:
            raise InputError(f"{self.plan}: input {self.input_name!r} takes {self.input_dtype}, got {x.dtype}")
        if tuple(x.shape) != self.input_shape:
            self.set_input_shape(x.shape)
        np.copyto(self._host_in, x)
        self.bind()

    def infer(self, x: np.ndarray) -> np.ndarray:
        """x -> a new array with the engine's output; H2D, execute and D2H on the runner's stream, then a sync."""
        self.load(x)
        self.copy_to_device()
        self.execute()
        self.copy_to_host()
        self.synchronize()
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
        self.bind(x.data_ptr(), self._torch_out.data_ptr())
        self.execute(torch.cuda.current_stream(x.device).cuda_stream)
        return self._torch_out

    def close(self) -> None:
        """Free the buffers and the stream; safe to call twice."""
        if self.stream is None:
            return
        self.synchronize()
        self._torch_out = None
        for buf in (self._in, self._out):
            buf.free(self._rt)
        cuda_check("cudaStreamDestroy", self._rt.cudaStreamDestroy(self.stream))
        self.stream = None

    def __enter__(self) -> TrtRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
