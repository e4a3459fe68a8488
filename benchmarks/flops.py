"""Parameters and GMACs of SegFormer models, checkpoints or ONNX files, in the paper's convention and in full.

    python benchmarks/flops.py --model mit_b2 mit_b0 --size 512x1024 [--json [FILE]]

paper: mmcv-style module hooks (the convention of the TransKD and SegFormer tables); full: paper + the attention
matmuls; an ONNX file: Conv/MatMul/Gemm of its graph. The counter is pipeline/flops.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from pipeline.cli import Parser, cli_main
from pipeline.config import parse_size
from pipeline.flops import count


def build_parser() -> Parser:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["mit_b2", "mit_b0"],
                    help="variant names, checkpoints or .onnx files; the first is the reference (teacher)")
    ap.add_argument("--size", nargs="+", default=["512x1024"], help="input HEIGHTxWIDTH, one or more")
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write JSON to FILE (or stdout)")
    return ap


def rows(models: Sequence[str], sizes: Sequence[tuple[int, int]]) -> list[dict]:
    """One row per model and size, with the reduction against the first model at that size."""
    out = []
    for size in sizes:
        ref = None
        for spec in models:
            c = count(spec, size)
            ref = ref or c
            # the reduction is in the paper's convention where both have one (an ONNX graph has none)
            both_paper = c.paper > 0 and ref.paper > 0
            a, b = (c.paper, ref.paper) if both_paper else (c.full, ref.full)
            out.append({"model": spec, "size": f"{size[0]}x{size[1]}", **asdict(c), "paper": c.paper,
                        "full": c.full, "paper_gmacs": c.paper / 1e9, "full_gmacs": c.full / 1e9,
                        "reduction_pct": 100.0 * (1 - a / b), "reduction_of": "paper" if both_paper else "full"})
    return out


def run(args: argparse.Namespace) -> int:
    table = rows(args.model, [parse_size(s) for s in args.size])
    lines = ["| model | input | params (M) | GMACs paper | GMACs full | reduction vs first |",
             "|---|---|---:|---:|---:|---:|"]
    for r in table:
        paper = f"{r['paper_gmacs']:.2f}" if r["paper"] else "n/a"
        lines.append(f"| {r['model']} | {r['size']} | {r['params'] / 1e6:.2f} | {paper} | {r['full_gmacs']:.2f} "
                     f"| {r['reduction_pct']:.1f} % ({r['reduction_of']}) |")
    if args.json != "-":
        print("\n".join(lines))
        print("paper: mmcv-style module hooks (conv, linear, norms, ReLU; attention matmuls not counted), the "
              "convention of the TransKD/SegFormer tables.\nfull: paper + attention matmuls (Q K^T, A V). "
              "ONNX rows: Conv/MatMul/Gemm of the graph, no biases or norms.")
    if args.json:
        text = json.dumps({"rows": table}, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
