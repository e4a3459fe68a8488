"""Run a TensorRT engine (TensorRT 10/11 tensor-address API, cuda-python stream): `TrtRunner` for the engines
trt/build.py writes, once their record fits this TensorRT and GPU (trt/engine.py's `EngineRunner` serves any other
engine on the same base). The timing loops over the runners' primitives are in trt/timing.py."""

from __future__ import annotations

import ctypes
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
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
    from typing_extensions import Self

log = logging.getLogger("pipeline")

Shape = tuple[int, ...]
NO_CUDA_PYTHON = ("cuda-python is not installed (pip install -e \".[cu12]\" or \".[cu13]\" on a CUDA machine, Jetson: "
                  "requirements-gpu-jetson.txt; docs/gpu.md)")
# TensorRT I/O types numpy can hold; BF16, FP8, FP4 and INT4 have no numpy type (trt.nptype refuses them too)
NUMPY_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64",
                "BOOL": "bool", "UINT8": "uint8"}
# the lean runtime library (libnvinfer_lean.so.N of the TensorRT that built a plan) for plans built without theirs
LEAN_RUNTIME_ENV = "TRANSKD_TRT_LEAN_RUNTIME"


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


# The later major versions that run a version-compatible plan (TensorRT support matrix 11.4, "Engine Portability":
# TensorRT 10 version-compatible engines run with a TensorRT 11 runtime and TensorRT 8 ones with a TensorRT 10
# runtime, no other pair across majors; the 10.x developer guide, "Version Compatibility", adds 8 with 9)
LATER_MAJORS = {8: (9, 10), 10: (11,)}


def version_problem(built: str, here: str, version_compatible: bool) -> str | None:
    """None when TensorRT `here` deserializes a plan TensorRT `built` made, else one line. TensorRT developer guide,
    "Compatibility Checks": a plan records the major, minor, patch and build of the library that made it and no
    other version deserializes it; "Version Compatibility": a version-compatible plan also runs on a later version of
    its major (10.13 -> 10.14, 11.0 -> 11.1) and of the majors in LATER_MAJORS. Whether the plan carries its lean
    runtime (exclude_lean_runtime) changes only what the runner must load, not which versions may run it."""
    b, h = _numbers(built), _numbers(here)
    if not version_compatible:
        return None if h == b else f"the engine was built with TensorRT {built} (here {here})"
    majors = (b[0], *LATER_MAJORS.get(b[0], ()))
    if h >= b and h[0] in majors:
        return None
    later = " or ".join(f"{m}.x" for m in majors)
    return (f"the engine was built version-compatible with TensorRT {built} (here {here}); it runs on {built} or a "
            f"later {later}")


def hardware_problem(compat: str, built_gpu: dict, gpu_name: str, compute_capability: str) -> str | None:
    """None when a plan of hardware-compatibility level `compat`, built on `built_gpu` (name, compute_capability),
    runs on this GPU, else one line. TensorRT developer guide, "Compatibility Checks": a plan records the compute
    capability it was built for and fails to deserialize on another unless built hardware-compatible; AMPERE_PLUS runs
    on Ampere and newer (8.0+), SAME_COMPUTE_CAPABILITY on GPUs of the same compute capability (NvInfer.h,
    HardwareCompatibilityLevel). Where TensorRT merely warns (another GPU model of the same compute capability), so do
    we (other_gpu_note): refusing more than TensorRT would turn away plans it runs."""
    cc, built_cc = _numbers(compute_capability), built_gpu["compute_capability"]
    if compat == "ampere+":
        fits, target = cc >= (8, 0), "Ampere or newer GPUs (compute capability 8.0 or more)"
    elif compat == "same":
        fits, target = cc == _numbers(built_cc), f"GPUs of compute capability {built_cc}"
    else:
        fits, target = cc == _numbers(built_cc), f"{built_gpu['name']} (GPUs of compute capability {built_cc})"
    return None if fits else f"the engine was built for {target} (here {gpu_name}, {compute_capability})"


def sidecar_mismatch(meta: Metadata, trt_version: str, gpu_name: str, compute_capability: str) -> str | None:
    """None when the engine of record `meta` may run with this TensorRT on this GPU, else one line saying what
    differs (version_problem, hardware_problem)."""
    build, gpu = meta.details["build"], meta.details["gpu"]
    problems = (version_problem(meta.details["tensorrt"], trt_version, bool(build.get("version_compatible"))),
                hardware_problem(build.get("hardware_compat", "none"), gpu, gpu_name, compute_capability))
    return "; ".join(p for p in problems if p) or None


def other_gpu_note(meta: Metadata, gpu_name: str) -> str | None:
    """A plain plan on another GPU model of its compute capability runs, but TensorRT warns where the device's
    properties differ (SM count, L2 cache, shared memory: "Compatibility Checks") and its kernels were timed on the
    model that built it; one line for the log, or None."""
    built = meta.details["gpu"]["name"]
    if meta.details["build"].get("hardware_compat", "none") != "none" or gpu_name == built:
        return None
    return (f"{meta.file}: built on {built}, running on {gpu_name}: its kernels were chosen there; rebuild it here "
            "for this GPU's best speed")


def lean_runtime_path(meta: Metadata, trt_version: str, given: str | os.PathLike | None, where: str) -> str | None:
    """The lean runtime library to deserialize the plan with, or None for this TensorRT's own runtime. A plan built
    version-compatible with --exclude-lean-runtime carries no runtime, so another TensorRT runs it only through the
    lean runtime of the version that built it (developer guide, "Version Compatibility", manually loading the
    runtime: IRuntime.load_runtime); the version that built it runs it itself. `given`, else
    $TRANSKD_TRT_LEAN_RUNTIME."""
    build, built = meta.details["build"], meta.details["tensorrt"]
    if not (build.get("version_compatible") and build.get("exclude_lean_runtime")):
        return None
    path = str(given) if given else os.environ.get(LEAN_RUNTIME_ENV) or None
    library = f"libnvinfer_lean.so.{_numbers(built)[0]} of TensorRT {built}"
    if path is None:
        if _numbers(trt_version) == _numbers(built):
            return None
        raise InputError(f"{where}: built version-compatible without its lean runtime (--exclude-lean-runtime) by "
                         f"TensorRT {built}, here {trt_version}: give {library} in {LEAN_RUNTIME_ENV}")
    if not Path(path).is_file():
        raise InputError(f"{where}: lean runtime {path}: no such file (expected {library})")
    return path


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


@contextmanager
def current_device(rt: Any, device: int) -> Iterator[None]:
    """`device` as CUDA's current device inside the block, the caller's again after it: allocations, events, stream
    capture and launches belong to the current device (CUDA programming guide, multi-device system)."""
    previous = cuda_check("cudaGetDevice", rt.cudaGetDevice())
    if previous != device:
        cuda_check("cudaSetDevice", rt.cudaSetDevice(device))
    try:
        yield
    finally:
        if previous != device:
            cuda_check("cudaSetDevice", rt.cudaSetDevice(previous))


def open_engine(plan: Path, errors: list[str], lean_runtime: str | None,
                host_code: bool) -> tuple[tuple[Any, ...], tensorrt.ICudaEngine]:
    """Deserialize `plan` with this TensorRT's runtime, or with the lean runtime library `lean_runtime` it loads;
    `host_code` lets the runtime run the host code a version-compatible plan carries (trusted plans only; trtexec sets
    it for every version-compatible plan, samples/common/sampleEngines.cpp). Returns what must outlive the engine (the
    logger and the runtimes, the loading one included) and the engine."""
    import tensorrt as trt

    logger = trt_logger(errors)
    runtime = trt.Runtime(logger)
    keep: tuple[Any, ...] = (logger, runtime)
    if lean_runtime:
        loaded = runtime.load_runtime(lean_runtime)
        if loaded is None:  # the stubs say Runtime; the documented failure value is None
            raise ExportError(f"{plan}: TensorRT could not load the lean runtime {lean_runtime}: "
                              f"{errors[-1] if errors else 'no error reported'}")
        runtime, keep = loaded, (*keep, loaded)
    if host_code:
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:  # the stubs say ICudaEngine; the documented failure value is None
        raise ExportError(f"{plan}: TensorRT could not deserialize the engine: "
                          f"{errors[-1] if errors else 'no error reported'}")
    return keep, engine


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


class EngineBase:
    """What every runner has: an engine's execution context on a non-blocking stream of its own on one device, and
    the primitives trt/timing.py times (`bind`, `copy_to_device`, `execute`, `copy_to_host` on `stream`)."""

    plan: Path
    device: int
    context: tensorrt.IExecutionContext
    stream: Any
    _rt: Any
    _errors: list[str]

    def _make_context(self, engine: tensorrt.ICudaEngine) -> None:
        context = engine.create_execution_context()
        if context is None:  # as for the engine: None on failure, typically out of GPU memory
            raise ExportError(f"{self.plan}: TensorRT could not create an execution context: {self.last_error()}")
        self.context = context
        # TensorRT documents that the default stream costs extra synchronisation: use a non-blocking one of our own
        flags = self._rt.cudaStreamNonBlocking
        self.stream = cuda_check("cudaStreamCreateWithFlags", self._rt.cudaStreamCreateWithFlags(flags))

    def last_error(self) -> str:
        """TensorRT's last logged error, for the one-line message of a failed call."""
        return self._errors[-1] if self._errors else "no error reported"

    def on_device(self) -> AbstractContextManager[None]:
        """The runner's device as the current one inside the block (current_device)."""
        return current_device(self._rt, self.device)

    def execute(self, stream: int | None = None) -> None:
        """Enqueue one inference on `stream` (the runner's by default); returns before it has run."""
        if not self.context.execute_async_v3(int(self.stream) if stream is None else stream):
            raise ExportError(f"{self.plan}: TensorRT execution failed: {self.last_error()}")

    def synchronize(self) -> None:
        cuda_check("cudaStreamSynchronize", self._rt.cudaStreamSynchronize(self.stream))

    def _copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        kinds = self._rt.cudaMemcpyKind
        cuda_check("cudaMemcpyAsync", self._rt.cudaMemcpyAsync(dst, src, nbytes, getattr(kinds, kind), self.stream))

    def bind(self) -> None:
        raise NotImplementedError

    def copy_to_device(self) -> None:
        raise NotImplementedError

    def copy_to_host(self) -> None:
        raise NotImplementedError

    def _free(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free the buffers and the stream; safe to call twice."""
        if getattr(self, "stream", None) is None:
            return
        with self.on_device():
            self.synchronize()
            self._free()
            cuda_check("cudaStreamDestroy", self._rt.cudaStreamDestroy(self.stream))
        self.stream = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrtRunner(EngineBase):
    """One engine of this pipeline (its record beside it), one execution context and one non-blocking stream; one
    input tensor and one output tensor. `infer` serves numpy through pinned host buffers, `infer_torch` CUDA tensors
    in place; `load`, `bind`, `copy_to_device`, `execute` and `copy_to_host` are the steps trt/timing.py times on
    `stream`. `lean_runtime` (else $TRANSKD_TRT_LEAN_RUNTIME): the lean runtime library a plan built with
    --exclude-lean-runtime needs on another TensorRT (lean_runtime_path)."""

    def __init__(self, plan: str | os.PathLike, device: int = 0, lean_runtime: str | os.PathLike | None = None) -> None:
        self.plan, self.device = Path(plan), device
        self.meta = load_sidecar(self.plan)  # first: a bad record is refused on any machine, before TensorRT
        self._rt = require_runtime(self.plan)
        import tensorrt as trt

        cuda_check("cudaSetDevice", self._rt.cudaSetDevice(device))
        self._refuse_mismatch(trt.__version__)
        lean = lean_runtime_path(self.meta, trt.__version__, lean_runtime, str(self.plan))
        self._errors: list[str] = []
        # the runtimes are kept: a runtime must outlive its engine, and the loading one the lean one it loaded
        self._runtimes, self.engine = open_engine(self.plan, self._errors, lean,
                                                  bool(self.meta.details["build"].get("version_compatible")))
        self.input_name, self.output_name = self._io_names()
        self.input_dtype, self.output_dtype = (numpy_dtype(self.engine.get_tensor_dtype(n).name, f"{self.plan} {n!r}")
                                               for n in (self.input_name, self.output_name))
        self._dynamic = min(_dims(self.engine.get_tensor_shape(self.input_name)), default=0) < 0
        self._make_context(self.engine)
        self._in, self._out = _Buffer(), _Buffer()
        self._torch_out: torch.Tensor | None = None
        self._torch_stream: Any = None
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
        note = other_gpu_note(self.meta, name)
        if note:
            log.warning(note)

    def _io_names(self) -> tuple[str, str]:
        import tensorrt as trt

        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ExportError(f"{self.plan}: expected one input and one output, found {inputs} and {outputs}")
        return inputs[0], outputs[0]

    def set_input_shape(self, shape: Sequence[int]) -> None:
        """Set the input shape; the buffers are reallocated (on the runner's device) only when they must grow."""
        shape = tuple(int(d) for d in shape)
        check_shape(self.meta, shape)
        if self._dynamic and not self.context.set_input_shape(self.input_name, shape):
            raise InputError(f"{self.plan}: TensorRT refused input shape {fmt(shape)}: {self.last_error()}")
        out = _dims(self.context.get_tensor_shape(self.output_name))
        if min(out, default=0) < 0:
            raise ExportError(f"{self.plan}: output {self.output_name!r} has a data-dependent shape {fmt(out)}")
        self.input_shape, self.output_shape = shape, out
        with self.on_device():
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

    def copy_to_device(self) -> None:
        """Enqueue the pinned host input's copy into the device input buffer on the runner's stream."""
        self._copy(self._in.device, self._in.host, self._host_in.nbytes, "cudaMemcpyHostToDevice")

    def copy_to_host(self) -> None:
        """Enqueue the device output's copy into the pinned host output on the runner's stream."""
        self._copy(self._out.host, self._out.device, self._host_out.nbytes, "cudaMemcpyDeviceToHost")

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
        with self.on_device():
            self.copy_to_device()
            self.execute()
            self.copy_to_host()
            self.synchronize()
        return self._host_out.copy()

    def infer_torch(self, x: torch.Tensor) -> torch.Tensor:
        """x a CUDA tensor on the runner's device, read in place; the output tensor is allocated once per shape and
        overwritten by the next call. The engine runs on the runner's own stream, ordered after the work the caller
        has queued on torch's current stream and before what it queues next, as if it ran there."""
        import torch

        dtype = torch.from_numpy(np.empty(0, self.input_dtype)).dtype
        if not x.is_cuda or x.device.index != self.device or x.dtype != dtype:
            raise InputError(f"{self.plan}: input {self.input_name!r} takes {dtype} on cuda:{self.device}, "
                             f"got {x.dtype} on {x.device}")
        with torch.cuda.device(x.device):
            x = x.contiguous()
            if tuple(x.shape) != self.input_shape:
                self.set_input_shape(x.shape)
            if self._torch_out is None or tuple(self._torch_out.shape) != self.output_shape:
                out_dtype = torch.from_numpy(np.empty(0, self.output_dtype)).dtype
                self._torch_out = torch.empty(self.output_shape, dtype=out_dtype, device=x.device)
            # not torch's current stream, usually the legacy default one, on which TensorRT adds synchronisation
            # (and warns): the runner's stream, waiting on the caller's and waited on by it (events under the hood)
            if self._torch_stream is None:
                self._torch_stream = torch.cuda.ExternalStream(int(self.stream), device=x.device)
            caller, ours = torch.cuda.current_stream(x.device), self._torch_stream
            ours.wait_stream(caller)
            self.bind(x.data_ptr(), self._torch_out.data_ptr())
            self.execute()
            caller.wait_stream(ours)
            # x may be freed once we return; the caching allocator must not hand its memory to other work before the
            # engine has read it (the output is freed only by this runner, after the caller's stream waited on ours)
            x.record_stream(ours)
        return self._torch_out

    def _free(self) -> None:
        self._torch_out = self._torch_stream = None
        for buf in (self._in, self._out):
            buf.free(self._rt)
