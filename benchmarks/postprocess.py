"""Class ids at camera resolution on the host: the upsample + argmax a logits graph leaves to the CPU, two ways.

    python benchmarks/postprocess.py --camera 1080x1920 720x1280 --logits 128x256 --classes 19 [--json FILE]

`all planes`: every class plane resized at once (OpenCV, H x W x C) and argmax over the last axis, the Segmenter's
former path; `running max`: infer.upsampled_argmax, one plane at a time. Both run interleaved in one process on the
same logits, and the ids are compared. A labels graph with export.labels_size at the camera's size moves this work
into the graph (onto the GPU under TensorRT), which leaves the host nothing but a copy.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import cv2
import numpy as np

from pipeline.cli import Parser, cli_main
from pipeline.config import parse_size
from pipeline.infer import upsampled_argmax
from pipeline.timing import machine


def all_planes(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    hwc = np.ascontiguousarray(logits.transpose(1, 2, 0))
    return cv2.resize(hwc, (w, h), interpolation=cv2.INTER_LINEAR).argmax(-1).astype(np.uint8)


WAYS: dict[str, Callable[[np.ndarray, tuple[int, int]], np.ndarray]] = {"all planes": all_planes,
                                                                        "running max": upsampled_argmax}


def measure(logits: np.ndarray, size: tuple[int, int], rounds: int) -> dict:
    """Median milliseconds of each way over `rounds` interleaved calls, and their agreement."""
    ids = {name: fn(logits, size) for name, fn in WAYS.items()}  # warm-up, and the ids compared
    times: dict[str, list[float]] = {name: [] for name in WAYS}
    for _ in range(rounds):
        for name, fn in WAYS.items():
            start = time.perf_counter()
            fn(logits, size)
            times[name].append((time.perf_counter() - start) * 1e3)
    ms = {name: float(np.median(t)) for name, t in times.items()}
    return {"camera": f"{size[0]}x{size[1]}", "ms": ms, "speedup": ms["all planes"] / ms["running max"],
            "agreement": float((ids["all planes"] == ids["running max"]).mean())}


def run(args: argparse.Namespace) -> int:
    h, w = parse_size(args.logits, "--logits")
    rng = np.random.default_rng(0)
    # smooth logits, as a network's are: regions of one class with boundaries between them
    noise = rng.standard_normal((h, w, args.classes)).astype(np.float32)
    logits = np.ascontiguousarray((cv2.GaussianBlur(noise, (0, 0), 3) * 8).transpose(2, 0, 1))
    rows = [measure(logits, parse_size(c, "--camera"), args.rounds) for c in args.camera]
    print("| camera | logits | all planes (ms) | running max (ms) | speed-up | same ids |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['camera']} | {args.classes}x{h}x{w} | {r['ms']['all planes']:.1f} | {r['ms']['running max']:.1f} "
              f"| {r['speedup']:.2f}x | {100 * r['agreement']:.4f} % |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"logits": [args.classes, h, w], "rounds": args.rounds, "machine": machine(), "rows": rows}, f,
                      indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--camera", nargs="+", default=["1080x1920", "720x1280"], help="camera HEIGHTxWIDTH, one or more")
    ap.add_argument("--logits", default="128x256", help="logits HEIGHTxWIDTH (1/4 of a 512x1024 network)")
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    return cli_main(ap, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
