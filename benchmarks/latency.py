"""Latency of every kind of artifact (TensorRT engine, ONNX Runtime, PyTorch) side by side, through Segmenter.

    python benchmarks/latency.py --engine student.int8.plan [--cuda-graph]
    python benchmarks/latency.py --onnx student.onnx student.int8.onnx --provider cpu --checkpoint student.safetensors \
        --baseline student.safetensors --size 512x1024 --threads 2 --json latency.json

Several artifacts in one call are timed interleaved (round robin, the order alternating per round), so their
ratios are measured on the same machine state. "compute" is the network alone on a prepared batch (TensorRT:
CUDA events around execute_async_v3 or a CUDA graph launch); `--e2e` also times a whole `predict` on camera frames,
with preprocessing, host<->device copies (TensorRT) and postprocessing reported separately. Statistics: mean, std,
min, p50, p90, p95, p99, max (linear-interpolated percentiles, numpy's default), throughput = batch / mean.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.flops import parse_size  # noqa: E402
from pipeline.errors import InputError, PipelineError  # noqa: E402

SCHEMA = "transkd-latency/1"
STATS = ("mean", "std", "min", "p50", "p90", "p95", "p99", "max")


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
    step: Callable[[int], dict[str, list[float]]] | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)


def _frames(batch: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Camera-like BGR frames: smooth gradients plus noise (constant frames would flatter some kernels)."""
    rng = np.random.default_rng(seed)
    h, w = size
    ramp = np.linspace(0, 200, w, dtype=np.float32)[None, :, None] + np.linspace(0, 55, h, dtype=np.float32)[:, None,
                                                                                                          None]
    return [np.clip(ramp + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8) for _ in range(batch)]


def prepare(t: Target, batch: int, size: tuple[int, int] | None, frame_size: tuple[int, int] | None, e2e: bool,
            threads: int, cuda_graph: bool) -> None:
    """Open the artifact, check the shape against it, and build the timed step."""
    from pipeline.infer import Segmenter

    o = t.options
    if t.kind == "engine":
        from trt.runtime import check_shape, load_sidecar

        # the refusals that need no GPU come first: missing file or sidecar, batch or size outside the profile
        side = load_sidecar(t.path)
        inp = side["inputs"][0]
        nhwc = inp["dtype"] == "uint8"
        hw = tuple(size) if size else tuple(inp["shape"][1:3] if nhwc else inp["shape"][2:4])
        if not all(isinstance(d, int) for d in hw):
            raise InputError(f"{t.path}: the engine takes a range of sizes: give --size HxW")
        check_shape(side, (batch, *hw, 3) if nhwc else (batch, 3, *hw))
    seg = Segmenter.open(t.path, device=o.get("device", "auto"), provider=o.get("provider", "auto"), threads=threads,
                         dtype=o.get("dtype", "fp32"), mode=o.get("mode", "eager"), deploy=o.get("deploy", False),
                         size=size)
    c = seg.contract
    if c.batch is not None and c.batch != batch:
        raise InputError(f"{t.path}: the network is fixed at batch {c.batch}, --batch {batch} asked")
    net = seg.size or size
    if net is None:
        raise InputError(f"{t.path}: the network takes any size: give --size HxW")
    frames = _frames(batch, frame_size or net)
    x = seg.preprocess(frames)[0].copy()
    t.info = {**seg.describe(), **({"deploy_copy": o.get("deploy", False)} if t.kind == "checkpoint" else {}),
              "batch": batch, "size": f"{net[0]}x{net[1]}",
              "frame_size": f"{(frame_size or net)[0]}x{(frame_size or net)[1]}"}
    backend = seg.backend

    sizes = [f.shape[:2] for f in frames]

    def host_compute(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            backend.run(x)
            backend.sync()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    def host_e2e(n: int) -> dict[str, list[float]]:
        """A whole predict() on the frames, timed on the host phase by phase."""
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

    if t.kind == "engine":
        runner = backend.runner  # type: ignore[attr-defined]
        runner.set_input_shape(x.shape)
        t.info["cuda_graph"] = cuda_graph

        def step(n: int) -> dict[str, list[float]]:
            # CUDA events on the runner's stream; one capture per call when timing a CUDA graph
            ms = {"compute": runner.time_compute(n, 0, cuda_graph=cuda_graph)}
            if e2e:
                copies = runner.time_end_to_end(x, n, 0)
                ms.update(h2d=copies["h2d"], d2h=copies["d2h"], **host_e2e(n))
            return ms
    else:
        def step(n: int) -> dict[str, list[float]]:
            return {"compute": host_compute(n), **(host_e2e(n) if e2e else {})}
    t.step = step


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
        rows.append({"label": t.label, **t.info,
                     **{phase: summarize(v, batch) for phase, v in t.samples.items()}})
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


def build_targets(args) -> list[Target]:
    targets: list[Target] = []
    for p in args.engine or []:
        targets.append(Target(Path(p).name, "engine", Path(p), {}))
    for p, prov in itertools.product(args.onnx or [], args.provider):
        label = Path(p).name + (f" [{prov}]" if len(args.provider) > 1 else "")
        targets.append(Target(label, "onnx", Path(p), {"provider": prov}))
    for p, dt, mode in itertools.product(args.checkpoint or [], args.dtype, args.mode):
        tags = [x for x, many in ((dt, len(args.dtype) > 1), (mode, len(args.mode) > 1)) if many]
        label = Path(p).name + (f" [{', '.join(tags)}]" if tags else "")
        targets.append(Target(label, "checkpoint", Path(p), {"device": args.device, "dtype": dt, "mode": mode,
                                                                "deploy": args.deploy_copy}))
    if not targets:
        raise InputError("nothing to time: give --engine, --onnx and/or --checkpoint")
    return targets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", nargs="+", metavar="PLAN", help="TensorRT engines (.plan with their .plan.json)")
    ap.add_argument("--onnx", nargs="+", metavar="ONNX", help="ONNX files of any precision (ONNX Runtime)")
    ap.add_argument("--checkpoint", nargs="+", metavar="CKPT", help="anything load_model reads (PyTorch)")
    ap.add_argument("--provider", nargs="+", default=["cpu"], choices=["auto", "cpu", "cuda", "tensorrt"],
                    help="ONNX Runtime execution provider(s)")
    ap.add_argument("--device", default="auto", help="PyTorch device: auto, cpu, cuda")
    ap.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "fp16", "bf16"], help="PyTorch (autocast)")
    ap.add_argument("--mode", nargs="+", default=["eager"], choices=["eager", "compile", "cudagraph"],
                    help="PyTorch: eager, torch.compile, or a captured CUDA graph")
    ap.add_argument("--deploy-copy", action="store_true",
                    help="PyTorch: run the reparameterised copy the export traces (folded head, conv Mix-FFN)")
    ap.add_argument("--cuda-graph", action="store_true", help="TensorRT: launch the engine as a CUDA graph")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", help="network HxW (default: the artifact's static size; required for PyTorch)")
    ap.add_argument("--frame-size", help="camera frame HxW for --e2e (default: the network size)")
    ap.add_argument("--e2e", action="store_true", help="also time predict() on frames, phase by phase")
    ap.add_argument("--warmup", default="5", help="warm-up calls per artifact, or seconds (2s)")
    ap.add_argument("--iterations", default="50", help="timed calls per artifact, or a duration in seconds (10s)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds the timed calls are split into")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads, PyTorch and ONNX Runtime (0: default)")
    ap.add_argument("--baseline", metavar="ARTIFACT", help="every row gets its speedup against this artifact")
    ap.add_argument("--json", metavar="FILE", help="write settings, machine and every statistic as JSON")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    try:
        report = measure(args)
    except PipelineError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = report["machine"]
    print(f"latency: {m['cpu']} ({m['cpu_count']} cores), GPU {m['gpu'] or 'none'}, torch {m['torch']}, "
          f"onnxruntime {m['onnxruntime']}, threads {report['settings']['threads'] or 'default'}")
    print(table(report["results"]))
    if args.json:
        from pipeline.io import write_json

        write_json(Path(args.json), report)
    return 0


def measure(args) -> dict:
    import torch

    if args.batch < 1 or args.rounds < 1 or args.threads < 0:
        raise InputError("--batch and --rounds must be >= 1, --threads >= 0")
    size = parse_size(args.size) if args.size else None
    frame_size = parse_size(args.frame_size) if args.frame_size else None
    warmup, amount = parse_amount(args.warmup, "--warmup"), parse_amount(args.iterations, "--iterations")
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = build_targets(args)
    baseline = None
    if args.baseline:
        matches = [t.label for t in targets if t.path.name == Path(args.baseline).name or t.label == args.baseline]
        if not matches:
            raise InputError(f"--baseline {args.baseline}: not one of the timed artifacts "
                             f"({', '.join(t.label for t in targets)})")
        baseline = matches[0]
    for t in targets:
        prepare(t, args.batch, size, frame_size, args.e2e, args.threads, args.cuda_graph)
    run_interleaved(targets, warmup, amount, args.rounds)
    settings = {"batch": args.batch, "size": args.size, "frame_size": args.frame_size, "e2e": args.e2e,
                "warmup": args.warmup, "iterations": args.iterations, "rounds": args.rounds, "threads": args.threads,
                "baseline": baseline, "cuda_graph": args.cuda_graph}
    return {"schema": SCHEMA, "settings": settings, "machine": machine(),
            "results": results(targets, args.batch, baseline)}


if __name__ == "__main__":
    sys.exit(main())
