"""ONNX -> TensorRT engine with the TensorRT 10 Python API, written with its artifact record; `python -m trt.build`."""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import artifacts
from pipeline.artifacts import ARTIFACTS, Metadata, sidecar_path
from pipeline.cli import Parser, cli_main
from pipeline.errors import ExportError, InputError
from pipeline.io import atomic_path, sha256_file
from pipeline.onnxinfo import OnnxInfo, Shape, Tensor, fmt, inspect_onnx, parse_shapes

if TYPE_CHECKING:
    import tensorrt

log = logging.getLogger("pipeline")

NOT_INSTALLED = 'TensorRT is not installed (pip install -e ".[cu12]" or ".[cu13]" on a CUDA machine: docs/gpu.md)'
HARDWARE_COMPAT = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same": "SAME_COMPUTE_CAPABILITY"}


def resolve_profile(inputs: Sequence[Tensor], min_shapes: Mapping[str, Sequence[int]] | None = None,
                    opt_shapes: Mapping[str, Sequence[int]] | None = None,
                    max_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) per input. A missing opt falls back to max then min, missing min/max to opt (trtexec's
    --shapes); a static input needs nothing, and any shape given for it must equal its static shape."""
    given = {"min": dict(min_shapes or {}), "opt": dict(opt_shapes or {}), "max": dict(max_shapes or {})}
    known = [t.name for t in inputs]
    for kind, shapes in given.items():
        for name in shapes:
            if name not in known:
                raise InputError(f"{kind} shape for {name!r}: the ONNX has no such input (inputs: {', '.join(known)})")
    profile = {}
    for t in inputs:
        mn, opt, mx = (tuple(given[k][t.name]) if t.name in given[k] else None for k in ("min", "opt", "max"))
        opt = opt or mx or mn
        if opt is None:
            if t.dynamic:
                raise InputError(f"input {t.name!r} has dynamic dims: give its opt (and min/max) shape, e.g. "
                                 f"--opt {t.name}:{fmt(t.shape)} with numbers for the <dims>")
            opt = tuple(int(d) for d in t.shape)
        mn, mx = mn or opt, mx or opt
        for kind, s in (("opt", opt), ("min", mn), ("max", mx)):  # opt first: min and max may be copies of it
            if len(s) != len(t.shape) or any(isinstance(w, int) and d != w for d, w in zip(s, t.shape)):
                raise InputError(f"{kind} shape {t.name}:{fmt(s)} does not fit the input's shape {fmt(t.shape)}")
        if any(a > b for a, b in zip(mn, opt)) or any(a > b for a, b in zip(opt, mx)):
            raise InputError(f"input {t.name!r}: expected min <= opt <= max in every dim, got min {fmt(mn)}, "
                             f"opt {fmt(opt)}, max {fmt(mx)}")
        profile[t.name] = (mn, opt, mx)
    return profile


def gpu_info() -> dict[str, str] | None:
    """Name and compute capability ("8.6") of the GPU TensorRT will build for, or None where none is visible."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    # a CPU build of torch on a GPU machine: ask the driver (which ignores CUDA_VISIBLE_DEVICES; first GPU)
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    name, _, cc = out.strip().partition("\n")[0].rpartition(",")
    return {"name": name.strip(), "compute_capability": cc.strip()} if name.strip() else None


def tensorrt_unavailable() -> str | None:
    """One line saying why no engine can be built here, or None when TensorRT and a CUDA GPU are usable."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer cannot be loaded
        first = (str(e) or type(e).__name__).splitlines()[0]
        return NOT_INSTALLED if isinstance(e, ModuleNotFoundError) else f"TensorRT cannot be loaded ({first})"
    # tensorrt-stubs (for mypy) installs a bare `tensorrt/` folder that imports as an empty namespace package
    if not hasattr(trt, "Builder"):
        return NOT_INSTALLED
    if int(trt.__version__.split(".")[0]) < 10:
        return f"TensorRT {trt.__version__} is too old (10.3 or later needed)"
    return None if gpu_info() else "no CUDA GPU is visible (torch.cuda and nvidia-smi found none)"


def timing_cache_path(cache_dir: str | os.PathLike, trt_version: str, gpu_name: str, compute_capability: str) -> Path:
    """A cache is only valid for one TensorRT version and GPU model, so both are in its name."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    version = re.sub(r"[^0-9A-Za-z.]+", "-", trt_version)
    return Path(cache_dir) / f"timing-{version}-{slug}-sm{compute_capability.replace('.', '')}.cache"


def trt_logger(errors: list[str]) -> tensorrt.ILogger:
    """TensorRT's messages into our log; errors also into `errors`, for the one-line message of a failed build."""
    import tensorrt as trt

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # pybind11 needs the base initialised explicitly

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            error = severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR)
            if error:
                errors.append(" ".join(msg.split()))
            log.log(logging.ERROR if error else logging.WARNING if severity == trt.ILogger.WARNING else logging.DEBUG,
                    "TensorRT: %s", msg)

    return Logger()




@dataclass(frozen=True)
class BuildOptions:
    """The builder settings; the plan's record keeps them in details.build."""

    workspace_gib: float = 4.0
    opt_level: int = 3
    hardware_compat: str = "none"  # a key of HARDWARE_COMPAT
    version_compatible: bool = False
    exclude_lean_runtime: bool = False

    def check(self) -> None:
        if not 0 <= self.opt_level <= 5:
            raise InputError(f"opt_level={self.opt_level}: expected 0..5")
        if not self.workspace_gib > 0:
            raise InputError(f"workspace_gib={self.workspace_gib}: expected > 0")
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise InputError(f"hardware_compat={self.hardware_compat!r}: expected one of {', '.join(HARDWARE_COMPAT)}")
        if self.exclude_lean_runtime and not self.version_compatible:
            raise InputError("exclude_lean_runtime only applies to a version-compatible build")


def source_record(onnx_path: Path, info: OnnxInfo) -> Metadata:
    """The record an exported graph carries; InputError for a graph this pipeline did not export, or one whose
    precision makes no engine kind of the artifact table (FP32: the run directory's engines are FP16 and INT8)."""
    record = artifacts.read_onnx(info.metadata, str(onnx_path))
    if artifacts.plan_kind(record.kind) is None:
        engines = artifacts.kinds("tensorrt")
        graphs = ", ".join(artifacts.run_file(ARTIFACTS[k].source) for k in engines)
        raise InputError(f"{onnx_path}: an {info.precision.upper()} graph makes no engine kind ({', '.join(engines)}); "
                         f"build from the FP16 or INT8 ONNX ({graphs})")
    return record


def engine_record(source: Metadata, info: OnnxInfo, profile: Mapping[str, tuple[Shape, Shape, Shape]],
                  options: BuildOptions, *, onnx_file: str, onnx_sha256: str, tensorrt: str, gpu: Mapping[str, str],
                  timing_cache: str | None, seconds: float) -> Metadata:
    """The plan's record: its source graph's record with the engine kind, and in `details` what the runtime checks
    before TensorRT reads the plan (TensorRT version, GPU, build settings, I/O tensors and the shape profile)."""
    def tensor(t: Tensor, ranges: tuple[Shape, Shape, Shape] | None = None) -> dict:
        given = {"profile": dict(zip(("min", "opt", "max"), map(list, ranges)))} if ranges else {}
        return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), **given}

    build = {"strongly_typed": True, **asdict(options), "timing_cache": timing_cache, "seconds": round(seconds, 1)}
    inputs = [tensor(t, profile[t.name] if t.dynamic else None) for t in info.inputs]
    details = {"tensorrt": tensorrt, "gpu": dict(gpu), "build": build, "inputs": inputs,
               "outputs": [tensor(t) for t in info.outputs], "source_file": onnx_file}
    return replace(source, kind=artifacts.plan_kind(source.kind) or "", precision=info.precision, source=onnx_file,
                   source_sha256=onnx_sha256, versions={**source.versions, "tensorrt": tensorrt}, measured={},
                   details=details)


def require_tensorrt(plan_path: Path, hardware_compat: str) -> dict[str, str]:
    """The GPU to build for (name, compute capability); ExportError where TensorRT or a fitting GPU is missing."""
    reason = tensorrt_unavailable()
    if reason:
        raise ExportError(f"{plan_path.name}: cannot build the engine: {reason}")
    gpu = gpu_info() or {"name": "unknown", "compute_capability": "0.0"}
    # NvInfer.h, HardwareCompatibilityLevel: AMPERE_PLUS builds on Ampere and later, SAME_COMPUTE_CAPABILITY on Turing
    # and later
    cc = tuple(int(p) for p in gpu["compute_capability"].split(".")[:2])
    least = {"ampere+": ((8, 0), "an Ampere"), "same": ((7, 5), "a Turing")}.get(hardware_compat)
    if least and cc < least[0]:
        raise ExportError(f"{plan_path.name}: hardware_compat {hardware_compat} needs {least[1]} or newer GPU, not "
                          f"{gpu['name']}")
    return gpu


def parse_network(builder: tensorrt.Builder, logger: tensorrt.ILogger,
                  onnx_path: Path) -> tuple[tensorrt.INetworkDefinition, tensorrt.OnnxParser]:
    """The ONNX as a strongly typed network: the precision is the graph's (FP32, FP16 casts or Q/DQ INT8); the
    weak-typing FP16/INT8 builder flags and implicit INT8 calibration are deprecated in TensorRT 10 and gone in 11.
    The parser owns the network's weights, so the caller keeps it until the build is done."""
    import tensorrt as trt

    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # by path, so external weights next to the ONNX are found
        why = "; ".join(str(parser.get_error(i)).strip().replace("\n", " ") for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT's ONNX parser failed: {why or 'no error reported'}")
    return network, parser


def builder_config(builder: tensorrt.Builder, options: BuildOptions) -> tensorrt.IBuilderConfig:
    import tensorrt as trt

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    config.builder_optimization_level = options.opt_level
    level = HARDWARE_COMPAT[options.hardware_compat]
    try:
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)
    except AttributeError:  # SAME_COMPUTE_CAPABILITY arrived after 10.3
        raise ExportError(f"hardware_compat {options.hardware_compat}: not in TensorRT {trt.__version__}") from None
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.exclude_lean_runtime:
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    return config


def add_profile(builder: tensorrt.Builder, config: tensorrt.IBuilderConfig, inputs: Sequence[Tensor],
                profile: Mapping[str, tuple[Shape, Shape, Shape]], onnx_path: Path) -> None:
    """The optimisation profile, which a network with dynamic inputs needs (a static one takes none)."""
    import tensorrt as trt

    if not any(t.dynamic for t in inputs):
        return
    shapes = builder.create_optimization_profile()
    for name, (mn, opt, mx) in profile.items():
        shapes.set_shape(name, trt.Dims(list(mn)), trt.Dims(list(opt)), trt.Dims(list(mx)))
    if config.add_optimization_profile(shapes) < 0:
        raise ExportError(f"{onnx_path}: TensorRT rejected the shape profile {dict(profile)}")


def load_timing_cache(config: tensorrt.IBuilderConfig, cache_dir: str | os.PathLike | None,
                      gpu: Mapping[str, str]) -> Path | None:
    """Give the builder the cache of this TensorRT version and GPU (a fresh one where it is missing or unusable);
    returns its file, or None without a cache folder."""
    import tensorrt as trt

    if cache_dir is None:
        return None
    cache_file = timing_cache_path(cache_dir, trt.__version__, gpu["name"], gpu["compute_capability"])
    data = cache_file.read_bytes() if cache_file.is_file() else b""
    try:  # a damaged file: TensorRT returns no cache, raises, or refuses it; then start a fresh one
        cache = config.create_timing_cache(data)
        usable = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    except (RuntimeError, TypeError):
        usable = False
    if not usable:
        log.warning("%s: unusable timing cache, starting a new one", cache_file)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return cache_file


def save_timing_cache(config: tensorrt.IBuilderConfig, cache_file: Path | None) -> None:
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file) as tmp:
            tmp.write_bytes(config.get_timing_cache().serialize())


def serialize(builder: tensorrt.Builder, network: tensorrt.INetworkDefinition, config: tensorrt.IBuilderConfig,
              onnx_path: Path, errors: Sequence[str]) -> tuple[tensorrt.IHostMemory, float]:
    """The serialized plan and the seconds the build took; ExportError with TensorRT's last error on failure."""
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:  # the stubs say IHostMemory; the documented failure value is None
        raise ExportError(f"{onnx_path}: TensorRT could not build the engine: {errors[-1] if errors else 'no error'}")
    return plan, seconds


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike | None = None, *,
                 min_shapes: Mapping[str, Sequence[int]] | None = None,
                 opt_shapes: Mapping[str, Sequence[int]] | None = None,
                 max_shapes: Mapping[str, Sequence[int]] | None = None,
                 workspace_gib: float = 4.0, opt_level: int = 3, timing_cache_dir: str | os.PathLike | None = None,
                 hardware_compat: str = "none", version_compatible: bool = False,
                 exclude_lean_runtime: bool = False) -> Metadata:
    """Build `plan_path` (default: the ONNX path with .plan) from a graph the export stage wrote, and its sidecar
    `<plan>.json`; returns the plan's record. Everything that needs no TensorRT (arguments, the ONNX and its record,
    the shape profile) is checked first, so bad input fails the same way on a CPU machine as on a GPU one: InputError
    for bad arguments or ONNX, ExportError where TensorRT is missing or the build fails; either way no plan is left."""
    onnx_path = Path(onnx_path)
    plan_path = Path(plan_path) if plan_path is not None else onnx_path.with_suffix(".plan")
    info = inspect_onnx(onnx_path)
    source = source_record(onnx_path, info)
    profile = resolve_profile(info.inputs, min_shapes, opt_shapes, max_shapes)
    if plan_path.resolve() == onnx_path.resolve():
        raise InputError(f"{plan_path}: the engine would overwrite its ONNX")
    options = BuildOptions(workspace_gib, opt_level, hardware_compat, version_compatible, exclude_lean_runtime)
    options.check()
    gpu = require_tensorrt(plan_path, hardware_compat)
    import tensorrt as trt

    errors: list[str] = []
    logger = trt_logger(errors)
    builder = trt.Builder(logger)
    network, onnx_parser = parse_network(builder, logger, onnx_path)  # onnx_parser owns the weights: kept to the end
    config = builder_config(builder, options)
    add_profile(builder, config, info.inputs, profile, onnx_path)
    cache_file = load_timing_cache(config, timing_cache_dir, gpu)
    log.info("building %s from %s (%s, TensorRT %s, %s)", plan_path.name, onnx_path.name, info.precision,
             trt.__version__, gpu["name"])
    plan, seconds = serialize(builder, network, config, onnx_path, errors)
    save_timing_cache(config, cache_file)

    meta = engine_record(source, info, profile, options, onnx_file=onnx_path.name,
                         onnx_sha256=sha256_file(onnx_path), tensorrt=trt.__version__, gpu=gpu,
                         timing_cache=cache_file.name if cache_file else None, seconds=seconds)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    meta = artifacts.save(plan_path, lambda staged: staged.write_bytes(plan), meta)
    log.info("wrote %s (%.1f MB, %.0f s) and %s", plan_path, meta.bytes / 1e6, seconds, sidecar_path(plan_path).name)
    return meta


def cli_parser() -> Parser:
    p = Parser(prog="python -m trt.build", description="ONNX -> TensorRT engine (strongly typed; the precision comes "
                                                        "from the ONNX) plus its artifact record.")
    p.add_argument("onnx", help="FP16 or Q/DQ INT8 ONNX file written by the export stage")
    p.add_argument("-o", "--output", help="engine file (default: the ONNX path with .plan)")
    for kind in ("min", "opt", "max"):
        p.add_argument(f"--{kind}", default="", help=f"{kind} shapes of dynamic inputs, e.g. image:1x3x512x1024")
    p.add_argument("--workspace", type=float, default=4.0, help="workspace limit in GiB (default 4)")
    p.add_argument("--opt-level", type=int, default=3, choices=range(6), help="builder optimization level")
    p.add_argument("--timing-cache", help="folder of timing caches kept across builds")
    p.add_argument("--hardware-compat", default="none", choices=list(HARDWARE_COMPAT))
    p.add_argument("--version-compatible", action="store_true",
                   help="plan also runs on later TensorRT of its major version, and a 10.x plan on 11.x")
    p.add_argument("--exclude-lean-runtime", action="store_true",
                   help="with --version-compatible: smaller plan; another TensorRT then runs it only with this "
                        "version's lean runtime library (TRANSKD_TRT_LEAN_RUNTIME)")
    p.add_argument("-v", "--verbose", action="store_true", help="also TensorRT's info messages")
    return p


def run(a: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.DEBUG if a.verbose or a.debug else logging.INFO, format="%(message)s")
    build_engine(a.onnx, a.output, min_shapes=parse_shapes(a.min), opt_shapes=parse_shapes(a.opt),
                 max_shapes=parse_shapes(a.max), workspace_gib=a.workspace, opt_level=a.opt_level,
                 timing_cache_dir=a.timing_cache, hardware_compat=a.hardware_compat,
                 version_compatible=a.version_compatible, exclude_lean_runtime=a.exclude_lean_runtime)


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(cli_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
