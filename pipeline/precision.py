"""FP16 (Model Optimizer AutoCast) and INT8 Q/DQ (Model Optimizer PTQ) variants of an exported FP32 ONNX graph."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from pipeline import artifacts
from pipeline.config import check_choice
from pipeline.errors import ExportError
from pipeline.infer import ort_session
from pipeline.io import atomic_path
from pipeline.onnxinfo import graph_inputs

log = logging.getLogger("pipeline")

# Kept in FP32 in both variants: LayerNorm's variance and Softmax's exp overflow or lose too much in FP16, and the
# final upsample + argmax decide the labels (a near-tie flipped by FP16 rounding is a wrong pixel).
FP32_OPS = ("LayerNormalization", "Softmax", "Resize", "ArgMax")
INSTALL_HINT = "pip install -r requirements-quant.txt"
# Ops that pass the classifier's logits on to the output unchanged in meaning (labels graph: Resize -> ArgMax -> Cast).
_TAIL_OPS = {"Resize", "ArgMax", "Cast", "Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze"}

# Run in a child interpreter: modelopt patches ONNX Runtime's quantization registries and the logging setup of the
# whole process, and a native crash during calibration must surface as an ExportError, not end the pipeline.
_MODELOPT_CHILD = """
import importlib, json, sys
import numpy as np
# tensorrt-stubs (for mypy) leaves a bare `tensorrt/` folder that imports as an empty namespace package, which
# modelopt would take for TensorRT: hide it
try:
    if not hasattr(importlib.import_module("tensorrt"), "Logger"):
        sys.modules["tensorrt"] = None
except ImportError:
    pass
from modelopt.onnx.quantization import quantize
job = json.loads(sys.argv[1])
quantize(job.pop("onnx_path"), calibration_data=np.load(job.pop("calibration")), **job)
"""


@contextmanager
def temp_files_in(folder: str | os.PathLike) -> Iterator[Path]:
    """Every temporary file this process and its children make goes under `folder` for the duration, not the system
    temp dir: onnxslim, ONNX Runtime's quantizer and Model Optimizer call `tempfile` (a 0-byte `tmp*.onnx` of Model
    Optimizer's survived a SIGKILL in /tmp), and `folder`, inside the export's staging area, goes with it, or with
    the next export after a kill. `tempfile.tempdir` is the module's documented override; children get it as
    TMPDIR (`_run_child`)."""
    saved = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield Path(folder)
    finally:
        tempfile.tempdir = saved


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _require_modelopt(what: str) -> str:
    if importlib.util.find_spec("modelopt") is None or importlib.util.find_spec("modelopt.onnx") is None:
        raise ExportError(f"{what} needs NVIDIA Model Optimizer (nvidia-modelopt), which is not installed: "
                          f"{INSTALL_HINT}")
    return _version("nvidia-modelopt")


def _check_dst(dst: Path) -> None:
    if not dst.parent.is_dir():
        raise ExportError(f"{dst.parent}: output directory not found")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _load(src: Path):
    """The source graph with every node named (exclusions and reports address nodes by name)."""
    import onnx

    src = Path(src)
    if not src.is_file():
        raise ExportError(f"{src}: source ONNX model not found")
    try:
        model = onnx.load(str(src))
    except Exception as e:
        raise ExportError(f"{src}: not a readable ONNX model ({_first_line(e)})") from None
    names = {n.name for n in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
            while node.name in names:
                node.name += "_"
            names.add(node.name)
    return model


def _graph_input(model, src: Path) -> tuple[str, np.dtype, tuple[int | None, ...]]:
    """(name, dtype, dims with None for symbolic) of the graph's single input."""
    import onnx

    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise ExportError(f"{src}: expected one graph input, found {len(inputs)}")
    t = inputs[0].type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim)
    return inputs[0].name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)), dims


def output_tail(model) -> list[str]:
    """The last classifier: for each graph output, the last Conv before it plus the data-path nodes between them
    (upsample, argmax, cast). Empty when an output is not reached from a Conv through such nodes."""
    producer = {o: n for n in model.graph.node for o in n.output}
    tail: list[str] = []
    for out in model.graph.output:
        path, node = [], producer.get(out.name)
        while node is not None and node.op_type in _TAIL_OPS and len(path) < 8:
            path.append(node.name)
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "Conv":
            tail += [n for n in [*path, node.name] if n not in tail]
    return tail


def _calibration_frames(calibration, name: str, dtype: np.dtype, dims: tuple) -> np.ndarray:
    """N x frame in the graph's dtype; `frame` is the input shape without batch (N x 1 x frame is accepted too)."""
    frame = dims[1:]
    want = "N x " + " x ".join("?" if d is None else str(d) for d in frame) + f" {dtype}"
    try:
        x = np.asarray(calibration)
    except ValueError:
        raise ExportError(f"calibration data for input {name!r}: frames of different shapes; expected {want}") from None
    if x.ndim == len(dims) + 1 and x.shape[1] == 1:
        x = x[:, 0]
    found = " x ".join(map(str, x.shape)) + f" {x.dtype}"
    if (x.ndim != len(dims) or x.shape[0] == 0 or x.dtype != dtype
            or any(d is not None and d != s for d, s in zip(frame, x.shape[1:]))):
        raise ExportError(f"calibration data for input {name!r}: expected {want}, found {found}")
    return np.ascontiguousarray(x)


def _bypass_qdq(model, nodes: Sequence[str]) -> int:
    """Feed `nodes` the un-quantized tensor wherever they read a DequantizeLinear output (directly or through
    Casts): a Q/DQ pair placed for another consumer, or left over by modelopt's residual-input clean-up, must not
    round the input of a node kept out of INT8. Returns the number of inputs rewired; orphaned Q/DQ are removed."""
    producer = {o: n for n in model.graph.node for o in n.output}
    rewired, targets = 0, set(nodes)
    for node in model.graph.node:
        if node.name not in targets:
            continue
        for consumer, index in _dq_reads(node, producer):
            dq = producer[consumer.input[index]]
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue  # a weight DQ (constant INT8 initializer) has no float tensor to fall back on
            consumer.input[index] = q.input[0]
            rewired += 1
    _prune(model)
    return rewired


def _dq_reads(node, producer):
    """(consumer, input index) pairs where a DequantizeLinear output enters `node`, looking up through Casts."""
    for index, name in enumerate(node.input):
        consumer, src, at = node, producer.get(name), index
        while src is not None and src.op_type == "Cast":
            consumer, src, at = src, producer.get(src.input[0]), 0
        if src is not None and src.op_type == "DequantizeLinear":
            yield consumer, at


def _prune(model) -> None:
    """Drop the Q/DQ nodes nothing reads any more, and their scale / zero-point initializers."""
    graph = model.graph
    freed: set[str] = set()
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            freed.update(n.input)
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name in freed and i.name not in used]:
        graph.initializer.remove(init)


def _stamp(model, source, src: Path, precision: str, details: dict, tool: tuple[str, str], kind: str = "") -> None:
    """The source graph's metadata on the converted one; the pipeline's record (artifacts.Metadata), where the source
    carries one, becomes the derived kind's record (`kind`, by default onnx-<precision>) with what was done in
    `details`."""
    props = {p.key: p.value for p in source.metadata_props}
    if artifacts.ONNX_KEY in props:
        meta = artifacts.read_onnx(props, str(src))
        props |= replace(meta, kind=kind or f"onnx-{precision}", precision=precision,
                         versions={**meta.versions, tool[0]: tool[1]},
                         details={**details, "source_file": src.name}).onnx_props()
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)


def _finish(model, dst: Path, feed: np.ndarray | None) -> None:
    """Check the graph, run it once in ONNX Runtime CPU and move it onto `dst`."""
    import onnx

    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
        try:
            onnx.checker.check_model(str(tmp))
            sess = ort_session(tmp)
            inp = sess.get_inputs()[0]
            if feed is None:
                _, dtype, dims = _graph_input(model, dst)
                shape = [(1 if i == 0 else 64) if d is None else d for i, d in enumerate(dims)]
                feed = np.zeros(shape, dtype)
            sess.run(None, {inp.name: feed})
        except Exception as e:
            raise ExportError(f"{dst}: the converted model does not run in ONNX Runtime CPU "
                              f"({_first_line(e)})") from None


def _summary(model) -> dict:
    ops = Counter(n.op_type for n in model.graph.node)
    return {"nodes": len(model.graph.node), "op_counts": dict(sorted(ops.items())),
            "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)}


def _autocast(source, src: Path, dst: Path, keep_fp32_ops: Sequence[str]):
    """(FP16 copy of `source` with `keep_fp32_ops` in FP32 and the graph's I/O types kept, what was done): Model
    Optimizer AutoCast with an op block list (no calibration, deterministic). Q/DQ pairs stay, with FP16 scales."""
    import onnx

    _check_dst(dst)
    tool_version = _require_modelopt("FP16 conversion")
    from modelopt.onnx.autocast import convert_to_f16
    from modelopt.onnx.logging_config import configure_logging

    configure_logging(logging.WARNING)  # importing modelopt.onnx sets its loggers to INFO on stdout

    model = onnx.ModelProto()
    model.CopyFrom(source)  # the converter edits its argument; `source` keeps the FP32 metadata to copy back
    try:
        model = convert_to_f16(model, low_precision_type="fp16", keep_io_types=True,
                               op_block_list=list(keep_fp32_ops))
    except Exception as e:
        raise ExportError(f"{src}: FP16 conversion with nvidia-modelopt {tool_version} failed "
                          f"({_first_line(e)})") from None
    info = {"tool": "nvidia-modelopt autocast (convert_to_f16)", "version": tool_version,
            "fp32_op_types": list(keep_fp32_ops),
            "fp32_nodes": sum(n.op_type in keep_fp32_ops for n in model.graph.node), "io_types_kept": True,
            "fp16_initializers": sum(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer),
            **_summary(model)}
    return model, info


def to_fp16(src: Path, dst: Path, keep_fp32_ops: Sequence[str] = FP32_OPS) -> dict:
    """FP16 weights and activations except `keep_fp32_ops` (Cast nodes at their borders); graph inputs and
    outputs keep their types. Writes `dst` atomically and returns what was done."""
    src, dst = Path(src), Path(dst)
    source = _load(src)
    model, info = _autocast(source, src, dst, keep_fp32_ops)
    info = {"precision": "fp16", **info}
    _stamp(model, source, src, "fp16", {"conversion": info}, ("nvidia-modelopt", info["version"]))
    _finish(model, dst, None)
    return info


# The traced Q/DQ graph (pipeline/quant.py) runs everything that is not INT8 in FP16: LayerNormalization with FP16
# input and output still computes its statistics in FP32 (ONNX's stash_type=1, the default: inputs cast to float,
# normalised, cast back), so the Casts an FP32 LayerNorm needs at both borders go; Softmax's output is rounded to
# INT8 steps of 1/127 right after; the decode head's feature upsamples are plain interpolation. A labels graph keeps
# its final upsample and argmax in FP32 (AutoCast blocks by op type, so its feature upsamples stay FP32 as well).
QDQ_FP32_OPS: tuple[str, ...] = ()
QDQ_FP32_OPS_LABELS = ("Resize", "ArgMax")


def qdq_to_fp16(src: Path, dst: Path, kind: str, quantization: dict, feed: np.ndarray | None,
                keep_fp32_ops: Sequence[str] = QDQ_FP32_OPS) -> dict:
    """The traced Q/DQ graph `src` with everything that does not run in INT8 in FP16 (`keep_fp32_ops` in FP32):
    the strongly typed graph TensorRT builds as it is. Stamped as `kind` with `quantization` (what quant.py did)
    in its record; checked, run once on `feed` and written to `dst` atomically. Returns what was done."""
    src, dst = Path(src), Path(dst)
    source = _load(src)
    model, info = _autocast(source, src, dst, keep_fp32_ops)
    info = {**quantization, "precision": "int8", "high_precision": "fp16", "fp16_conversion": info,
            "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
            "quantized_nodes": _quantized_nodes(model), **_summary(model)}
    _stamp(model, source, src, "int8", {"quantization": info}, ("nvidia-modelopt", info["fp16_conversion"]["version"]),
           kind=kind)
    _finish(model, dst, feed)
    return info


def to_int8(src: Path, dst: Path, calibration: np.ndarray, method: str = "entropy", backend: str = "modelopt",
            exclude_op_types: Sequence[str] = ("Softmax", "LayerNormalization"), exclude_last_classifier: bool = True,
            high_precision: str = "fp16", keep_fp32_ops: Sequence[str] = FP32_OPS) -> dict:
    """INT8 Q/DQ graph calibrated on `calibration` (N real frames in the graph's input dtype and layout, N x frame
    or N x 1 x frame). Nodes of `exclude_op_types` and, with `exclude_last_classifier`, the last Conv before each
    output (with the upsample/argmax behind it) stay un-quantized and are not fed by Q/DQ.

    backend="modelopt": NVIDIA Model Optimizer ONNX PTQ calibrated with ONNX Runtime's CPU provider; everything
    not quantized runs in `high_precision` ("fp16" or "fp32"), `keep_fp32_ops` staying FP32 as in `to_fp16`.
    backend="ort": ONNX Runtime's own QDQ static quantizer (symmetric, per-channel weights, Q/DQ on the inputs of
    Conv/MatMul/Gemm only, entropy thresholds from a 2048-bin histogram), the fallback for machines without
    modelopt; the non-quantized part stays FP32. Writes `dst` atomically."""
    import onnx

    src, dst = Path(src), Path(dst)
    check_choice("export.calibration_method", method)
    check_choice("export.int8_backend", backend)
    source = _load(src)
    name, frames, step = _calibration_batches(source, src, calibration)
    excluded = output_tail(source) if exclude_last_classifier else []
    if exclude_last_classifier and not excluded:
        log.warning("%s: no Conv classifier found before the output; nothing excluded for it", src)
    skipped = [n.name for n in source.graph.node if n.op_type in exclude_op_types] + excluded
    if backend == "modelopt":
        tool, dist, tool_version = "nvidia-modelopt onnx PTQ", "nvidia-modelopt", _require_modelopt("INT8 quantization")
    else:
        tool, dist, tool_version, high_precision = ("onnxruntime quantize_static (QDQ)", "onnxruntime",
                                                    _version("onnxruntime"), "fp32")
    _check_dst(dst)

    # the work folder beside `dst` (in the export's staging area) also takes the tools' own temporary files
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp, temp_files_in(tmp):
        work, out = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        onnx.save(source, str(work))  # named nodes, external data inlined; the tools write beside it
        if backend == "modelopt":
            job = {"calibration_method": method, "op_types_to_exclude": list(exclude_op_types),
                   "nodes_to_exclude": [re.escape(n) + "$" for n in excluded],  # modelopt matches regexes
                   "op_types_to_exclude_fp16": list(keep_fp32_ops), "high_precision_dtype": high_precision}
            _modelopt_quantize(work, out, name, frames, step, job, src, f"nvidia-modelopt {tool_version}")
        else:
            _ort_quantize(work, out, name, frames, step, method, skipped, src)
        try:
            model = onnx.load(str(out))
        except Exception as e:
            raise ExportError(f"{src}: {tool} wrote no readable model ({_first_line(e)})") from None
        bypassed = _bypass_qdq(model, skipped)
        info = {"precision": "int8", "backend": backend, "tool": tool, "version": tool_version, "method": method,
                "frames": len(frames), "calibration_batch": step, "high_precision": high_precision,
                "excluded_op_types": list(exclude_op_types), "excluded_nodes": excluded,
                "quantized_nodes": _quantized_nodes(model), "qdq_bypassed": bypassed,
                "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in model.graph.node), **_summary(model)}
        _stamp(model, source, src, "int8", {"quantization": info}, (dist, tool_version))
        _finish(model, dst, frames[:step])
    return info


def _calibration_batches(source, src: Path, calibration) -> tuple[str, np.ndarray, int]:
    """(input name, frames, step): the calibration frames checked against the graph's input and cut to whole
    batches; a static batch B takes the frames B at a time (step B), a dynamic one, one at a time."""
    name, dtype, dims = _graph_input(source, src)
    frames = _calibration_frames(calibration, name, dtype, dims)
    step = dims[0] or 1
    usable = len(frames) - len(frames) % step
    if usable == 0:
        raise ExportError(f"calibration data: {len(frames)} frame(s) for a graph with static batch {step}; "
                          f"expected at least {step}")
    return name, frames[:usable], step


def _quantized_nodes(model) -> int:
    """Computing nodes that read a DequantizeLinear output."""
    producer = {o: n for n in model.graph.node for o in n.output}
    return len({n.name for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Shape",
                                                                       "Cast")
                and any(getattr(producer.get(i), "op_type", "") == "DequantizeLinear" for i in n.input)})


def _modelopt_quantize(work: Path, out: Path, name: str, frames: np.ndarray, step: int, job: dict, src: Path,
                       tool: str) -> None:
    """Model Optimizer's ONNX PTQ of `work` into `out`, calibrated on `frames` with ONNX Runtime CPU, in a child."""
    np.save(work.with_name("calibration.npy"), frames)
    job = {"onnx_path": str(work), "calibration": str(work.with_name("calibration.npy")), "quantize_mode": "int8",
           "calibration_eps": ["cpu"], "calibration_shapes": f"{name}:" + "x".join(map(str, (step, *frames.shape[1:]))),
           **job, "output_path": str(out), "log_level": "WARNING"}
    _run_child(_MODELOPT_CHILD, json.dumps(job), src, tool)


def _run_child(code: str, arg: str, src: Path, tool: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TMPDIR": tempfile.gettempdir()}
    with _child_process([sys.executable, "-c", code, arg], env) as proc:
        stdout, stderr = proc.communicate()
    for line in (stdout + stderr).splitlines():
        log.debug("quantize: %s", line)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        raise ExportError(f"{src}: INT8 quantization with {tool} failed "
                          f"({lines[-1] if lines else f'exit status {proc.returncode}'})")


@contextmanager
def _child_process(argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """`argv` as a child that dies with this process. It runs in a process group of its own, which is killed whole
    when the block ends, however it ends (an error, Ctrl-C: a terminal's SIGINT no longer reaches the group, we
    pass it on) and on SIGTERM; on Linux the kernel also sends it SIGKILL when we die without a chance to clean up
    (SIGKILL, a crash)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, preexec_fn=_parent_death_signal())
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_sigterm(signum, frame) -> None:
            _kill_group(proc)
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)  # then SIGTERM does what it did before the child was started

        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield proc
    finally:
        _kill_group(proc)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        for pipe in (proc.stdout, proc.stderr):
            pipe.close()
        proc.wait()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group keeps the child's pid as its id while any member lives
    except (ProcessLookupError, PermissionError):
        pass  # the child and everything it started have exited


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _parent_death_signal():
    """A preexec_fn asking the kernel to SIGKILL the child when the thread that started it dies (Linux; None
    elsewhere). The export starts it from its main thread, which lives as long as the pipeline."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect: nobody would send the signal
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


# The ORT backend places Q/DQ as TensorRT wants it: on the inputs of the compute-heavy ops only. Quantizing their
# outputs too (quantize_static's default) adds a rounding step before every bias add, and on a B0 costs about
# 14 dB of logit SQNR (16 dB against 30 dB on random weights).
_ORT_QUANT_OPS = ["Conv", "MatMul", "Gemm"]
# Entropy calibration as TensorRT's legacy calibrator does it: a 2048-bin histogram, thresholds searched over
# 128-bin quantizations. quantize_static builds its entropy calibrator with 128 and 128 bins, where the only
# threshold left is the full range, that is max calibration.
_ENTROPY_BINS, _ENTROPY_QUANT_BINS = 2048, 128


def _ort_quantize(work: Path, out: Path, name: str, frames: np.ndarray, step: int, method: str,
                  exclude: list[str], src: Path) -> None:
    from onnxruntime import quantization as oq

    feeds = [{name: frames[i:i + step]} for i in range(0, len(frames), step)]

    class Reader(oq.CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    # Symmetric INT8 activations and per-channel weights: the Q/DQ form TensorRT consumes.
    options: dict = {"ActivationSymmetric": True, "WeightSymmetric": True,
                     "OpTypesToExcludeOutputQuantization": _ORT_QUANT_OPS}
    try:
        if method == "entropy":
            options["TensorQuantOverrides"] = _entropy_ranges(work, feeds, exclude)
            log.info("INT8: entropy thresholds of %d activations", len(options["TensorQuantOverrides"]))
        oq.quantize_static(str(work), str(out), Reader(), quant_format=oq.QuantFormat.QDQ, per_channel=True,
                           activation_type=oq.QuantType.QInt8, weight_type=oq.QuantType.QInt8,
                           op_types_to_quantize=_ORT_QUANT_OPS, nodes_to_exclude=exclude,
                           calibrate_method=oq.CalibrationMethod.MinMax, extra_options=options)
    except Exception as e:
        raise ExportError(f"{src}: INT8 quantization with onnxruntime failed ({_first_line(e)})") from None


def _entropy_ranges(work: Path, feeds: list[dict], exclude: list[str]) -> dict[str, list[dict]]:
    """Entropy thresholds of the activations feeding the ops the ORT backend quantizes, as quantize_static's
    TensorQuantOverrides (symmetric: rmin = -rmax)."""
    import onnx

    model = onnx.load(str(work))
    weights = {i.name for i in model.graph.initializer}
    skip = set(exclude)
    wanted = sorted({i for n in model.graph.node if n.op_type in _ORT_QUANT_OPS and n.name not in skip
                     for i in n.input[:2] if i and i not in weights})
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in wanted if t not in outputs)
    probe = work.with_name("probe.onnx")
    onnx.save(model, str(probe))
    sess = ort_session(probe)
    # two passes: the largest |x| of each tensor fixes its histogram's range, then the histograms
    amax = dict.fromkeys(wanted, 0.0)
    for feed in feeds:
        for t, x in zip(wanted, sess.run(wanted, feed)):
            amax[t] = max(amax[t], float(np.abs(x).max()))
    hist = {t: np.zeros(_ENTROPY_BINS) for t in wanted}
    for feed in feeds:
        for t, x in zip(wanted, sess.run(wanted, feed)):
            if amax[t] > 0:
                hist[t] += np.histogram(np.abs(x), bins=_ENTROPY_BINS, range=(0.0, amax[t]))[0]
    overrides = {}
    for t in wanted:
        if amax[t] > 0:
            bound = np.float32(entropy_threshold(hist[t]) * amax[t] / _ENTROPY_BINS)
            overrides[t] = [{"rmin": -bound, "rmax": bound}]
    return overrides


def _kl_to_quantized(p: np.ndarray, kept: np.ndarray, levels: int) -> float:
    """KL divergence of the distribution `p` from the `levels`-level quantization of `kept` (the same bins without
    the clipped mass folded in), each level's mass spread evenly over the bins of its range that `kept` occupies."""
    starts = np.linspace(0, len(kept), levels + 1).astype(int)[:-1]
    used = kept > 0
    mass, count = np.add.reduceat(kept, starts), np.add.reduceat(used, starts)
    widths = np.diff(np.append(starts, len(kept)))
    q = np.repeat(np.divide(mass, count, out=np.zeros_like(mass), where=count > 0), widths) * used
    on = p > 0
    if (q[on] == 0).any():
        return float("inf")  # mass where the quantization has none: any threshold with full support beats it
    p, q = p[on] / p.sum(), q[on] / q.sum()
    return float(np.sum(p * np.log(p / q)))


def entropy_threshold(hist: np.ndarray, levels: int = _ENTROPY_QUANT_BINS, stride: int = 16) -> int:
    """Number of histogram bins (of |x|) to keep so that clipping the rest into the last kept bin and quantizing
    to `levels` levels loses the least information (minimum KL divergence): the entropy calibration of Migacz,
    "8-bit Inference with TensorRT" (GTC 2017). Candidates are searched every `stride` bins, then bin by bin around
    the best one."""
    n = len(hist)
    if n <= levels or hist.sum() == 0:
        return n

    def kl(i: int) -> float:
        kept = hist[:i].astype(np.float64)
        p = kept.copy()
        p[-1] += hist[i:].sum()
        return _kl_to_quantized(p, kept, levels)

    coarse = min(sorted({*range(levels, n + 1, stride), n}), key=kl)  # n: keep everything, always finite
    return min(range(max(levels, coarse - stride + 1), min(n, coarse + stride - 1) + 1), key=kl)
