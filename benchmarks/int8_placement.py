"""The Q/DQ placement of INT8 ONNX graphs side by side: pairs, pairs feeding no INT8 op, INT8 MAC coverage, Casts.

    python benchmarks/int8_placement.py runs/x/student.int8.onnx other.onnx [--size HxW] [--json out.json]

A static read (pipeline/qdqinfo.py: census), nothing runs: what a TensorRT INT8 engine can fuse depends on where the
pairs sit, and a pair whose DequantizeLinear reaches no Conv/MatMul/Gemm only rounds the tensor.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.cli import Parser, cli_main
from pipeline.config import parse_size
from pipeline.io import write_json
from pipeline.qdqinfo import census, table


def build_parser() -> Parser:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("graphs", nargs="+", metavar="ONNX", help="Q/DQ ONNX files, one column each")
    ap.add_argument("--size", help="HEIGHTxWIDTH for graphs with a dynamic input (the MACs need shapes)")
    ap.add_argument("--json", metavar="FILE", help="write every census to FILE")
    return ap


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size) if args.size else None
    counts = [census(path, size) for path in args.graphs]
    print(table(*counts, names=args.graphs))
    for path, c in zip(args.graphs, counts):
        print(f"\n{path}: {c['dangling_pairs']} dangling activation pairs, {len(c['float_compute'])} float "
              "Conv/MatMul/Gemm nodes")
        for d in c["dangling"]:
            print(f"  dangling {d['tensor']} -> {', '.join(d['feeds'])}")
        for f in c["float_compute"]:
            print(f"  float {f['op']} {f['node']} ({f['macs'] / 1e6:.2f} MMACs)")
    if args.json:
        write_json(args.json, {"graphs": [{"path": p, **c} for p, c in zip(args.graphs, counts)]})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
