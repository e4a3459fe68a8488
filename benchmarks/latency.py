"""Latency of every kind of artifact (TensorRT engine, ONNX Runtime, PyTorch) side by side, through Segmenter.

    python benchmarks/latency.py --engine student.int8.plan [--cuda-graph]
    python benchmarks/latency.py --onnx student.onnx student.int8.onnx --provider cpu --checkpoint student.safetensors \
        --baseline student.safetensors --size 512x1024 --threads 2 --json latency.json
    python benchmarks/latency.py --onnx any_model.onnx --shapes images:1x3x512x1024,scale:1 --provider cuda

Several artifacts in one call are timed interleaved (round robin, the order alternating per round), so their
ratios are measured on the same machine state. "compute" is the network alone on a prepared batch (TensorRT:
CUDA events around execute_async_v3 or a CUDA graph launch); `--e2e` also times a whole `predict` on camera frames,
with preprocessing, host<->device copies (TensorRT) and postprocessing reported separately. An ONNX file or engine
this pipeline did not make (no record, no sidecar) is timed like trtexec times it: its inputs from the graph or
engine, the dynamic dims from --shapes or --batch/--size, random input. The harness is pipeline/timing.py, shared
with the bench stage.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.cli import Parser, cli_main
from pipeline.config import parse_size
from pipeline.errors import InputError
from pipeline.infer import PROVIDERS, TORCH_DTYPES, TORCH_MODES
from pipeline.io import write_json
from pipeline.onnxinfo import parse_shapes
from pipeline.timing import SCHEMA, Target, machine, parse_amount, prepare, results, run_interleaved, table


def build_parser() -> Parser:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", nargs="+", metavar="PLAN",
                    help="TensorRT engines (ours with their .plan.json, or any engine, timed like trtexec)")
    ap.add_argument("--onnx", nargs="+", metavar="ONNX",
                    help="ONNX files of any precision (ONNX Runtime); any graph, ours or not")
    ap.add_argument("--checkpoint", nargs="+", metavar="CKPT", help="anything load_model reads (PyTorch)")
    ap.add_argument("--provider", nargs="+", default=["cpu"], choices=["auto", *PROVIDERS],
                    help="ONNX Runtime execution provider(s); auto: the fastest installed")
    ap.add_argument("--allow-fallback", action="store_true",
                    help="ONNX Runtime: time on the provider the session got when it is not the one asked")
    ap.add_argument("--device", default="auto",
                    help="PyTorch device: auto, cpu, cuda, cuda:N (ONNX Runtime's GPU providers take N too)")
    ap.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(TORCH_DTYPES),
                    help="PyTorch (autocast); auto: bf16 where the device has it natively, fp16 on older GPUs")
    ap.add_argument("--mode", nargs="+", default=["eager"], choices=list(TORCH_MODES),
                    help="PyTorch: eager, torch.compile, or a captured CUDA graph")
    ap.add_argument("--deploy-copy", action="store_true",
                    help="PyTorch: run the reparameterised copy the export traces (folded head, conv Mix-FFN)")
    ap.add_argument("--cuda-graph", action="store_true", help="TensorRT: launch the engine as a CUDA graph")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", help="network HxW (default: the artifact's static size; required for PyTorch)")
    ap.add_argument("--shapes", metavar="NAME:DIMS,...",
                    help="input shapes of a foreign graph or engine, trtexec's syntax: images:1x3x512x1024,scale:1")
    ap.add_argument("--frame-size", help="camera frame HxW for --e2e (default: the network size)")
    ap.add_argument("--e2e", action="store_true", help="also time predict() on frames, phase by phase")
    ap.add_argument("--warmup", default="5", help="warm-up calls per artifact, or seconds (2s)")
    ap.add_argument("--iterations", default="50", help="timed calls per artifact, or a duration in seconds (10s)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds the timed calls are split into")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads, PyTorch and ONNX Runtime (0: default)")
    ap.add_argument("--baseline", metavar="ARTIFACT", help="every row gets its speedup against this artifact")
    ap.add_argument("--json", metavar="FILE", help="write settings, machine and every statistic as JSON")
    return ap


def short_names(paths: Sequence[str | Path]) -> dict[Path, str]:
    """Each path by its last components, as few as keep the names apart: `student.onnx` alone, but
    `ev_mit/student.onnx` and `ev_lvt/student.onnx` when two runs' students are timed side by side."""
    unique = list(dict.fromkeys(Path(p) for p in paths))
    for k in range(1, max((len(p.parts) for p in unique), default=1) + 1):
        names = {p: "/".join(p.parts[-k:]) for p in unique}
        if len(set(names.values())) == len(unique):
            return names
    return {p: str(p) for p in unique}


def build_targets(args: argparse.Namespace) -> list[Target]:
    targets: list[Target] = []
    name = short_names([*(args.engine or []), *(args.onnx or []), *(args.checkpoint or [])])
    for p in args.engine or []:
        targets.append(Target(name[Path(p)], "engine", Path(p), {}))
    for p, prov in itertools.product(args.onnx or [], args.provider):
        label = name[Path(p)] + (f" [{prov}]" if len(args.provider) > 1 else "")
        targets.append(Target(label, "onnx", Path(p), {"provider": prov, "allow_fallback": args.allow_fallback,
                                                        "device": args.device}))
    for p, dt, mode in itertools.product(args.checkpoint or [], args.dtype, args.mode):
        tags = [x for x, many in ((dt, len(args.dtype) > 1), (mode, len(args.mode) > 1)) if many]
        label = name[Path(p)] + (f" [{', '.join(tags)}]" if tags else "")
        targets.append(Target(label, "checkpoint", Path(p), {"device": args.device, "dtype": dt, "mode": mode,
                                                                "deploy": args.deploy_copy}))
    if not targets:
        raise InputError("nothing to time: give --engine, --onnx and/or --checkpoint")
    return targets


def measure(args: argparse.Namespace) -> dict:
    """Time every artifact asked for; returns the JSON report (schema transkd-latency/1)."""
    import torch

    if args.batch < 1 or args.rounds < 1 or args.threads < 0:
        raise InputError("--batch and --rounds must be >= 1, --threads >= 0")
    size = parse_size(args.size) if args.size else None
    frame_size = parse_size(args.frame_size, "--frame-size") if args.frame_size else None
    warmup, amount = parse_amount(args.warmup, "--warmup"), parse_amount(args.iterations, "--iterations")
    shapes = parse_shapes(args.shapes)
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = build_targets(args)
    baseline = None
    if args.baseline:
        wanted = Path(args.baseline)
        matches = ([t.label for t in targets if t.path == wanted or t.label == args.baseline]
                   or [t.label for t in targets if t.path.name == wanted.name])
        if not matches:
            raise InputError(f"--baseline {args.baseline}: not one of the timed artifacts "
                             f"({', '.join(t.label for t in targets)})")
        baseline = matches[0]
    for t in targets:
        prepare(t, args.batch, size, frame_size, args.e2e, args.threads, args.cuda_graph, shapes=shapes)
    run_interleaved(targets, warmup, amount, args.rounds)
    settings = {"batch": args.batch, "size": args.size, "frame_size": args.frame_size, "e2e": args.e2e,
                "warmup": args.warmup, "iterations": args.iterations, "rounds": args.rounds, "threads": args.threads,
                "baseline": baseline, "cuda_graph": args.cuda_graph, "shapes": args.shapes,
                "allow_fallback": args.allow_fallback}
    return {"schema": SCHEMA, "settings": settings, "machine": machine(),
            "results": results(targets, args.batch, baseline)}


def run(args: argparse.Namespace) -> int:
    report = measure(args)
    m = report["machine"]
    print(f"latency: {m['cpu']} ({m['cpu_count']} cores), GPU {m['gpu'] or 'none'}, torch {m['torch']}, "
          f"onnxruntime {m['onnxruntime']}, threads {report['settings']['threads'] or 'default'}")
    for r in report["results"]:  # a foreign artifact's inputs, as trtexec lists them
        if "inputs" in r:
            print(f"{r['label']}: " + ", ".join(f"{name} {text}" for name, text in r["inputs"].items()))
    print(table(report["results"]))
    if args.json:
        write_json(Path(args.json), report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
