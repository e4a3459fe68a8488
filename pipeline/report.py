"""The bench stage: params and GMACs of teacher and student, latency of every artifact on every available device,
and mIoU of every artifact, for one run directory: report.md, report.json and report.png (mIoU against latency)."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.artifacts import kinds, run_file
from pipeline.config import Config, bench_size
from pipeline.errors import InputError, PipelineError
from pipeline.flops import count_model, count_onnx
from pipeline.io import atomic_path, write_json
from pipeline.timing import Target, machine, prepare, results, run_interleaved

log = logging.getLogger("pipeline")
CHECKPOINTS = (run_file("checkpoint", "teacher"), run_file("checkpoint"))
ONNX = tuple(run_file(k) for k in kinds("onnx"))
ENGINES = tuple(run_file(k) for k in kinds("tensorrt"))
FP32_ONNX = run_file("onnx")  # the exported graph the ONNX and engine rows are counted from (decode head folded)


def torch_dtype(cfg: Config, device: str) -> str:
    """The precision the PyTorch rows run in, timed and scored alike: fp16 on a GPU (what TensorRT's FP16 plan is
    compared with); on the CPU the autocast `train.amp` picks there (pipeline.amp: bf16 where the CPU has it
    natively, else float32; `train.amp=off` keeps float32)."""
    from pipeline import amp

    return "fp16" if device != "cpu" else amp.choose(cfg.train.amp, "cpu").name


def _targets(cfg: Config, run_dir: Path, device: str) -> list[Target]:
    """What runs on `device`: the PyTorch checkpoints, the ONNX files (ONNX Runtime CPU on "cpu", its CUDA
    provider on "cuda" where installed) and, on "cuda", the TensorRT engines."""
    import onnxruntime as ort

    out = [Target(n, "checkpoint", run_dir / n, {"device": device, "dtype": torch_dtype(cfg, device)})
           for n in CHECKPOINTS if (run_dir / n).is_file()]
    provider = "cpu" if device == "cpu" else "cuda"
    if provider == "cpu" or "CUDAExecutionProvider" in ort.get_available_providers():
        out += [Target(n, "onnx", run_dir / n, {"provider": provider, "allow_fallback": cfg.bench.allow_fallback})
                for n in ONNX if (run_dir / n).is_file()]
    if device == "cuda":
        out += [Target(n, "engine", run_dir / n, {}) for n in ENGINES if (run_dir / n).is_file()]
    return out


def _complexity(run_dir: Path, size: tuple[int, int]) -> dict:
    from pipeline.models import load_model

    out = {}
    for name in CHECKPOINTS:
        if (run_dir / name).is_file():
            model = load_model(run_dir / name)
            c = count_model(model, size)
            out[name] = {"variant": model.config.variant, "params_m": c.params / 1e6, "gmacs": c.full / 1e9,
                         "paper_gmacs": c.paper / 1e9}
    if (run_dir / FP32_ONNX).is_file():  # the exported graph: its decode head is folded
        c = count_onnx(run_dir / FP32_ONNX, size)
        out[FP32_ONNX] = {"params_m": c.params / 1e6, "gmacs": c.full / 1e9}
    return out


def _time(cfg: Config, run_dir: Path, devices: list[str], size: tuple[int, int], skipped: dict[str, str]) -> list:
    """Latency rows of every artifact on every device, interleaved per device; what cannot run goes to `skipped`."""
    b = cfg.bench
    rows: list[dict] = []
    for device in devices:
        targets = []
        for t in _targets(cfg, run_dir, device):
            try:
                prepare(t, b.batch, size, None, False, b.threads, False)
            except PipelineError as e:  # e.g. a static graph at another size, an engine for another GPU
                skipped[f"{t.label} ({device})"] = str(e)
                log.warning("bench: %s on %s skipped: %s", t.label, device, e)
                continue
            targets.append(t)
        log.info("bench: timing %d artifact(s) on %s at %dx%d, batch %d, interleaved", len(targets), device,
                 size[0], size[1], b.batch)
        run_interleaved(targets, ("count", b.warmup), ("count", b.iterations), b.rounds)
        rows += results(targets, b.batch, None)
    return rows


def _score(cfg: Config, run_dir: Path, val, timed: set[str], device: str) -> dict[str, dict]:
    """mIoU of every timed artifact through the Segmenter, on the validation frames."""
    from pipeline.evaluate import score, spread
    from pipeline.infer import Segmenter

    miou: dict[str, dict] = {}
    frames = len(spread(len(val), cfg.bench.eval_frames))
    for name in CHECKPOINTS + ONNX + ENGINES:
        if not (run_dir / name).is_file() or name not in timed:
            continue
        log.info("bench: scoring %s on %d %s frames", name, frames, val.split)
        # PyTorch and dynamic graphs are scored at the resolution the run evaluates at
        seg = Segmenter.open(run_dir / name, device=device, dtype=torch_dtype(cfg, device),
                             default_size=tuple(cfg.data.size))
        res = score(seg, val, cfg.bench.eval_frames, progress=True)
        miou[name] = {"miou": res.miou, "pixel_accuracy": res.pixel_acc}
    return miou


def bench_run(cfg: Config, run_dir: Path, val) -> dict:
    """Measure everything in `run_dir` and write the report; returns report.json's content."""
    import torch

    from pipeline.evaluate import spread

    b = cfg.bench
    size = bench_size(cfg)
    if not any((run_dir / n).is_file() for n in CHECKPOINTS + ONNX + ENGINES):
        raise InputError(f"{run_dir}: no {', '.join(CHECKPOINTS)}, student*.onnx or *.plan to bench; run distill "
                         "and export first")
    devices = ["cpu"] + (["cuda"] if b.cuda == "auto" and torch.cuda.is_available() else [])
    skipped: dict[str, str] = {}
    rows = _time(cfg, run_dir, devices, size, skipped)
    miou = _score(cfg, run_dir, val, {r["label"] for r in rows}, devices[-1])
    complexity = _complexity(run_dir, size)
    for r in rows:
        r["miou"] = miou.get(r["label"], {}).get("miou")
        r["complexity"] = complexity.get(r["label"]) or (complexity.get(FP32_ONNX) if r["label"] in ONNX + ENGINES
                                                          else None)
        teacher = next((t for t in rows if t["label"] == CHECKPOINTS[0] and t["device"] == r["device"]), None)
        r["speedup_vs_teacher"] = teacher["compute"]["p50"] / r["compute"]["p50"] if teacher else None
    report = {"run_dir": str(run_dir), "size": f"{size[0]}x{size[1]}", "batch": b.batch,
              "dataset": {"name": val.name, "split": val.split, "frames": len(spread(len(val), b.eval_frames))},
              "machine": machine(),
              "settings": {"warmup": b.warmup, "iterations": b.iterations, "rounds": b.rounds, "threads": b.threads},
              "complexity": complexity, "results": rows, "skipped": skipped}
    write_json(run_dir / "report.json", report)
    with atomic_path(run_dir / "report.md") as tmp:
        tmp.write_text(markdown(report))
    plot(report, run_dir / "report.png")
    return report


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Benchmark of {report['run_dir']}", "",
             f"{m['cpu']} ({m['cpu_count']} cores), GPU {m['gpu'] or 'none'}; torch {m['torch']}, onnxruntime "
             f"{m['onnxruntime']}. Latency: network only, batch {report['batch']}, {report['size']}, "
             f"{report['settings']['iterations']} calls each after {report['settings']['warmup']} warm-up, "
             f"interleaved. mIoU: {report['dataset']['frames']} {report['dataset']['name']} "
             f"{report['dataset']['split']} frames at full label resolution, through Segmenter.", "",
             "| artifact | device | backend | precision | params M | GMACs | mIoU % | p50 ms | mean ms | p99 ms "
             "| img/s | vs teacher |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        c, cx = r["compute"], r.get("complexity") or {}
        lines.append(
            f"| {r['label']} | {r['device']} | {r['backend']} | {r['precision']} | "
            f"{cx.get('params_m', float('nan')):.2f} | {cx.get('gmacs', float('nan')):.2f} | "
            + (f"{100 * r['miou']:.2f}" if r.get("miou") is not None else "-")
            + f" | {c['p50']:.2f} | {c['mean']:.2f} | {c['p99']:.2f} | {c['throughput']:.1f} | "
            + (f"{r['speedup_vs_teacher']:.2f}x" if r.get("speedup_vs_teacher") else "-") + " |")
    if report["skipped"]:
        lines += ["", "Not timed:", *(f"- {k}: {v}" for k, v in report["skipped"].items())]
    lines += ["", "GMACs: every multiply-accumulate at this size (pipeline/flops.py `full`; report.json also has "
              "the paper's convention for the checkpoints); the ONNX and engine rows count the exported graph, traced "
              "from the reparameterised deploy copy (decode head folded).", "",
              "![mIoU against latency](report.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """mIoU against median latency, one point per artifact, precision and device (log latency axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    markers = {"cpu": "o", "cuda": "s"}
    points = sorted((r for r in report["results"] if r.get("miou") is not None), key=lambda r: r["compute"]["p50"])
    for i, r in enumerate(points):
        x, y = r["compute"]["p50"], 100 * r["miou"]
        ax.scatter(x, y, marker=markers.get(r["device"], "^"), s=40)
        # neighbours in latency often share an mIoU (one student, several precisions): stagger their labels
        ax.annotate(f"{r['label']} ({r['device']})", (x, y), textcoords="offset points",
                    xytext=(4, 6 + 10 * (i % 3)), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.margins(x=0.3, y=0.15)
    ax.set_xlabel(f"median latency, ms (batch {report['batch']}, {report['size']})")
    ax.set_ylabel(f"mIoU % ({report['dataset']['name']} {report['dataset']['split']})")
    ax.set_title("What each millisecond costs in mIoU")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


__all__ = ["bench_run", "markdown", "plot"]
