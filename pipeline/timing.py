"""The latency harness shared by `benchmarks/latency.py` and the bench stage: targets, interleaved timing, statistics.

Several artifacts are timed interleaved (round robin, the order alternating per round), so their ratios are
measured on the same machine state. "compute" is the network alone on a prepared batch (TensorRT: CUDA events
around execute_async_v3 or a CUDA graph launch, trt/timing.py); `e2e` also times a whole `predict` on camera
frames, with preprocessing, host<->device copies (TensorRT) and postprocessing reported separately. Statistics:
mean, std, min, p50, p90, p95, p99, max (linear-interpolated percentiles, numpy's default), throughput = batch / mean.
An artifact this pipeline did not make (an ONNX file without our record, an engine without its sidecar) is timed the
way trtexec times one: input names, shapes and dtypes from the graph or engine, the dynamic dims from --shapes or
--batch / --size, seeded random input, the network alone.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import InputError
from pipeline.onnxinfo import random_array

if TYPE_CHECKING:
    from pipeline.onnxinfo import Tensor

SCHEMA = "transkd-latency/1"
STATS = ("mean", "std", "min", "p50", "p90", "p95", "p99", "max")
Step = Callable[[int], dict[str, list[float]]]


def summarize(samples_ms: Sequence[float], batch: int = 1) -> dict:
    """Statistics of per-call times in milliseconds; throughput in images per second at `batch` per call."""
    a = np.asarray(samples_ms, np.float64)
    if a.size == 0:
        raise InputError("no timing samples: raise --iterations or --duration")
    p50, p90, p95, p99 = np.percentile(a, [50, 90, 95, 99])
    mean = float(a.mean())
    return {"count": int(a.size), "mean": mean, "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "p50": float(p50), "p90": float(p90), "p95": float(p95), "p99": float(p99),
            "max": float(a.max()), "throughput": 1e3 * batch / mean if mean > 0 else float("inf")}


def parse_amount(text: str, what: str) -> tuple[str, float]:
    """`50` -> ("count", 50); `2s` / `1.5s` -> ("seconds", 2.0)."""
    try:
        if text.endswith("s"):
            value, unit = float(text[:-1]), "seconds"
        else:
            value, unit = int(text), "count"
    except ValueError:
        raise InputError(f"{what} {text!r}: expected a count (50) or seconds (2s)") from None
    if value < 0 or (what != "--warmup" and value == 0):
        raise InputError(f"{what} {text!r}: expected a positive amount")
    return unit, float(value)


@dataclass
class Target:
    """One artifact with its settings; `step(n)` times n calls and returns {phase: [ms per call]}."""

    label: str
    kind: str  # engine | onnx | checkpoint
    path: Path
    options: dict
    info: dict = field(default_factory=dict)
    step: Step | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)


def camera_frames(batch: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Camera-like BGR frames: smooth gradients plus noise (constant frames would flatter some kernels)."""
    rng = np.random.default_rng(seed)
    h, w = size
    ramp = np.linspace(0, 200, w, dtype=np.float32)[None, :, None] + np.linspace(0, 55, h, dtype=np.float32)[:, None,
                                                                                                          None]
    return [np.clip(ramp + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8) for _ in range(batch)]


def _check_engine(path: Path, batch: int, size: tuple[int, int] | None) -> None:
    """The refusals that need no GPU, before TensorRT loads the engine: a missing file or sidecar, a batch or
    size outside the engine's profile."""
    from trt.runtime import check_shape, load_sidecar

    meta = load_sidecar(path)
    inp = meta.details["inputs"][0]
    nhwc = inp["dtype"] == "uint8"
    hw = tuple(size) if size else tuple(inp["shape"][1:3] if nhwc else inp["shape"][2:4])
    if not all(isinstance(d, int) for d in hw):
        raise InputError(f"{path}: the engine takes a range of sizes: give --size HxW")
    check_shape(meta, (batch, *hw, 3) if nhwc else (batch, 3, *hw))


def foreign(path: Path, kind: str) -> bool:
    """An artifact this pipeline did not make, timed the way trtexec times it: an ONNX file without our record in its
    metadata, an engine without its `<plan>.json` sidecar. A missing file is not foreign: the artifact's own path
    refuses it."""
    from pipeline.artifacts import ONNX_KEY, sidecar_path
    from pipeline.onnxinfo import inspect_onnx

    if not path.is_file():
        return False
    if kind == "onnx":
        return ONNX_KEY not in inspect_onnx(path).metadata
    return kind == "engine" and not sidecar_path(path).is_file()


def prepare(t: Target, batch: int, size: tuple[int, int] | None, frame_size: tuple[int, int] | None, e2e: bool,
            threads: int, cuda_graph: bool, *, shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Open the artifact, check the shape against it, and build the timed step. An artifact with our record goes
    through Segmenter (its contract); a foreign one (`foreign`) is timed on random input of the shapes its inputs
    take (`shapes`, trtexec's --shapes, else --batch and --size for the dynamic dims: onnxinfo.resolve_shapes)."""
    from pipeline.infer import Segmenter

    o = t.options
    if foreign(t.path, t.kind):
        _prepare_foreign(t, batch, size, e2e, threads, cuda_graph, shapes or {})
        return
    if shapes:
        raise InputError(f"{t.path}: --shapes is for graphs and engines without this pipeline's record; this one "
                         "has its contract: give --batch and --size")
    if t.kind == "engine":
        _check_engine(t.path, batch, size)
    seg = Segmenter.open(t.path, device=o.get("device", "auto"), provider=o.get("provider", "auto"), threads=threads,
                         dtype=o.get("dtype", "fp32"), mode=o.get("mode", "eager"), deploy=o.get("deploy", False),
                         size=size, allow_fallback=o.get("allow_fallback", False),
                         shapes=_run_shapes(t.path, batch, size) if t.kind == "onnx" else None)
    c = seg.contract
    if c.batch is not None and c.batch != batch:
        raise InputError(f"{t.path}: the network is fixed at batch {c.batch}, --batch {batch} asked")
    net = seg.size or size
    if net is None:
        raise InputError(f"{t.path}: the network takes any size: give --size HxW")
    frames = camera_frames(batch, frame_size or net)
    t.info = {**seg.describe(), **({"deploy_copy": o.get("deploy", False)} if t.kind == "checkpoint" else {}),
              "batch": batch, "size": f"{net[0]}x{net[1]}",
              "frame_size": f"{(frame_size or net)[0]}x{(frame_size or net)[1]}"}
    if t.kind == "engine":
        t.info["cuda_graph"] = cuda_graph
        t.step = _engine_step(seg, frames, e2e, cuda_graph)
    else:
        t.step = _host_step(seg, frames, e2e)


def _run_shapes(path: Path, batch: int, size: tuple[int, int] | None) -> dict[str, tuple[int, ...]] | None:
    """The input shapes one of our graphs will be timed at (for the TensorRT provider's profile), or None where
    they are not known yet: a dynamic H x W with no --size, which Segmenter's checks then name."""
    from pipeline.onnxinfo import inspect_onnx, resolve_shapes

    if not path.is_file():
        return None
    try:
        return resolve_shapes([(i.name, i.shape) for i in inspect_onnx(path).inputs], {}, batch, size)
    except InputError:
        return None


RANDOM_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                 "uint64", "bool")


def random_inputs(inputs: Sequence[Tensor], shapes: dict[str, tuple[int, ...]], seed: int = 0,
                  where: str = "") -> dict[str, np.ndarray]:
    """Seeded random input for every graph input at its resolved shape, in its dtype (onnxinfo.random_array says
    what values). A dtype numpy and ONNX Runtime cannot both hold (bfloat16, float8, string) is one line naming the
    input."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for t in inputs:
        if t.dtype not in RANDOM_DTYPES:
            raise InputError(f"{where}: input {t.name!r} is {t.dtype}: no random input of that type (timed types: "
                             f"{', '.join(RANDOM_DTYPES)})")
        feed[t.name] = random_array(np.dtype(t.dtype), shapes[t.name], rng)
    return feed


def _hw(shape: Sequence[int]) -> str:
    """"HxW" of a 4-D image shape (N x 3 x H x W, or N x H x W x 3 as resolve_shapes reads it), else "-"."""
    if len(shape) != 4:
        return "-"
    h, w = (shape[1], shape[2]) if shape[3] == 3 and shape[1] != 3 else (shape[2], shape[3])
    return f"{h}x{w}"


def _prepare_foreign(t: Target, batch: int, size: tuple[int, int] | None, e2e: bool, threads: int,
                     cuda_graph: bool, shapes: dict[str, tuple[int, ...]]) -> None:
    """A graph or engine without our record: its inputs from the graph (or engine), random data, the network alone."""
    if t.kind == "engine":
        _prepare_foreign_engine(t, batch, size, e2e, cuda_graph, shapes)
        return
    from pipeline.infer import cuda_index, ort_session, session_provider
    from pipeline.onnxinfo import fmt, inspect_onnx, resolve_shapes

    if e2e:
        raise InputError(f"{t.path}: --e2e times predict() on camera frames, which needs the contract of a graph "
                         "this pipeline exported; this one has none (time it without --e2e)")
    o, info = t.options, inspect_onnx(t.path)
    run = resolve_shapes([(i.name, i.shape) for i in info.inputs], shapes, batch, size, str(t.path))
    feed = random_inputs(info.inputs, run, where=str(t.path))
    device_id = cuda_index(o.get("device", "auto"))
    asked = o.get("provider", "auto")
    session = ort_session(t.path, asked, threads, allow_fallback=o.get("allow_fallback", False), shapes=run,
                          device_id=device_id)
    provider = session_provider(session)
    first = run[info.inputs[0].name] if info.inputs else ()
    t.info = {"artifact": str(t.path), "backend": "onnxruntime", "provider": provider,
              **({"provider_asked": asked} if asked != provider else {}),
              "device": "cpu" if provider == "cpu" else f"cuda:{device_id}" if device_id else "cuda",
              "precision": info.precision, "batch": first[0] if first else 1, "size": _hw(first), "foreign": True,
              "inputs": {i.name: f"{fmt(run[i.name])} {i.dtype}" for i in info.inputs},  # as trt.runtime.describe_io
              "outputs": {i.name: f"{fmt(i.shape)} {i.dtype}" for i in info.outputs}}
    t.step = _session_step(t.path, session, feed, "cpu" if provider == "cpu" else "cuda", device_id)


def _session_step(path: Path, session, feed: dict[str, np.ndarray], device: str, device_id: int) -> Step:
    """ONNX Runtime on inputs bound once where the provider computes (host memory, or the GPU's), outputs left on
    that device: the network alone, as trtexec's GPU compute time; ONNX Runtime synchronises its providers before
    run_with_iobinding returns."""
    import onnxruntime as ort

    binding = session.io_binding()
    for name, x in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, device, device_id))
    for out in session.get_outputs():
        binding.bind_output(out.name, device, device_id)

    def step(n: int) -> dict[str, list[float]]:
        ms = []
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                session.run_with_iobinding(binding)
            except Exception as e:  # ORT's own types: one line naming the file
                first = (str(e).strip() or type(e).__name__).splitlines()[0]
                raise InputError(f"{path}: ONNX Runtime cannot run it on the random input ({first})") from None
            ms.append((time.perf_counter() - t0) * 1e3)
        return {"compute": ms}

    return step


def _prepare_foreign_engine(t: Target, batch: int, size: tuple[int, int] | None, e2e: bool, cuda_graph: bool,
                            shapes: dict[str, tuple[int, ...]]) -> None:
    """An engine with no sidecar: trt/timing.py reads its inputs from the engine and times it (GPU machines only)."""
    try:
        from trt.timing import foreign_engine_step
    except ImportError as e:
        raise InputError(f"{t.path}: timing an engine needs TensorRT's runtime ({str(e).splitlines()[0]})") from None
    info, t.step = foreign_engine_step(t.path, shapes, batch, size, cuda_graph, e2e, seed=0)
    t.info = {"artifact": str(t.path), **info, "frame_size": info["size"], "cuda_graph": cuda_graph, "foreign": True}


def _predict_phases(seg, frames: list[np.ndarray]) -> Step:
    """A whole predict() on the frames, timed on the host phase by phase."""
    backend, sizes = seg.backend, [f.shape[:2] for f in frames]

    def step(n: int) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"preprocess": [], "postprocess": [], "end_to_end": []}
        for _ in range(n):
            t0 = time.perf_counter()
            xs = seg.preprocess(frames)[0]
            t1 = time.perf_counter()
            raw = backend.run(xs)
            backend.sync()
            t2 = time.perf_counter()
            seg.postprocess(raw, sizes)
            t3 = time.perf_counter()
            for k, v in zip(out, (t1 - t0, t3 - t2, t3 - t0)):
                out[k].append(v * 1e3)
        return out

    return step


def _host_step(seg, frames: list[np.ndarray], e2e: bool) -> Step:
    """PyTorch and ONNX Runtime: the network on one prepared batch, timed on the host around a sync."""
    backend, x = seg.backend, seg.preprocess(frames)[0].copy()
    phases = _predict_phases(seg, frames) if e2e else None

    def step(n: int) -> dict[str, list[float]]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            backend.run(x)
            backend.sync()
            out.append((time.perf_counter() - t0) * 1e3)
        return {"compute": out, **(phases(n) if phases else {})}

    return step


def _engine_step(seg, frames: list[np.ndarray], e2e: bool, cuda_graph: bool) -> Step:
    """TensorRT: CUDA events on the runner's stream (one capture per call when timing a CUDA graph)."""
    from trt.timing import time_compute, time_end_to_end

    runner, x = seg.backend.runner, seg.preprocess(frames)[0].copy()
    runner.set_input_shape(x.shape)
    phases = _predict_phases(seg, frames) if e2e else None

    def step(n: int) -> dict[str, list[float]]:
        ms = {"compute": time_compute(runner, n, 0, cuda_graph=cuda_graph)}
        if phases:
            copies = time_end_to_end(runner, x, n, 0)
            ms.update(h2d=copies["h2d"], d2h=copies["d2h"], **phases(n))
        return ms

    return step


def run_interleaved(targets: Sequence[Target], warmup: tuple[str, float], amount: tuple[str, float],
                    rounds: int) -> None:
    """Warm every target up, then `rounds` round-robin passes (order reversed every other round), each giving
    every target an equal share of the iterations or of the duration."""
    for t in targets:
        _repeat(t, warmup, keep=False)
    share = (amount[0], amount[1] / rounds if amount[0] == "seconds" else max(1, round(amount[1] / rounds)))
    for r in range(rounds):
        for t in (targets if r % 2 == 0 else list(reversed(targets))):
            _repeat(t, share, keep=True)


def _repeat(t: Target, amount: tuple[str, float], keep: bool) -> None:
    """`amount` calls of the target (one step), or calls one at a time until `amount` seconds have passed."""
    assert t.step is not None
    unit, value = amount
    if unit == "count":
        results = [t.step(int(value))] if value >= 1 else []
    else:
        results, start = [], time.perf_counter()
        while time.perf_counter() - start < value or (keep and not results):
            results.append(t.step(1))
    if keep:
        for ms in results:
            for k, v in ms.items():
                t.samples.setdefault(k, []).extend(v)


def machine() -> dict:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        import tensorrt

        info["tensorrt"] = getattr(tensorrt, "__version__", None)
    except ImportError:
        pass
    return info


def results(targets: Sequence[Target], batch: int, baseline: str | None) -> list[dict]:
    rows = []
    for t in targets:
        per = t.info.get("batch", batch)  # a foreign graph's own batch, where --shapes set it
        rows.append({"label": t.label, **t.info, **{phase: summarize(v, per) for phase, v in t.samples.items()}})
    if baseline is not None:
        base = next(r for r in rows if r["label"] == baseline)
        for r in rows:  # > 1: faster than the baseline; medians, robust to the odd slow call
            r["speedup_vs_baseline"] = base["compute"]["p50"] / r["compute"]["p50"]
    return rows


def table(rows: Sequence[dict]) -> str:
    base = any("speedup_vs_baseline" in r for r in rows)
    head = ["artifact", "backend", "device", "precision", "batch", "size", *[f"{s} ms" for s in STATS], "img/s"]
    lines = ["| " + " | ".join(head + (["speedup"] if base else [])) + " |",
             "|" + "---|" * 6 + "---:|" * (len(STATS) + 1 + base)]
    for r in rows:
        c = r["compute"]
        cells = [r["label"], r["backend"] + (f" ({r['provider']})" if "provider" in r else "")
                 + (f" ({r['mode']})" if r.get("mode", "eager") != "eager" else ""), r["device"], r["precision"],
                 str(r["batch"]), r["size"], *[f"{c[s]:.2f}" for s in STATS], f"{c['throughput']:.1f}"]
        if base:
            cells.append(f"{r['speedup_vs_baseline']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    if any("end_to_end" in r for r in rows):
        phases = ["preprocess", "h2d", "compute", "d2h", "postprocess", "end_to_end"]
        lines += ["", "end to end, mean ms per call (frames " + rows[0]["frame_size"] + "):", "",
                  "| artifact | " + " | ".join(phases) + " | end-to-end p99 | img/s |",
                  "|---|" + "---:|" * (len(phases) + 2)]
        for r in rows:
            cells = [f"{r[p]['mean']:.2f}" if p in r else "-" for p in phases]
            lines.append(f"| {r['label']} | " + " | ".join(cells)
                         + f" | {r['end_to_end']['p99']:.2f} | {r['end_to_end']['throughput']:.1f} |")
    return "\n".join(lines)


__all__ = ["SCHEMA", "STATS", "Target", "camera_frames", "foreign", "machine", "parse_amount", "prepare",
           "random_inputs", "results", "run_interleaved", "summarize", "table"]
