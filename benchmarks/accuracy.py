"""mIoU of any artifact (checkpoint, ONNX of any precision, TensorRT engine) on a dataset split, through Segmenter.

    python benchmarks/accuracy.py runs/X/student.int8.onnx runs/X/student.safetensors --dataset synthetic \
        --root data/synthetic --split val [--size 128x256] [--frames 100] [--json FILE]

Frames go in as a camera gives them (BGR uint8, full resolution); Segmenter resizes them to the network and
returns class ids at full resolution, the path the ROS node takes. The score is pipeline.evaluate.score, the
training evaluator's confusion matrix at full label resolution (255 ignored), so a PyTorch checkpoint scores what
`eval` says.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.cli import Parser, cli_main
from pipeline.config import parse_size
from pipeline.data.datasets import DATASETS
from pipeline.errors import InputError
from pipeline.infer import PROVIDERS


def build_parser() -> Parser:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="+", help="checkpoints, .onnx files, .plan engines")
    ap.add_argument("--dataset", default="synthetic", choices=list(DATASETS))
    ap.add_argument("--root", default="data/synthetic", help="the dataset folder")
    ap.add_argument("--split", default="val")
    ap.add_argument("--size", help="network HxW where the artifact does not fix it (PyTorch, dynamic ONNX)")
    ap.add_argument("--frames", type=int, default=0, help="frames spread over the split (0: all)")
    ap.add_argument("--provider", default="auto", choices=["auto", *PROVIDERS])
    ap.add_argument("--device", default="auto", help="PyTorch device")
    ap.add_argument("--per-class", action="store_true", help="print the per-class IoU table of each artifact")
    ap.add_argument("--json", metavar="FILE")
    return ap


def run(args: argparse.Namespace) -> int:
    from pipeline.data import build_dataset
    from pipeline.evaluate import score, spread
    from pipeline.infer import Segmenter
    from pipeline.io import write_json

    size = parse_size(args.size) if args.size else None
    dataset = build_dataset(args.dataset, args.root, args.split)
    rows = []
    for path in args.artifacts:
        seg = Segmenter.open(path, device=args.device, provider=args.provider, size=size)
        if seg.size is None:
            raise InputError(f"{path}: the network takes any size: give --size HxW (the size it was trained at)")
        res = score(seg, dataset, args.frames)
        rows.append({**seg.describe(), "miou": res.miou, "pixel_accuracy": res.pixel_acc,
                     "frames": len(spread(len(dataset), args.frames)), "result": res.to_dict()})
        if args.per_class:
            print(f"{path}:\n{res.table()}\n")
    print(f"mIoU on {rows[0]['frames']} {args.dataset} {args.split} frames at full label resolution")
    print("| artifact | backend | precision | size | mIoU % | pixel acc % |\n|---|---|---|---|---:|---:|")
    for r in rows:
        print(f"| {Path(r['artifact']).name} | {r['backend']} | {r['precision']} | {r['size'][0]}x{r['size'][1]} | "
              f"{100 * r['miou']:.2f} | {100 * r['pixel_accuracy']:.2f} |")
    if args.json:
        write_json(Path(args.json), {"dataset": args.dataset, "split": args.split, "results": rows})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
