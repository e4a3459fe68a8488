"""Sensitivity of a run's student to INT8, group by group, and the mixed precision each mIoU budget gets.

    python benchmarks/int8_sensitivity.py --run-dir runs/X [--frames N] [--sqnr-frames N] \
        [--calibration-frames N] [--method entropy|max] [--max-drop 0 0.05 ...] [--out DIR]

The run's student (student.safetensors) is fake-quantized with pipeline/quant.py's placement and calibrated on
training frames as export calibrates it (export.graph_inputs at the export size; defaults from the run's
config.yaml). Then, on validation frames scored as export scores artifacts (pipeline/sensitivity.py): every
group alone in INT8 and alone in float (logit SQNR against the FP32 student, mIoU), ranked most sensitive first;
mIoU against the number of INT8 groups; and `choose` for each --max-drop, timed as the export stage would pay it.
Writes sensitivity.json, sensitivity.md and sensitivity.png in --out (default <run-dir>/sensitivity).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.cli import Parser, cli_main
from pipeline.errors import InputError


def build_parser() -> Parser:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True, help="a trained run: config.yaml and student.safetensors")
    ap.add_argument("--frames", type=int, help="validation frames scored for mIoU (0: all; default export.eval_frames)")
    ap.add_argument("--sqnr-frames", type=int, default=8, help="validation frames of the logit SQNR")
    ap.add_argument("--calibration-frames", type=int, help="training frames (default export.calibration_frames)")
    ap.add_argument("--method", choices=["entropy", "max"], help="calibration (default export.calibration_method)")
    ap.add_argument("--max-drop", type=float, nargs="*", default=[], metavar="POINTS",
                    help="mIoU budgets to run the mixed-precision chooser with")
    ap.add_argument("--out", help="output folder (default <run-dir>/sensitivity)")
    return ap


def setup(args: argparse.Namespace):
    """The run's config, datasets and student, and its calibrated fake-quant copy; (cfg, train, val, student, qm,
    calibration record)."""
    from pipeline import quant
    from pipeline.config import ExportConfig, export_size, load
    from pipeline.export import graph_inputs
    from pipeline.models import load_model
    from pipeline.models.checkpoints import checkpoint_metadata
    from pipeline.stages import STUDENT, datasets
    from pipeline.train import DistEnv

    run_dir = Path(args.run_dir)
    for need in (run_dir / "config.yaml", run_dir / STUDENT):
        if not need.is_file():
            raise InputError(f"{need}: not found; --run-dir must be a trained run (config.yaml, {STUDENT})")
    cfg = load(run_dir / "config.yaml")
    train, val = datasets(cfg, run_dir, DistEnv(0, 1, torch.device("cpu")))
    student = load_model(run_dir / STUDENT)
    if student.config.num_classes != val.num_classes:
        raise InputError(f"{run_dir / STUDENT}: predicts {student.config.num_classes} classes, {val.name} has "
                         f"{val.num_classes}")
    count = cfg.export.calibration_frames if args.calibration_frames is None else args.calibration_frames
    method = args.method or cfg.export.calibration_method
    if count < 1:
        raise InputError(f"--calibration-frames {count}: expected >= 1")
    # float NCHW frames, the fake-quant model's own input (a uint8 graph normalises inside: the same numbers)
    e = ExportConfig(size=export_size(cfg))
    qm = quant.quantize(student)
    calib = [torch.from_numpy(x) for x in graph_inputs(train, count, e, checkpoint_metadata(student).normalization)]
    quant.calibrate(qm, calib, method)
    return cfg, val, student, qm, {"frames": len(calib), "method": method, "split": train.split, "size": list(e.size)}


def measure(args: argparse.Namespace) -> dict:
    from pipeline import quant, sensitivity
    from pipeline.config import export_size
    from pipeline.evaluate import spread

    t0 = time.perf_counter()
    cfg, val, student, qm, calibration = setup(args)
    frames = cfg.export.eval_frames if args.frames is None else args.frames
    kw = {"frames": frames, "sqnr_frames": args.sqnr_frames, "size": export_size(cfg)}
    seconds = {"setup": time.perf_counter() - t0}
    t = time.perf_counter()
    records = sensitivity.rank(qm, student, val, **kw)
    seconds["rank"] = time.perf_counter() - t
    t = time.perf_counter()
    c = sensitivity.curve(qm, student, val, records, **kw)
    seconds["curve"] = time.perf_counter() - t
    choices = []
    for budget in args.max_drop:
        choices.append(sensitivity.choose(qm, student, val, budget, **kw).record())  # its own SQNR ranking
        quant.set_float(qm, [])
    return {"run_dir": str(args.run_dir), "variant": student.config.variant, "calibration": calibration,
            "eval": {"dataset": val.name, "split": val.split, "frames": len(spread(len(val), frames)),
                     "sqnr_frames": args.sqnr_frames, "size": list(kw["size"])},
            "ranking": [vars(r) for r in records], "curve": vars(c), "choices": choices, "seconds": seconds,
            "env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine()}}


def markdown(result: dict, records) -> str:
    from pipeline.sensitivity import table

    c, ev = result["curve"], result["eval"]
    lines = [f"# INT8 sensitivity of {result['run_dir']} ({result['variant']})", "",
             f"Calibration: {result['calibration']['frames']} {result['calibration']['split']} frames, "
             f"{result['calibration']['method']}. mIoU on {ev['frames']} {ev['dataset']} {ev['split']} frames at "
             f"full label resolution, logit SQNR on {ev['sqnr_frames']}, network {ev['size'][0]}x{ev['size'][1]}. "
             f"FP32 student mIoU {100 * c['fp32_miou']:.2f} %, all groups INT8 {100 * c['miou'][-1]:.2f} %. "
             "Drops and gains in mIoU points.", "", table(records), "",
             "## mIoU against the number of INT8 groups (least sensitive first)", "",
             "| INT8 groups | last turned INT8 | mIoU % | SQNR dB |", "|---:|---|---:|---:|"]
    lines += [f"| {k} | {c['order'][k - 1] if k else '-'} | {100 * m:.2f} | {s:.1f} |"
              for k, (m, s) in enumerate(zip(c["miou"], c["sqnr_db"]))]
    if result["choices"]:
        lines += ["", "## Mixed precision per budget", "",
                  "| max drop | float groups | mIoU % | drop | mIoU scorings | seconds |",
                  "|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {ch['max_drop']:g} | {', '.join(ch['float_groups']) or '-'} | {100 * ch['miou']:.2f} | "
                  f"{round(ch['drop'], 2) + 0.0:+.2f} | {len(ch['trajectory'])} | {ch['seconds']:.1f} |"
                  for ch in result["choices"]]
    lines += ["", "![mIoU against the number of INT8 groups](sensitivity.png)", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pipeline.io import atomic_path, write_json
    from pipeline.sensitivity import Curve, Sensitivity, plot, table

    out = Path(args.out) if args.out else Path(args.run_dir) / "sensitivity"
    result = measure(args)
    records = [Sensitivity(**r) for r in result["ranking"]]
    print(table(records))
    for ch in result["choices"]:
        print(f"max drop {ch['max_drop']:g}: float {ch['float_groups'] or 'none'}, mIoU {100 * ch['miou']:.2f} % "
              f"({round(ch['drop'], 2) + 0.0:+.2f}), {len(ch['trajectory'])} scorings, {ch['seconds']:.1f} s")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sensitivity.json", result)
    with atomic_path(out / "sensitivity.md") as tmp:
        tmp.write_text(markdown(result, records))
    plot(Curve(**result["curve"]), out / "sensitivity.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
