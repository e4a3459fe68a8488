"""Training-step throughput of each distillation method against the student alone, side by side.

    python benchmarks/train_speed.py --method none kd cwd review transkd-base transkd-gl transkd-ea \
        --teacher mit_b2 --student mit_b0 --size 256x512 --batch 2 [--json FILE]

One step = teacher taps (no autograd) + student taps + the method's loss + backward + AdamW step. The methods
are timed in alternating rounds on the same batch, so every ratio compares steps taken under the same machine
state; `none` is always included as the reference.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from pipeline.amp import autocast
from pipeline.cli import Parser, cli_main
from pipeline.config import parse_size
from pipeline.distill import METHODS, build_method
from pipeline.io import write_json
from pipeline.models import VARIANTS, build_model


def make_step(name: str, teacher, student_variant: str, x: torch.Tensor, y: torch.Tensor,
              amp_dtype: torch.dtype | None = None):
    """One optimizer step as the Trainer takes it, on x's device: teacher taps, student taps and the loss under
    autocast in `amp_dtype` (None: float32), a scaled backward (GradScaler for fp16), AdamW."""
    student = build_model(student_variant).to(x.device).train()
    method = build_method(name, teacher, student)
    method.modules.to(x.device).train()
    opt = torch.optim.AdamW(list(student.parameters()) + list(method.modules.parameters()), lr=6e-5)
    scaler = torch.amp.GradScaler(x.device.type, enabled=amp_dtype == torch.float16)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast(amp_dtype, x.device):
            loss = method.loss(student.features(x), method.teacher_features(x), y)["total"]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.item()

    return step


def build_parser() -> Parser:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--teacher", default="mit_b2", choices=list(VARIANTS))
    ap.add_argument("--student", default="mit_b0", choices=list(VARIANTS))
    ap.add_argument("--size", default="256x512")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    ap.add_argument("--iters", type=int, default=2, help="steps per method per round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", metavar="FILE")
    return ap


def time_steps(steps: dict, rounds: int, iters: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each method, in alternating rounds after `warmup` untimed steps each."""
    names = list(steps)
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            for _ in range(iters):
                t0 = time.perf_counter()
                steps[n]()
                times[n].append(time.perf_counter() - t0)
    return times


def run(args: argparse.Namespace) -> int:
    h, w = parse_size(args.size)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, h, w)
    y = torch.randint(0, 19, (args.batch, h, w))
    teacher = build_model(args.teacher)
    names = ["none"] + [m for m in dict.fromkeys(args.method) if m != "none"]
    times = time_steps({n: make_step(n, teacher, args.student, x, y) for n in names}, args.rounds, args.iters,
                       args.warmup)
    base = statistics.median(times["none"])
    rows = []
    for n in names:
        med = statistics.median(times[n])
        rows.append({"method": n, "step_ms_median": med * 1e3, "step_ms_min": min(times[n]) * 1e3,
                     "images_per_s": args.batch / med, "relative_to_none": base / med, "samples": len(times[n])})
    print(f"training step, teacher {args.teacher} -> student {args.student}, batch {args.batch}, {h}x{w}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| method | ms / step (median) | images / s | throughput vs none |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['step_ms_median']:.0f} | {r['images_per_s']:.2f} | {r['relative_to_none']:.2f}x |")
    if args.json:
        env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
               "teacher": args.teacher, "student": args.student, "batch": args.batch, "size": f"{h}x{w}"}
        write_json(args.json, {"env": env, "rows": rows})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
