"""FP32, FP16, PTQ INT8, mixed INT8 and QAD INT8 of a run's student side by side, exported and scored the same way.

    python benchmarks/int8_accuracy.py --run-dir runs/X [--max-drop POINTS] [--out DIR] [key=value ...]

Two exports of the run's student (pipeline.export.export_student, the export stage's own function) into --out: one
with every artifact the run's export settings ask for plus student.int8-qad.onnx when the run has a QAD state
(student.qad.safetensors, from the qad stage), one with export.int8_max_drop=--max-drop (the mixed-precision
graph). Every row is an ONNX graph run by ONNX Runtime CPU and scored like export.md (the same validation frames,
full label resolution); agreement and logit differences are against the PyTorch FP32 student on the parity
frames. `key=value` overrides the run's config (e.g. export.calibration_frames=4). Writes int8_accuracy.json and
int8_accuracy.md in --out (default <run-dir>/int8-accuracy).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.cli import Parser, cli_main
from pipeline.errors import InputError

ROWS = (("FP32", "plain", "fp32"), ("FP16", "plain", "fp16"), ("PTQ INT8", "plain", "int8"),
        ("mixed INT8", "mixed", "int8"), ("QAD INT8", "plain", "int8-qad"))


def build_parser() -> Parser:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True, help="a trained run: config.yaml and student.safetensors")
    ap.add_argument("--max-drop", type=float, default=0.0, metavar="POINTS",
                    help="mIoU budget of the mixed-precision export (export.int8_max_drop), default 0")
    ap.add_argument("--out", help="output folder (default <run-dir>/int8-accuracy)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (export.*, data.*)")
    return ap


def exports(args: argparse.Namespace) -> tuple[dict[str, dict], dict]:
    """({"plain": report, "mixed": report}, what was run)."""
    from pipeline.config import apply, export_size, load, parse_overrides
    from pipeline.export import export_student
    from pipeline.models import load_model
    from pipeline.stages import STUDENT, datasets
    from pipeline.train import DistEnv

    run_dir = Path(args.run_dir)
    for need in (run_dir / "config.yaml", run_dir / STUDENT):
        if not need.is_file():
            raise InputError(f"{need}: not found; --run-dir must be a trained run (config.yaml, {STUDENT})")
    if not args.max_drop >= 0:
        raise InputError(f"--max-drop {args.max_drop}: expected mIoU points >= 0")
    cfg = apply(load(run_dir / "config.yaml"), parse_overrides(args.overrides))
    train, val = datasets(cfg, run_dir, DistEnv(0, 1, torch.device("cpu")))
    student = load_model(run_dir / STUDENT)
    qad = run_dir / "student.qad.safetensors"
    e = replace(cfg.export, size=export_size(cfg), engines="off", int8=True)
    out = Path(args.out or run_dir / "int8-accuracy")
    reports = {"plain": export_student(student, out / "plain", replace(e, int8_max_drop=-1.0), val, train,
                                       source=run_dir / STUDENT, qad=qad if qad.is_file() else None),
               "mixed": export_student(student, out / "mixed", replace(e, fp16=False, int8_max_drop=args.max_drop),
                                       val, train, source=run_dir / STUDENT)}
    setting = {"run_dir": str(run_dir), "max_drop": args.max_drop, "overrides": args.overrides,
               "calibration": {"frames": e.calibration_frames, "method": e.calibration_method},
               "qad": str(qad) if qad.is_file() else None, "out": str(out)}
    return reports, setting


def rows(reports: dict[str, dict]) -> list[dict]:
    fp32 = reports["plain"]["artifacts"]["fp32"]["miou"]
    out = []
    for label, which, name in ROWS:
        entry = reports[which]["artifacts"].get(name)
        if entry is None:
            continue
        q = entry.get("quantization", {})
        mixed = q.get("mixed_precision")
        out.append({"artifact": label, "file": f"{which}/{entry['file']}", "miou": entry["miou"],
                    "delta_vs_fp32_onnx": entry["miou"] - fp32,
                    "argmax_agreement": entry["parity"]["argmax_agreement"],
                    "max_abs_logit_diff": entry["parity"]["max_abs_logit_diff"],
                    "float_groups": q.get("float_groups", []) if q.get("backend") == "torch" else None,
                    "budget": mixed["max_drop"] if mixed else None})
    return out


def table(data: list[dict], frames: int, parity_frames: int) -> str:
    lines = [f"| artifact | mIoU % ({frames} val frames) | vs FP32 ONNX | argmax agreement with FP32 PyTorch % "
             f"({parity_frames} frames) | max abs logit diff | groups kept FP16 |", "|---|---:|---:|---:|---:|---|"]
    for r in data:
        groups = "-" if r["float_groups"] is None else (", ".join(r["float_groups"]) or "none")
        label = r["artifact"] + (f" (budget {r['budget']:g})" if r["budget"] is not None else "")
        lines.append(f"| {label} | {100 * r['miou']:.2f} | {100 * r['delta_vs_fp32_onnx']:+.2f} | "
                     f"{100 * r['argmax_agreement']:.3f} | {r['max_abs_logit_diff']:.3f} | {groups} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pipeline.io import atomic_path, write_json

    reports, setting = exports(args)
    data = rows(reports)
    plain = reports["plain"]
    text = table(data, plain["eval"]["frames"], plain["artifacts"]["fp32"]["parity"]["frames"])
    print(text)
    out = Path(setting["out"])
    write_json(out / "int8_accuracy.json", {"setting": setting, "rows": data, "reports": reports})
    with atomic_path(out / "int8_accuracy.md") as tmp:
        tmp.write_text(f"# INT8 accuracy of {setting['run_dir']}\n\n{text}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), run, argv, intermixed=True)


if __name__ == "__main__":
    sys.exit(main())
