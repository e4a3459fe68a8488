"""Prove every GPU path of the project on this machine in one command, and write what it measured.

    python -m benchmarks.gpu_check --out DIR [--budget 480]
    python -m benchmarks.gpu_check --out DIR --device cpu --smoke     # the same sections on the CPU, tiny sizes

Sections, each "ok", "failed: <one line>" or "skipped: <why>" (a missing package skips its section, never the run):
environment (GPU, driver, CUDA, versions, the autocast choice), cuda_runtime (cuda-python primitives trt/runtime.py
uses: device and pinned buffers, async copies on a non-blocking stream, events, a captured CUDA graph), segmenter
(Segmenter on CUDA against the CPU, eager against CUDA graph, fp16/bf16 agreement, camera-size frames), train_step
(training-step throughput of `none` and `transkd-base` with the chosen AMP against float32), distill (a short
`python -m pipeline.run distill export bench` on the synthetic scenes on the GPU: the Trainer, export, the bench
stage), onnxruntime (the run's ONNX on the CUDA and TensorRT providers against the CPU: parity and latency),
tensorrt (FP16 and INT8 plans built and run: parity, CUDA graph, end to end) and torch_latency (teacher and student,
fp32/fp16/bf16 x eager/compile/cudagraph, 512x1024 and 1024x2048, batch 1 and 8, in whatever time is left).
DIR/gpu_check.md and DIR/gpu_check.json are rewritten after every section, so a run cut short keeps what it did.
Exit status: 0 when every section is ok or skipped (and on a machine with no GPU, after saying so), 1 when one failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.cli import Parser, cli_main
from pipeline.errors import InputError
from pipeline.io import atomic_path
from pipeline.timing import camera_frames

SCHEMA = "transkd-gpu-check/1"
PACKAGES = ("torch", "triton", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu12",
            "tensorrt-cu13", "cuda-bindings", "cuda-python", "nvidia-modelopt", "onnxslim", "opencv-python-headless",
            "safetensors", "transformers")


class Skip(Exception):
    """A section that cannot run here (a missing package or device), with the reason."""


@dataclass
class Check:
    """Settings of one run: the device, the sizes and the time budget (seconds, all sections together)."""

    out: Path
    device: str
    smoke: bool
    budget: float
    start: float = field(default_factory=time.monotonic)
    work: Path = Path()

    @property
    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [(64, 128)] if self.smoke else [(512, 1024), (1024, 2048)]

    @property
    def batches(self) -> list[int]:
        return [1, 2] if self.smoke else [1, 8]

    @property
    def models(self) -> dict[str, str]:
        return {"student": "mit_b0", "teacher": "mit_b0" if self.smoke else "mit_b2"}

    def sync(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)


# ------------------------------------------------------------------------------------------------------ helpers
def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def need(module: str, why: str) -> None:
    """Skip the section when `module` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise Skip(f"{module} is not installed ({why})")


def checkpoint(check: Check, role: str) -> Path:
    """A random-weight checkpoint of the role's variant (seeded), written once per run."""
    import torch

    from pipeline.models import build_model
    from pipeline.models.checkpoints import save_model

    path = check.work / f"{role}.safetensors"
    if not path.exists():
        torch.manual_seed(0 if role == "student" else 1)
        save_model(build_model(check.models[role]), path, source=f"gpu_check random {role}")
    return path


def agreement(a: np.ndarray | list, b: np.ndarray | list) -> float:
    return float(np.mean(np.asarray(a) == np.asarray(b)))


def md_table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
                      *("| " + " | ".join(cell(r.get(c, "-")) for c in cols) + " |" for r in rows)])


def timed(fn: Callable[[], object], sync: Callable[[], None], warmup: int, iters: int) -> list[float]:
    """Milliseconds per call of fn, each call followed by `sync`."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


# ------------------------------------------------------------------------------------------------------ sections
def environment(check: Check) -> dict:
    import torch

    from pipeline import amp

    info: dict = {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
                  "packages": {p: v for p in PACKAGES if (v := version(p))},
                  "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                  "amp_auto": {"cpu": amp.choose("auto", "cpu").record("auto", "cpu")}}
    if check.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(check.device)
        info["gpu"] = {"name": p.name, "compute_capability": f"{p.major}.{p.minor}", "memory_gib":
                       round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count,
                       "count": torch.cuda.device_count()}
        info["amp_auto"]["cuda"] = amp.choose("auto", check.device).record("auto", check.device)
        info["driver"] = nvidia_smi()
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    rows = [{"item": k, "value": json.dumps(v) if isinstance(v, (dict, list)) else v} for k, v in info.items()]
    return {"data": info, "table": md_table(rows, ["item", "value"])}


def nvidia_smi() -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None


def cuda_runtime(check: Check) -> dict:
    """The cuda-python calls trt/runtime.py makes, without TensorRT: buffers, copies, events, a CUDA graph."""
    if not check.device.startswith("cuda"):
        raise Skip("needs a CUDA device")
    need("cuda", "cuda-bindings: pip install the GPU set's cuda-bindings")
    from pipeline.infer import cuda_index
    from trt.runtime import _Buffer, cuda_check, cudart, pinned_array

    rt, n = cudart(), 1 << 20
    cuda_check("cudaSetDevice", rt.cudaSetDevice(cuda_index(check.device)))
    stream = cuda_check("cudaStreamCreateWithFlags", rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
    a, b = _Buffer(), _Buffer()
    try:
        a.reserve(rt, n * 4)
        b.reserve(rt, n * 4)
        src, dst = pinned_array(a.host, np.dtype("float32"), (n,)), pinned_array(b.host, np.dtype("float32"), (n,))
        src[:] = np.arange(n, dtype=np.float32)
        h2d, d2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost

        def copies() -> None:
            cuda_check("cudaMemcpyAsync", rt.cudaMemcpyAsync(b.device, a.device, n * 4, d2d, stream))

        cuda_check("cudaMemcpyAsync", rt.cudaMemcpyAsync(a.device, a.host, n * 4, h2d, stream))
        ms = event_time(rt, stream, copies)
        graph_ok = graph_replay(rt, stream, copies)
        cuda_check("cudaMemcpyAsync", rt.cudaMemcpyAsync(b.host, b.device, n * 4, d2h, stream))
        cuda_check("cudaStreamSynchronize", rt.cudaStreamSynchronize(stream))
        if not np.array_equal(src, dst):
            raise AssertionError("a host -> device -> device -> host round trip changed the data")
    finally:
        a.free(rt)
        b.free(rt)
        cuda_check("cudaStreamDestroy", rt.cudaStreamDestroy(stream))
    rows = [{"check": "round trip of 4 MiB through pinned and device buffers", "result": "identical"},
            {"check": "device-to-device copy timed with events (ms)", "result": round(ms, 4)},
            {"check": "copy captured as a CUDA graph and replayed", "result": graph_ok}]
    return {"data": {"copy_ms": ms, "graph": graph_ok}, "table": md_table(rows, ["check", "result"])}


def event_time(rt, stream, fn: Callable[[], None]) -> float:
    from trt.runtime import cuda_check

    start, end = (cuda_check("cudaEventCreate", rt.cudaEventCreate()) for _ in range(2))
    try:
        cuda_check("cudaEventRecord", rt.cudaEventRecord(start, stream))
        fn()
        cuda_check("cudaEventRecord", rt.cudaEventRecord(end, stream))
        cuda_check("cudaEventSynchronize", rt.cudaEventSynchronize(end))
        return float(cuda_check("cudaEventElapsedTime", rt.cudaEventElapsedTime(start, end)))
    finally:
        for e in (start, end):
            cuda_check("cudaEventDestroy", rt.cudaEventDestroy(e))


def graph_replay(rt, stream, fn: Callable[[], None]) -> str:
    from trt.runtime import cuda_check

    mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    cuda_check("cudaStreamBeginCapture", rt.cudaStreamBeginCapture(stream, mode))
    fn()
    graph = cuda_check("cudaStreamEndCapture", rt.cudaStreamEndCapture(stream))
    exe = cuda_check("cudaGraphInstantiate", rt.cudaGraphInstantiate(graph, 0))
    try:
        cuda_check("cudaGraphLaunch", rt.cudaGraphLaunch(exe, stream))
        cuda_check("cudaStreamSynchronize", rt.cudaStreamSynchronize(stream))
    finally:
        cuda_check("cudaGraphExecDestroy", rt.cudaGraphExecDestroy(exe))
        cuda_check("cudaGraphDestroy", rt.cudaGraphDestroy(graph))
    return "ok"


def segmenter(check: Check) -> dict:
    """Segmenter on the device against the CPU reference: class-id agreement per precision and mode. TF32 is off
    for the section, so fp32 on the GPU differs from the CPU by summation order alone and must agree on 99 % of the
    pixels of a random-weight model (whose logits are close); fp16 and bf16 are reported, not judged."""
    import torch

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _segmenter(check)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _segmenter(check: Check) -> dict:
    from pipeline.infer import Segmenter

    path, size = checkpoint(check, "student"), check.sizes[0]
    cam = (270, 480) if check.smoke else (1080, 1920)
    batch = camera_frames(2, cam)
    ref = Segmenter.open(path, device="cpu", size=size).predict(batch)
    rows = []
    modes = [("fp32", "eager"), ("bf16", "eager")]
    if check.device.startswith("cuda"):  # CPU fp16 autocast has no fast kernels; CUDA graphs are CUDA's
        modes += [("fp16", "eager"), ("fp32", "cudagraph"), ("fp16", "cudagraph")]
    for dtype, mode in modes:
        seg = Segmenter.open(path, device=check.device, dtype=dtype, mode=mode, size=size)
        ids = seg.predict(batch)
        ms = timed(lambda s=seg: s.predict(batch), check.sync, 2, 3 if check.smoke else 10)
        rows.append({"precision": dtype, "mode": mode, "agreement_vs_cpu_fp32": agreement(ids, ref),
                     "frames": f"2 x {cam[0]}x{cam[1]}", "predict_ms_median": float(np.median(ms))})
    low = [r for r in rows if r["precision"] == "fp32" and r["agreement_vs_cpu_fp32"] < 0.99]
    if low:
        raise AssertionError(f"fp32 {low[0]['mode']} on {check.device} agrees with the CPU on only "
                             f"{low[0]['agreement_vs_cpu_fp32']:.4f} of pixels")
    return {"data": rows, "table": md_table(rows, ["precision", "mode", "agreement_vs_cpu_fp32", "frames",
                                                    "predict_ms_median"])}


def train_step(check: Check) -> dict:
    """Training steps of the student alone (`none`) and against the teacher (`transkd-base`), with the autocast
    precision `train.amp=auto` picks here against float32, timed side by side on one batch."""
    import torch

    from benchmarks.train_speed import make_step
    from pipeline import amp
    from pipeline.models import build_model

    size, batch = check.sizes[0], 2 if check.smoke else 8
    choice = amp.choose("auto", check.device)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, *size, device=check.device)
    y = torch.randint(0, 19, (batch, *size), device=check.device)
    teacher = build_model(check.models["teacher"]).to(check.device)
    rows = []
    for name in ("none", "transkd-base"):
        for dtype in dict.fromkeys([None, choice.dtype]):
            step = make_step(name, teacher, check.models["student"], x, y, dtype)
            ms = timed(step, check.sync, 2, 2 if check.smoke else 10)
            rows.append({"method": name, "amp": amp.NAMES[dtype], "batch": batch, "size": f"{size[0]}x{size[1]}",
                         "step_ms_median": float(np.median(ms)), "images_per_s": 1e3 * batch / float(np.median(ms)),
                         "loss": step()})
    base = {r["method"]: r["step_ms_median"] for r in rows if r["amp"] == "fp32"}
    for r in rows:
        r["speedup_vs_fp32"] = base[r["method"]] / r["step_ms_median"]
    return {"data": {"amp_auto": choice.record("auto", check.device), "rows": rows},
            "table": f"autocast chosen by train.amp=auto: {choice.name} ({choice.reason})\n\n"
                     + md_table(rows, ["method", "amp", "batch", "size", "step_ms_median", "images_per_s",
                                       "speedup_vs_fp32", "loss"])}


def distill_args(check: Check, run_dir: Path) -> list[str]:
    """A short distill export bench run on the synthetic scenes; FP16/INT8 ONNX only where Model Optimizer is."""
    size = "64x128" if check.smoke else "256x512"
    quant = importlib.util.find_spec("modelopt") is not None and importlib.util.find_spec("onnxslim") is not None
    args = ["distill", "export", "bench", "--run-dir", str(run_dir), f"data.synthetic_size={size}",
            f"data.size={size}", f"data.synthetic_train={8 if check.smoke else 64}",
            f"data.synthetic_val={2 if check.smoke else 8}", f"teacher.variant={check.models['teacher']}",
            "student.variant=mit_b0", f"train.steps={2 if check.smoke else 60}",
            f"train.batch_size={2 if check.smoke else 8}", "train.warmup_steps=0", "train.eval_every=1000",
            "train.ckpt_every=1000", f"train.device={'cuda' if check.device.startswith('cuda') else 'cpu'}",
            f"export.fp16={str(quant).lower()}", f"export.int8={str(quant).lower()}",
            f"export.calibration_frames={2 if check.smoke else 16}", "export.parity_frames=2",
            f"bench.iterations={5 if check.smoke else 50}", "bench.rounds=1"]
    if not importlib.util.find_spec("onnxslim"):
        args.append("export.simplify=false")
    return args


def distill(check: Check) -> dict:
    """`python -m pipeline.run distill export bench` as a user runs it, on the device; its report is included."""
    run_dir = check.work / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if check.device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = check.device.split(":")[1]
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pipeline.run", *distill_args(check, run_dir)], env=env,
                       capture_output=True, text=True, timeout=max(60.0, check.left))
    (check.out / "distill.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        last = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
        raise AssertionError(f"pipeline.run exited {r.returncode}: {last} (full log: distill.log)")
    report = run_dir / "report.md"
    text = report.read_text() if report.is_file() else "(no report.md)"
    return {"data": {"seconds": round(time.monotonic() - t0, 1), "run_dir": str(run_dir),
                     "artifacts": sorted(p.name for p in run_dir.iterdir() if p.is_file())},
            "table": f"`python -m pipeline.run {' '.join(distill_args(check, Path('RUN')))}` "
                     f"in {time.monotonic() - t0:.0f} s\n\n{text}"}


def onnxruntime_gpu(check: Check) -> dict:
    """The run's ONNX files on ONNX Runtime's CUDA and TensorRT providers against its CPU provider."""
    if not check.device.startswith("cuda"):
        raise Skip("needs a CUDA device")
    need("onnxruntime", "pip install the GPU set's onnxruntime-gpu")
    import onnxruntime as ort

    gpu = [p for p in ("tensorrt", "cuda") if f"{'Tensorrt' if p == 'tensorrt' else 'CUDA'}ExecutionProvider"
           in ort.get_available_providers()]
    if not gpu:
        raise Skip(f"onnxruntime {ort.__version__} here offers only {', '.join(ort.get_available_providers())} "
                   "(the GPU providers come with onnxruntime-gpu, a wheel too large to carry)")
    onnx_files = sorted((check.work / "run").glob("student*.onnx"))
    if not onnx_files:
        raise Skip("the distill section made no ONNX file")
    return compare_runs(check, [(f, p) for f in onnx_files for p in gpu], "onnx")


def tensorrt(check: Check) -> dict:
    """The run's TensorRT plans (built by its export where TensorRT is installed), against the ONNX on the CPU."""
    if not check.device.startswith("cuda"):
        raise Skip("needs a CUDA device")
    need("tensorrt", "TensorRT's wheels are over 1 GB: install a GPU set (docs/gpu.md) to run this section")
    need("cuda", "cuda-bindings: install the GPU set's cuda-bindings")
    plans = sorted((check.work / "run").glob("student*.plan"))
    if not plans:
        raise AssertionError("TensorRT is installed, yet the run's export built no plan (see distill.log)")
    return compare_runs(check, [(p, "") for p in plans], "engine")


def compare_runs(check: Check, items: list[tuple[Path, str]], kind: str) -> dict:
    """Class-id agreement of each artifact with the FP32 ONNX on the CPU, and its latency (compute, CUDA graph for
    engines, end to end) through the latency harness."""
    from pipeline.infer import Segmenter
    from pipeline.timing import Target, prepare, results, run_interleaved

    ref_path = check.work / "run" / "student.onnx"
    test = camera_frames(4, check.sizes[0], seed=3)
    ref = Segmenter.open(ref_path, provider="cpu").predict(test)
    rows = []
    for path, provider in items:
        seg = Segmenter.open(path, provider=provider or "auto")
        for graph in ([False, True] if kind == "engine" else [False]):
            t = Target(path.name, kind, path, {"provider": provider} if provider else {})
            prepare(t, 1, None, None, True, 0, graph)
            run_interleaved([t], ("count", 5), ("count", 10 if check.smoke else 100), 2)
            row = results([t], 1, None)[0]
            rows.append({"artifact": path.name, "backend": provider or "tensorrt", "cuda_graph": graph,
                         "agreement_vs_onnx_cpu": agreement(seg.predict(test), ref),
                         "compute_p50_ms": row["compute"]["p50"], "end_to_end_p50_ms": row["end_to_end"]["p50"]})
    return {"data": rows, "table": md_table(rows, ["artifact", "backend", "cuda_graph", "agreement_vs_onnx_cpu",
                                                   "compute_p50_ms", "end_to_end_p50_ms"])}


def torch_latency(check: Check) -> dict:
    """PyTorch latency of teacher and student over precision x mode x size x batch, through the latency harness;
    compile rows go last in each group and whatever the time budget cannot fit is listed as skipped."""
    import torch

    from pipeline.timing import Target, prepare, results, run_interleaved

    dtypes = ["fp32", "bf16"] if check.smoke else ["fp32", "fp16", "bf16"]
    modes = ["eager"] if check.smoke or not check.device.startswith("cuda") else ["eager", "cudagraph", "compile"]
    rows, skipped = [], []
    for size in check.sizes:
        for batch in check.batches:
            for role in check.models:
                torch._dynamo.reset()  # a fresh compile cache per group: no silent fallback to eager at the limit
                for mode in modes:
                    for dtype in dtypes:
                        key = {"model": f"{role} ({check.models[role]})", "precision": dtype, "mode": mode,
                               "batch": batch, "size": f"{size[0]}x{size[1]}"}
                        if check.left < (90 if mode == "compile" else 20):
                            skipped.append({**key, "status": "skipped: time budget spent"})
                            continue
                        t = Target(role, "checkpoint", checkpoint(check, role),
                                   {"device": check.device, "dtype": dtype, "mode": mode})
                        prepare(t, batch, size, None, False, 0, False)
                        run_interleaved([t], ("count", 3), ("seconds", 0.2 if check.smoke else 1.0), 1)
                        c = results([t], batch, None)[0]["compute"]
                        rows.append({**key, "p50_ms": c["p50"], "p90_ms": c["p90"], "img_per_s": c["throughput"]})
                        del t
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    if not rows:
        raise Skip("no time left in the budget")
    table = md_table(rows + skipped, ["model", "precision", "mode", "batch", "size", "p50_ms", "p90_ms",
                                      "img_per_s", "status"])
    return {"data": {"rows": rows, "skipped": skipped}, "table": table}


SECTIONS: list[tuple[str, Callable[[Check], dict]]] = [
    ("environment", environment), ("cuda_runtime", cuda_runtime), ("segmenter", segmenter),
    ("train_step", train_step), ("distill", distill), ("onnxruntime", onnxruntime_gpu), ("tensorrt", tensorrt),
    ("torch_latency", torch_latency)]


# ------------------------------------------------------------------------------------------------------ the run
def run_section(check: Check, name: str, fn: Callable[[Check], dict]) -> dict:
    t0 = time.monotonic()
    print(f"gpu_check: {name} ...", flush=True)
    try:
        result = {"status": "ok", **fn(check)}
    except Skip as e:
        result = {"status": f"skipped: {e}"}
    except Exception as e:  # a failed section is reported in one line and the next one runs
        line = (str(e).strip() or type(e).__name__).splitlines()[0]
        result = {"status": f"failed: {type(e).__name__}: {line}", "traceback": traceback.format_exc()}
    result["seconds"] = round(time.monotonic() - t0, 1)
    print(f"gpu_check: {name}: {result['status']} ({result['seconds']} s)", flush=True)
    return result


def write_report(check: Check, header: dict, sections: dict[str, dict]) -> None:
    lines = [f"# GPU check: {header['device_name']}", "", f"`{header['command']}` on {header['date']}; "
             f"{header['seconds']:.0f} s of a {check.budget:.0f} s budget.", ""]
    for name, s in sections.items():
        lines += [f"## {name}: {s['status']} ({s['seconds']} s)", ""]
        if "table" in s:
            lines += [s["table"], ""]
        if "traceback" in s:
            lines += ["```", s["traceback"].rstrip(), "```", ""]
    with atomic_path(check.out / "gpu_check.md") as tmp:
        tmp.write_text("\n".join(lines))
    data = {"schema": SCHEMA, **header, "sections": {k: {x: v for x, v in s.items() if x != "table"}
                                                     for k, s in sections.items()}}
    with atomic_path(check.out / "gpu_check.json") as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"cpu-{os.cpu_count()}core"


def slug(name: str) -> str:
    """`NVIDIA H200` -> `nvidia-h200`: the suffix of benchmarks/results/gpu_check_<device>.md."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def build_parser() -> Parser:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, metavar="DIR", help="where gpu_check.md, .json and the run go")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --smoke: try the sections here)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for all sections (the latency grid fills "
                    "what is left)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and the student as teacher: a quick try")
    ap.add_argument("--only", nargs="+", choices=[n for n, _ in SECTIONS], help="run these sections only")
    return ap


def run(args: argparse.Namespace) -> int:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU is visible to PyTorch {torch.__version__} (CUDA build: "
              f"{torch.version.cuda or 'none'}); nothing to check on this machine")
        return 0
    if not (args.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", args.device)):
        raise InputError(f"--device {args.device!r}: expected cuda, cuda:N or cpu")
    if args.budget <= 0:
        raise InputError(f"--budget {args.budget}: expected a positive number of seconds")
    check = Check(Path(args.out), args.device, args.smoke, args.budget)
    check.work = check.out / "work"
    check.work.mkdir(parents=True, exist_ok=True)
    header = {"device": args.device, "device_name": device_name(args.device), "slug": slug(device_name(args.device)),
              "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": 0.0}
    sections: dict[str, dict] = {}
    for name, fn in SECTIONS:
        if args.only and name not in args.only:
            continue
        sections[name] = run_section(check, name, fn)
        header["seconds"] = time.monotonic() - check.start
        write_report(check, header, sections)
    failed = [n for n, s in sections.items() if s["status"].startswith("failed")]
    print(f"gpu_check: {len(sections) - len(failed)} of {len(sections)} sections ok or skipped; "
          f"{check.out / 'gpu_check.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
