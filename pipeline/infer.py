"""The runners: PyTorch, ONNX Runtime and TensorRT backends (run, infer, sync), and Segmenter over them.

Segmenter takes BGR uint8 frames and gives class ids at the frames' own resolution; export parity, accuracy, bench, the
ROS node and the bag tools all come through here. `ort_session` is the one ONNX Runtime session constructor
(precision.py uses it for its converted-model smoke run and its entropy-calibration probe).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import cv2
import numpy as np

from pipeline import artifacts
from pipeline.artifacts import ENGINE_SUFFIXES, Metadata
from pipeline.data.transforms import network_input
from pipeline.errors import InputError

if TYPE_CHECKING:  # torch is imported where a PyTorch model runs: engines and ONNX files run without it
    import torch

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
PROVIDER_ORDER = ("tensorrt", "cuda", "cpu")  # each takes the nodes the one before it does not
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # our names -> torch's
TORCH_DTYPES = ("auto", *DTYPES)  # auto: pipeline.amp.choose, bf16 only where the device computes it natively
TORCH_MODES = ("eager", "compile", "cudagraph")
TRT_CACHE = "trt_cache"  # beside the ONNX file: ONNX Runtime's TensorRT engine and timing caches
# what each backend imports (besides numpy, OpenCV and PyYAML, which every path needs)
RUNTIME_PACKAGES = {"tensorrt": ("tensorrt", "cuda-bindings"), "onnx": ("onnx", "onnxruntime"),
                    "checkpoint": ("torch", "safetensors")}
# module -> the pip package that installs it, where the names differ
PIP_NAMES = {"cuda": "cuda-bindings", "cv2": "opencv-python-headless", "yaml": "pyyaml"}
ALLOW = "allow fallback to run it there (--allow-fallback, allow_fallback=True)"


class Backend(Protocol):
    """Runs the network on one prepared batch: `run` gives the primary output (the deployed contract's one), `infer`
    every output by name as host arrays; `sync` waits for queued device work (for timing)."""

    name: str
    device: str

    def run(self, x: np.ndarray) -> np.ndarray | torch.Tensor: ...

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]: ...

    def sync(self) -> None: ...


def resolve_provider(provider: str, allow_fallback: bool = False) -> tuple[str, list[str]]:
    """(the provider the session is to run on, our names of its chain) for cpu, cuda, tensorrt or auto (the fastest
    one installed, never refused). An asked provider this ONNX Runtime lacks is refused in one line naming the one it
    would get, unless `allow_fallback`: then the next installed one down the chain tensorrt -> cuda -> cpu. Two ONNX
    Runtime distributions in one environment (onnxruntime and onnxruntime-gpu) are refused first (pipeline.deps)."""
    from pipeline.deps import onnxruntime_problem

    problem = onnxruntime_problem()
    if problem:
        raise InputError(problem)
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider != "auto" and provider not in PROVIDERS:
        raise InputError(f"provider {provider!r}: expected auto, {', '.join(PROVIDERS)}")
    start = 0 if provider == "auto" else PROVIDER_ORDER.index(provider)
    chain = [p for p in PROVIDER_ORDER[start:] if PROVIDERS[p] in available]
    got = chain[0] if chain else "cpu"
    if provider not in ("auto", got) and not allow_fallback:
        raise InputError(f"provider {provider} asked, {got} got: ONNX Runtime {ort.__version__} here offers only "
                         f"{', '.join(available)} (the GPU providers come with onnxruntime-gpu); {ALLOW}")
    return got, chain


def session_provider(session) -> str:
    """The provider an ONNX Runtime session actually runs on (its first registered one), in our names: ONNX Runtime
    drops a GPU provider it cannot load (CUDA or TensorRT libraries missing) with no more than a log line."""
    first = session.get_providers()[0]
    return next((ours for ours, theirs in PROVIDERS.items() if theirs == first), first)


def provider_options(chain: Sequence[str], *, device_id: int = 0, precision: str = "fp32",
                     inputs: Sequence[tuple[str, Sequence[int | str | None]]] = (),
                     shapes: dict[str, tuple[int, ...]] | None = None,
                     cache_dir: str | Path | None = None) -> list[tuple[str, dict]]:
    """ONNX Runtime's (provider, options) list for our chain, with the options ONNX Runtime documents
    (execution-providers/TensorRT-ExecutionProvider and CUDA-ExecutionProvider pages): the GPU providers on
    `device_id`; TensorRT with its engine cache and timing cache in `cache_dir` (saving the engine build on the
    next session), FP16 kernels allowed for an FP16 graph and INT8 plus FP16 for a Q/DQ graph (ONNX Runtime's
    provider drives TensorRT 10 weakly typed, where a builder flag, not the tensor types, lets a layer run in
    reduced precision; Q/DQ graphs take INT8 mode with no calibration table), and for the dynamic `inputs` an
    explicit profile min = opt = max = the shapes the caller will run (trtexec --shapes). The docs want all three
    profile options for every dynamic input or none: an input missing from `shapes` leaves the profile to ONNX
    Runtime, which derives it from the tensors it is given."""
    out: list[tuple[str, dict]] = []
    for p in chain:
        opts: dict = {}
        if p == "cuda":
            opts = {"device_id": device_id}
        elif p == "tensorrt":
            opts = {"device_id": device_id, "trt_fp16_enable": precision in ("fp16", "int8"),
                    "trt_int8_enable": precision == "int8"}
            if cache_dir is not None:
                opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                            trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir))
            dynamic = [name for name, dims in inputs if any(not isinstance(d, int) or d < 0 for d in dims)]
            if dynamic and all(name in (shapes or {}) for name in dynamic):
                profile = ",".join(f"{name}:{'x'.join(map(str, (shapes or {})[name]))}" for name in dynamic)
                opts.update(trt_profile_min_shapes=profile, trt_profile_opt_shapes=profile,
                            trt_profile_max_shapes=profile)
        out.append((PROVIDERS[p], opts))
    return out


def _tensorrt_settings(path: Path, shapes: dict[str, tuple[int, ...]] | None, cache_dir: str | Path | None) -> dict:
    """provider_options' graph-dependent arguments for TensorRT: the graph's precision and inputs, the cache folder
    (made here; `<onnx folder>/trt_cache` by default)."""
    from pipeline.onnxinfo import inspect_onnx

    info = inspect_onnx(path)
    cache = Path(cache_dir) if cache_dir is not None else path.parent / TRT_CACHE
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{cache}: cannot make the TensorRT cache folder ({e.strerror or e}); give another "
                         "cache_dir") from None
    return {"precision": info.precision, "inputs": [(t.name, t.shape) for t in info.inputs], "shapes": shapes,
            "cache_dir": cache}


def ort_session(path: str | Path, provider: str = "cpu", threads: int = 0, *, allow_fallback: bool = False,
                shapes: dict[str, tuple[int, ...]] | None = None, cache_dir: str | Path | None = None,
                device_id: int = 0):
    """The one place an ONNX Runtime InferenceSession is made: every graph optimisation, errors-only logging (Q/DQ
    and FP16 graphs log a note per scale it cannot constant-fold and per kernel the CPU lacks, none of them
    failures), `threads` intra-op threads (0: ONNX Runtime's default), the provider chain with its options
    (provider_options; `shapes`: the input shapes the caller will run, for TensorRT's profile). A session that did
    not get the provider asked for (`session_provider`) is refused in one line unless `allow_fallback`."""
    import onnxruntime as ort

    path = Path(path)
    _, chain = resolve_provider(provider, allow_fallback)
    settings = _tensorrt_settings(path, shapes, cache_dir) if "tensorrt" in chain else {}
    if "tensorrt" in chain:
        _load_tensorrt_libraries()
    if any(p != "cpu" for p in chain):
        _load_cuda_libraries()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), opts,
                                       providers=provider_options(chain, device_id=device_id, **settings))
    except Exception as e:  # ORT raises its own Fail / InvalidGraph / NoSuchFile types
        raise InputError(f"{path}: ONNX Runtime cannot load it ({str(e).strip().splitlines()[0]})") from None
    ran = session_provider(session)
    if provider not in ("auto", ran) and not allow_fallback:
        raise InputError(f"{path}: provider {provider} asked, {ran} got: ONNX Runtime could not start "
                         f"{PROVIDERS[provider]} (its CUDA or TensorRT libraries are missing or do not match); "
                         f"{ALLOW}")
    return session


def _load_tensorrt_libraries() -> None:
    """Load pip's TensorRT libraries into the process where the tensorrt package is installed: its import loads
    libnvinfer.so.10 from the wheel's own folder, and the dynamic loader then resolves ONNX Runtime's TensorRT
    provider's libnvinfer.so.10 to it by name (the wheel's folder is on no library path)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass  # TensorRT from the system (a container, JetPack) is on the library path already


def _load_cuda_libraries() -> None:
    """The CUDA libraries of ONNX Runtime's GPU providers (cuDNN, cuBLAS) come the same way from torch's pip wheels
    where torch is installed (ONNX Runtime's CUDA provider page, "Compatibility with PyTorch"): imported here, only
    for a GPU provider, so CPU sessions, engines and the ROS node run without torch."""
    try:
        import torch  # noqa: F401
    except ImportError:
        pass  # the CUDA libraries from the system (a container, JetPack) are on the library path already


def cuda_index(device: str) -> int:
    """N of a cuda:N device (0 for any other), for ONNX Runtime's GPU providers."""
    head, _, index = device.partition(":")
    if head == "cuda" and index:
        if not index.isdigit():
            raise InputError(f"device {device!r}: expected cuda:N with N a GPU index")
        return int(index)
    return 0


def _fill_batch(x: np.ndarray, batch: int | None) -> np.ndarray:
    """`x` repeated up to a static batch (its last frame again), so a fixed-batch network takes fewer frames; the
    caller keeps the first len(x) results."""
    if batch is None or len(x) >= batch:
        return x
    return np.concatenate([x, np.repeat(x[-1:], batch - len(x), axis=0)])


class TorchBackend:
    """A PyTorch module on `device` in `dtype` (autocast), eager, torch.compile'd or replayed as a CUDA graph; `outputs`
    names what the module returns (a tensor, or a tuple of them)."""

    name = "torch"

    def __init__(self, model, device: str = "auto", dtype: str = "fp32", mode: str = "eager",
                 outputs: Sequence[str] = ("logits",)) -> None:
        import torch

        from pipeline.amp import choose

        if dtype not in TORCH_DTYPES:
            raise InputError(f"dtype {dtype!r}: expected one of {', '.join(TORCH_DTYPES)}")
        if mode not in TORCH_MODES:
            raise InputError(f"torch mode {mode!r}: expected one of {', '.join(TORCH_MODES)}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"device {device!r}: no CUDA GPU is visible to PyTorch here")
        if mode == "cudagraph" and not device.startswith("cuda"):
            raise InputError("torch mode cudagraph: needs a CUDA device")
        if dtype == "auto":  # the choice train.amp=auto makes on this device (pipeline/amp.py)
            dtype = choose("auto", device).name
        self.device, self.dtype, self.mode, self.precision = device, getattr(torch, DTYPES[dtype]), mode, dtype
        self.outputs = list(outputs)
        self.model = model.to(device).eval()
        if device.startswith("cuda"):
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if mode == "compile" else self.model
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in = torch.empty(0)
        self.static_out: tuple[torch.Tensor, ...] = ()

    def _call(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        import torch

        # autocast, as in training: LayerNorm and Softmax stay FP32, matmuls and convs run in fp16 / bf16
        with torch.inference_mode(), torch.autocast(t.device.type, self.dtype, enabled=self.dtype != torch.float32):
            out = self.forward(t)
            out = out if isinstance(out, (tuple, list)) else (out,)
            return tuple(o.float() if o.is_floating_point() else o for o in out)

    def _capture(self, x: np.ndarray) -> None:
        """One CUDA graph for this input shape, PyTorch's recipe (CUDA semantics, "CUDA Graphs"): warm-up on a side
        stream, then capture, whose own side stream torch.cuda.graph provides. All of it under the backend's device,
        so on cuda:1 the streams, the capture and the graph's memory pool are cuda:1's, not the current device's."""
        import torch

        with torch.cuda.device(self.device):
            self.static_in = torch.from_numpy(x).to(self.device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._call(self.static_in)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = self._call(self.static_in)

    def _outputs(self, x: np.ndarray) -> tuple[torch.Tensor, ...]:
        import torch

        if self.mode != "cudagraph":
            return self._call(torch.from_numpy(x).to(self.device, non_blocking=True))
        if self.graph is None or tuple(self.static_in.shape) != x.shape:
            self._capture(x)
        assert self.graph is not None
        with torch.cuda.device(self.device):  # the copy and the replay on the device's current stream
            self.static_in.copy_(torch.from_numpy(x), non_blocking=True)
            self.graph.replay()
        return self.static_out

    def run(self, x: np.ndarray) -> torch.Tensor:
        """The first output, on the backend's device (a CUDA graph's own buffer, which the next call overwrites)."""
        return self._outputs(x)[0]

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {name: t.cpu().numpy() for name, t in zip(self.outputs, self._outputs(x))}

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)


class OrtBackend:
    """ONNX Runtime with the input and the (static) primary output bound once and reused on every `run`."""

    name = "onnxruntime"

    def __init__(self, path: Path, provider: str = "auto", threads: int = 0, *, allow_fallback: bool = False,
                 shapes: dict[str, tuple[int, ...]] | None = None, cache_dir: str | Path | None = None,
                 device_id: int = 0) -> None:
        """ort_session's provider handling: `provider` is what was asked, `self.provider` what the session got."""
        self.path, self.asked = Path(path), provider
        self.session = ort_session(path, provider, threads, allow_fallback=allow_fallback, shapes=shapes,
                                   cache_dir=cache_dir, device_id=device_id)
        self.provider = session_provider(self.session)
        self.device = "cpu" if self.provider == "cpu" else f"cuda:{device_id}" if device_id else "cuda"
        (inp,), outs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name, self.outputs = inp.name, [o.name for o in outs]
        self.output_name = self.outputs[0]
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.binding = self.session.io_binding()
        # a static output is written straight into one buffer, bound once; a dynamic one is allocated per call
        self.out = None
        if all(isinstance(d, int) for d in outs[0].shape):
            self.out = np.empty(outs[0].shape, np.int32 if "int32" in outs[0].type else np.float32)
            self.binding.bind_output(self.output_name, "cpu", 0, self.out.dtype, list(self.out.shape),
                                     self.out.ctypes.data)

    def run(self, x: np.ndarray) -> np.ndarray:
        """The primary output for `x`; a static output is returned in the backend's own buffer, which the next call
        overwrites."""
        b = self.binding
        try:
            b.bind_cpu_input(self.input_name, x)
            if self.out is None:
                b.bind_output(self.output_name, "cpu")
            self.session.run_with_iobinding(b)
        except Exception as e:
            raise _run_error(self.path, e, x) from None
        return self.out if self.out is not None else b.copy_outputs_to_cpu()[0]

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every output for `x`, in new arrays; a fixed-batch graph takes fewer frames (see _fill_batch)."""
        feed = {self.input_name: _fill_batch(x, self.batch)}
        try:
            out = self.session.run(None, feed)
        except Exception as e:
            raise _run_error(self.path, e, x) from None
        return {name: v[:len(x)] for name, v in zip(self.outputs, out)}

    def sync(self) -> None:
        pass  # run_with_iobinding returns when the outputs are in host memory


def _run_error(path: Path, e: Exception, x: np.ndarray) -> InputError:
    """ONNX Runtime's failure while running a graph that loaded (a node that cannot execute in a changed or foreign
    graph; it raises its own types or a plain RuntimeError) as one line naming the file."""
    first = (str(e).strip() or type(e).__name__).splitlines()[0]
    return InputError(f"{path}: ONNX Runtime cannot run it on a {'x'.join(map(str, x.shape))} {x.dtype} input "
                      f"({first})")


class TrtBackend:
    """A TensorRT engine through trt/runtime.py (GPU machines with TensorRT only)."""

    name = "tensorrt"
    device = "cuda"

    def __init__(self, path: Path) -> None:
        from trt.runtime import TrtRunner

        self.runner = TrtRunner(path)

    def run(self, x: np.ndarray) -> np.ndarray:
        if tuple(x.shape) != tuple(self.runner.input_shape):
            self.runner.set_input_shape(x.shape)
        return self.runner.infer(x)

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {self.runner.output_name: self.run(x)}  # TrtRunner.infer returns a new array

    def sync(self) -> None:
        pass  # infer synchronises its stream


def upsampled_argmax(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """argmax over classes of C x h x w logits upsampled bilinearly to `size` (H, W), as uint8 ids, on the CPU.

    One class plane at a time, keeping the running maximum: OpenCV's INTER_LINEAR uses the half-pixel centres of
    F.interpolate(align_corners=False), and a strict `>` keeps the first of equal maxima as argmax does. From
    19 x 128 x 256 logits this is 1.5x (1080x1920) to 2.3x (720x1280) faster than resizing all planes at once and
    taking argmax over the last axis, an H x W x C array (benchmarks/results/postprocess_cpu-2core.md)."""
    h, w = size
    chw = np.asarray(logits, np.float32)
    if chw.shape[1:] == (h, w):
        return chw.argmax(0).astype(np.uint8)
    best = cv2.resize(chw[0], (w, h), interpolation=cv2.INTER_LINEAR)
    plane, wins = np.empty_like(best), np.empty((h, w), bool)
    ids = np.zeros((h, w), np.uint8)
    for c in range(1, chw.shape[0]):
        cv2.resize(chw[c], (w, h), dst=plane, interpolation=cv2.INTER_LINEAR)
        np.greater(plane, best, out=wins)
        np.maximum(best, plane, out=best)
        ids[wins] = c
    return ids


class Segmenter:
    """`Segmenter.open(path)`, then `predict(bgr)` -> class ids (uint8) at the frame's resolution. The network's
    contract (input, output, size, batch), classes, palette and normalisation come from the artifact's record
    (`meta`, an artifacts.Metadata)."""

    def __init__(self, backend: Backend, meta: Metadata, path: str | Path, size: tuple[int, int] | None = None,
                 default_size: tuple[int, int] | None = None) -> None:
        self.backend, self.meta, self.contract, self.path = backend, meta, meta.contract, Path(path)
        fixed = self.contract.fixed_size
        if size is not None and fixed is not None and tuple(size) != fixed:
            raise InputError(f"{path}: size {size[0]}x{size[1]} asked, but the network is fixed at "
                             f"{fixed[0]}x{fixed[1]}")
        wanted = size or default_size
        self.size = fixed or (tuple(wanted) if wanted else None)
        if len(meta.classes) > 256:
            raise InputError(f"{path}: {len(meta.classes)} classes do not fit the uint8 class-id map")
        self._lut = np.zeros((256, 3), np.uint8)
        self._lut[:len(meta.palette)] = np.asarray(meta.palette, np.uint8).reshape(-1, 3)
        self._bgr_lut = np.ascontiguousarray(self._lut[:, ::-1]).reshape(256, 1, 3)  # cv2.LUT's 3-channel table
        self._bufs: list[np.ndarray] = []  # network input batches, allocated once per shape and reused

    # ------------------------------------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, *, device: str = "auto", provider: str = "auto", threads: int = 0,
             dtype: str = "fp32", mode: str = "eager", deploy: bool = False,
             size: tuple[int, int] | None = None, default_size: tuple[int, int] | None = None,
             allow_fallback: bool = False, shapes: dict[str, tuple[int, ...]] | None = None,
             trt_cache: str | Path | None = None) -> Segmenter:
        """Picks the backend from the file: `.plan`/`.engine` TensorRT, `.onnx` ONNX Runtime (`provider`, refused
        when the session does not get it unless `allow_fallback`; on the GPU of a `device` cuda:N; `shapes` the input
        shapes it will run and `trt_cache` the cache folder, for the TensorRT provider: OrtBackend), anything
        else `load_model` reads (our safetensors, Hugging Face, NVlabs, mmseg) PyTorch on `device` in `dtype`
        (autocast; auto: pipeline.amp's choice for the device), `mode` eager, compile (torch.compile) or cudagraph;
        `deploy` runs the reparameterised copy the export traces (`deploy_copy`: folded decode head, Mix-FFN as
        convs; off: the model as trained).
        `size` fixes the network resolution where the artifact does not (PyTorch, dynamic ONNX) and must equal a
        static graph's; `default_size` is used only where the artifact fixes none. An ONNX file with a sidecar
        beside it must be the file that sidecar describes (sidecar_record)."""
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: no such artifact")
        try:
            return cls._open(path, device, provider, threads, dtype, mode, deploy, size, default_size,
                             allow_fallback, shapes, trt_cache)
        except ModuleNotFoundError as e:  # a deployment environment with only what its backend needs
            kind = "an engine" if path.suffix in ENGINE_SUFFIXES else "an ONNX file" if path.suffix == ".onnx" \
                else "a checkpoint"
            top = (e.name or "?").split(".")[0]
            raise InputError(f"{path}: running {kind} needs the Python module {top!r} (pip install "
                             f"{PIP_NAMES.get(top, top)}), which is not installed here (RUNTIME_PACKAGES in "
                             "pipeline/infer.py lists each backend's; docs/ros-and-bags.md has a tested recipe)") \
                from None

    @classmethod
    def _open(cls, path: Path, device: str, provider: str, threads: int, dtype: str, mode: str, deploy: bool,
              size: tuple[int, int] | None, default_size: tuple[int, int] | None, allow_fallback: bool,
              shapes: dict[str, tuple[int, ...]] | None, trt_cache: str | Path | None) -> Segmenter:
        if path.suffix in ENGINE_SUFFIXES:  # TrtRunner reads and checks the record before TensorRT reads the plan
            backend = TrtBackend(path)
            return cls(backend, backend.runner.meta, path, size, default_size)
        if path.suffix == ".onnx":
            side = sidecar_record(path)  # before the graph's bytes are parsed
            meta = onnx_record(path)
            if side is not None:
                _same_record(side, meta, path)
            ort = OrtBackend(path, provider, threads, allow_fallback=allow_fallback, shapes=shapes,
                             cache_dir=trt_cache, device_id=cuda_index(device))
            return cls(ort, meta, path, size, default_size)
        from pipeline.models import deploy_copy, load_model
        from pipeline.models.checkpoints import checkpoint_metadata

        model = load_model(path)
        meta = checkpoint_metadata(model, source=str(path))
        if deploy:
            model = deploy_copy(model)
        return cls(TorchBackend(model, device, dtype, mode), meta, path, size, default_size)

    # ------------------------------------------------------------------------------------------------ the path
    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    def _frames(self, images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
        if isinstance(images, np.ndarray) and images.ndim not in (3, 4):
            frames = [images]  # refused below, with its shape
        else:
            frames = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
        for f in frames:
            if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
                got = f"{f.dtype} {f.shape}" if isinstance(f, np.ndarray) else type(f).__name__
                raise InputError(f"{self.path.name}: expected H x W x 3 uint8 BGR frames, got {got}")
        if not frames:
            raise InputError(f"{self.path.name}: no frames to segment")
        return frames

    def preprocess(self, images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
        """The network inputs for `images`, in batches of the network's fixed batch (the last one padded with
        zeros) or one batch. Every frame goes through data.transforms.network_input (the preprocessing of
        training evaluation and of the export's parity check and calibration); with no fixed size all frames must
        share one. The returned arrays are reused by the next call: copy them to keep them."""
        frames = self._frames(images)
        h, w = self.size or frames[0].shape[:2]
        if self.size is None and any(f.shape[:2] != (h, w) for f in frames):
            raise InputError(f"{self.path.name}: frames of different sizes in one batch and no network size set")
        c, norm = self.contract, self.meta.normalization
        per = c.batch or len(frames)
        shape = (per, h, w, 3) if c.input == "uint8" else (per, 3, h, w)
        count = -(-len(frames) // per)
        if self._bufs and self._bufs[0].shape != shape:
            self._bufs = []
        while len(self._bufs) < count:
            self._bufs.append(np.empty(shape, np.uint8 if c.input == "uint8" else np.float32))
        for k in range(count):
            chunk = frames[k * per:(k + 1) * per]
            for i, f in enumerate(chunk):
                network_input(f, (h, w), norm.mean, norm.std, c.input, bgr=True, out=self._bufs[k][i])
            self._bufs[k][len(chunk):] = 0
        return self._bufs[:count]

    def postprocess(self, out: np.ndarray | torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Class ids at each frame's size: logits upsampled bilinearly then argmax (as the evaluator scores them; on
        the GPU where the output lives there), labels resized with nearest neighbour where the frame is not at the
        labels' size."""
        on_device = not isinstance(out, np.ndarray)  # a torch tensor (PyTorch backend), on the CPU or a GPU
        ids = []
        for i, (h, w) in enumerate(sizes):
            if self.contract.output == "logits" and on_device and out.device.type != "cpu":
                import torch.nn.functional as F

                up = F.interpolate(out[i:i + 1].float(), size=(h, w), mode="bilinear", align_corners=False)
                ids.append(up.argmax(1)[0].byte().cpu().numpy())
            elif self.contract.output == "logits":
                ids.append(upsampled_argmax(out[i].numpy() if on_device else out[i], (h, w)))
            else:
                lab = (out[i].cpu().numpy() if on_device else out[i]).astype(np.uint8)
                ids.append(lab if lab.shape == (h, w) else cv2.resize(lab, (w, h), interpolation=cv2.INTER_NEAREST))
        return ids

    def predict(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray | list[np.ndarray]:
        """H x W x 3 BGR uint8 -> H x W uint8 class ids; a batch (N x H x W x 3 or a list) -> N maps (an array
        when all frames share a size, else a list)."""
        frames = self._frames(images)
        ids: list[np.ndarray] = []
        batches = self.preprocess(frames)
        per = len(frames) if self.contract.batch is None else self.contract.batch
        for k, x in enumerate(batches):
            chunk = frames[k * per:(k + 1) * per]
            ids += self.postprocess(self.backend.run(x), [f.shape[:2] for f in chunk])
        if isinstance(images, np.ndarray) and images.ndim == 3:
            return ids[0]
        return np.stack(ids) if len({m.shape for m in ids}) == 1 else ids

    def colorize(self, ids: np.ndarray, image: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
        """The palette colours of `ids` as RGB uint8; blended over `image` (BGR uint8, same H x W) with weight
        `alpha` for the colours when given."""
        if image is not None and image.shape[:2] != ids.shape[:2]:
            raise InputError(f"colorize: image {image.shape[:2]} and class map {ids.shape[:2]} differ in size")
        # OpenCV's table lookup and blend in the camera's BGR order, one conversion to RGB at the end: the same bytes
        # as the numpy form (palette[ids] blended with a channel-reversed copy of the frame), 5 ms instead of 35 at
        # 1080x1920 on one core
        ids = np.ascontiguousarray(ids, np.uint8)
        bgr = cv2.LUT(cv2.merge((ids, ids, ids)), self._bgr_lut)
        if image is not None:
            bgr = cv2.addWeighted(bgr, alpha, np.ascontiguousarray(image), 1.0 - alpha, 0.0)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def describe(self) -> dict:
        c, b = self.contract, self.backend
        return {"artifact": str(self.path), "backend": b.name, "device": b.device,
                "precision": b.precision if isinstance(b, TorchBackend) else self.meta.precision,
                "input": c.input, "output": c.output, "size": list(self.size) if self.size else None,
                "batch": c.batch, "variant": self.meta.variant,
                **({"provider": b.provider} if isinstance(b, OrtBackend) else {}),
                **({"provider_asked": b.asked} if isinstance(b, OrtBackend) and b.asked != b.provider else {}),
                **({"mode": b.mode} if isinstance(b, TorchBackend) else {})}


def onnx_record(path: Path) -> Metadata:
    """The record an exported graph carries (artifacts.read_onnx), checked against the graph it sits in: one input
    and one output, and the input shape the record's contract describes."""
    from pipeline.onnxinfo import inspect_onnx

    info = inspect_onnx(path)
    if len(info.inputs) != 1 or len(info.outputs) != 1:
        raise InputError(f"{path}: expected one input and one output, found {len(info.inputs)} and "
                         f"{len(info.outputs)}")
    meta = artifacts.read_onnx(info.metadata, str(path))
    c = meta.contract
    if not c.dynamic and c.size:
        want = [c.batch, *c.size, 3] if c.input == "uint8" else [c.batch, 3, *c.size]
        got = list(info.inputs[0].shape)
        if got != want:
            raise InputError(f"{path}: the graph takes {'x'.join(map(str, got))} but its record says "
                             f"{'x'.join(map(str, want))}")
    return meta


def sidecar_record(path: Path) -> Metadata | None:
    """The validated record of `<path>.json` with the file's sha256 checked against it (artifacts.read_sidecar with
    verify), or None where the artifact has no sidecar: a graph then relies on the record it carries, and a change to
    its bytes that still parses (a weight) goes unnoticed; with the sidecar it is refused."""
    return artifacts.read_sidecar(path, verify=True) if artifacts.sidecar_path(path).is_file() else None


_OWN_FIELDS = ("file", "sha256", "bytes", "measured")  # what a sidecar adds to the record a graph carries
_ABSENT = object()


def _first_difference(a: object, b: object, name: str = "") -> str | None:
    """The dotted name of the first field where two JSON-like values differ; None when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key, _ABSENT), b.get(key, _ABSENT), f"{name}.{key}" if name else key)
            if found is not None:
                return found
        return None
    return None if a == b else name


def _same_record(side: Metadata, carried: Metadata, path: Path) -> None:
    """The sidecar repeats the record the graph carries (export writes it from that record), adding only its own
    fields; InputError naming the first field where they differ."""
    a, b = ({k: v for k, v in m.to_dict().items() if k not in _OWN_FIELDS} for m in (side, carried))
    field = _first_difference(a, b)
    if field is not None:
        raise InputError(f"{artifacts.sidecar_path(path)}: field {field!r} differs from the record {path.name} "
                         "carries; the sidecar belongs to another export (re-export, or remove the sidecar)")


__all__ = ["Backend", "OrtBackend", "Segmenter", "TorchBackend", "TrtBackend", "onnx_record", "ort_session",
           "provider_options", "resolve_provider", "session_provider", "sidecar_record", "upsampled_argmax"]
