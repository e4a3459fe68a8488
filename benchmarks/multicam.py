"""Throughput of the ROS node's processing loop: N cameras in one batched loop against N single-camera loops.

    PYTHONPATH=ros python benchmarks/multicam.py --checkpoint runs/ev_default/student.safetensors \
        --frame-size 720x1280 --json benchmarks/results/multicam_cpu-2core.json

(the loop is the ROS package's, ros/transkd_segmentation, which is not part of the pip package: PYTHONPATH=ros)

The student is exported here twice at the network size (a static batch-1 graph, the single-camera node's artifact,
and a static batch-N graph for the batched node), and with `--labels` twice more as labels graphs at the camera size
(the upsample and argmax inside the graph). Per tick every camera sends one bgr8 sensor_msgs/Image (rosbags' class)
stamped with the wall clock; the batched loop segments all N in one predict, the N single-camera loops (each with its
own Segmenter on the batch-1 graph, as N separate nodes would have) run one after the other. Run one after the other,
the single loops never compete for the cores, which N node processes would: their numbers are an upper bound, the
batched loop's gain a lower one. The setups alternate in rounds so that both see the same machine state.

Columns: frames/s over all cameras, the rate each camera gets, stamp-to-publish latency p50 (the mask's publish
time; a single loop's frame waits for the loops before it), and means per frame: all of it, the network alone (the
backend's run), predict (preprocess + network + upsample/argmax to the output size), and the rest (decode, overlay,
message fields).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from pipeline.cli import Parser, cli_main
from pipeline.config import ExportConfig, parse_size
from pipeline.io import write_json
from pipeline.rosmsg import stamp_ns

try:
    from transkd_segmentation.processing import CameraOutputs, SegmentationLoop
    from transkd_segmentation.stats import BatchStats
except ModuleNotFoundError:  # run without the ROS package on the path
    sys.exit("error: the node's loop is ros/transkd_segmentation: run with PYTHONPATH=ros (from the repository root)")


class Timed:
    """A function whose calls' time is summed (the Segmenter's predict, its backend's run)."""

    def __init__(self, fn) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args):
        t0 = time.perf_counter()
        out = self.fn(*args)
        self.seconds += time.perf_counter() - t0
        return out


def export_graphs(model, folder: Path, size: tuple[int, int], cameras: int, labels: Sequence[tuple[int, int]],
                  data: Path) -> dict[str, Path]:
    """{name: ONNX file}: logits graphs of batch 1 and `cameras`, and labels graphs at each camera size in `labels`."""
    from pipeline.data import build_dataset, ensure_synthetic
    from pipeline.export import export_student

    root = ensure_synthetic(data, 4, 4, size, 0, progress=False)
    train, val = build_dataset("synthetic", root, "train"), build_dataset("synthetic", root, "val")
    quick = {"fp16": False, "int8": False, "parity_frames": 2, "eval_frames": 2}
    specs = {f"logits-b{b}": ExportConfig(size=size, batch=b, **quick) for b in (1, cameras)}
    for h, w in labels:
        specs.update({f"labels{h}x{w}-b{b}": ExportConfig(size=size, batch=b, output="labels", labels_size=(h, w),
                                                          **quick) for b in (1, cameras)})
    out = {}
    for name, e in specs.items():
        export_student(model, folder / name, e, val, train)
        out[name] = folder / name / "student.onnx"
    return out


class Setup:
    """One way of serving the cameras: one batched loop, or one loop per camera; its timings summed over rounds."""

    def __init__(self, name: str, graph: str, resolution: str) -> None:
        self.name, self.graph, self.resolution = name, graph, resolution
        self.loops: list[tuple[SegmentationLoop, list[str]]] = []
        self.network: list[Timed] = []  # each Segmenter's backend.run
        self.predict: list[Timed] = []  # each Segmenter's predict
        self.wall = 0.0
        self.frames = 0
        self.latency_ms: list[float] = []
        self.measuring = False

    def tick(self, msgs: dict[str, object], stamp) -> None:
        for m in msgs.values():  # every camera's frame taken at the same instant
            stamp(m)
        for loop, cameras in self.loops:
            for c in cameras:
                loop.submit(msgs[c], c)
            assert loop.step()

    def run(self, msgs: dict[str, object], ticks: int, stamp) -> None:
        self.measuring = True
        t0 = time.perf_counter()
        for _ in range(ticks):
            self.tick(msgs, stamp)
        self.wall += time.perf_counter() - t0
        self.frames += ticks * len(msgs)

    def reset(self) -> None:
        for loop, _ in self.loops:  # the warm-up's batches do not count
            loop.batches = BatchStats(100_000)
        for t in self.network + self.predict:
            t.seconds = 0.0

    def row(self, cameras: int) -> dict:
        """Means per frame over the timed ticks: all of it (wall), predict, the network within predict, and the
        rest (decode, overlay, message fields)."""
        batches = [loop.batches.snapshot() for loop, _ in self.loops]
        assert sum(b["frames"] for b in batches) == self.frames
        per_frame = {name: sum(t.seconds for t in timers) * 1e3 / self.frames
                     for name, timers in (("network", self.network), ("predict", self.predict))}
        total = self.wall * 1e3 / self.frames
        fps = self.frames / self.wall
        return {"setup": self.name, "graph": self.graph, "output_resolution": self.resolution,
                "frames_per_s": fps, "camera_hz": fps / cameras,
                "latency_p50_ms": float(np.percentile(self.latency_ms, 50)),
                "latency_p90_ms": float(np.percentile(self.latency_ms, 90)),
                "total_ms_per_frame": total, "network_ms_per_frame": per_frame["network"],
                "predict_ms_per_frame": per_frame["predict"], "other_ms_per_frame": total - per_frame["predict"],
                "mean_batch": statistics.mean(b["mean_batch"] for b in batches)}


def build_setups(graphs: dict[str, Path], frame: tuple[int, int], cameras: list[str], labels: bool,
                 threads: int) -> list[Setup]:
    from pipeline.infer import Segmenter

    setups = []
    kinds = [("logits", "camera"), ("logits", "network")] + ([("labels", "camera")] if labels else [])
    for graph, resolution in kinds:
        stem = "logits" if graph == "logits" else f"labels{frame[0]}x{frame[1]}"
        for batched in (True, False):
            n = len(cameras) if batched else 1
            groups = [cameras] if batched else [[c] for c in cameras]
            setup = Setup("batched" if batched else "single x N", graph, resolution)
            for group in groups:
                seg = Segmenter.open(graphs[f"{stem}-b{n}"], provider="cpu", threads=threads)
                seg.backend.run = Timed(seg.backend.run)
                seg.predict = Timed(seg.predict)
                setup.network.append(seg.backend.run)
                setup.predict.append(seg.predict)

                def mask(f, s=setup):
                    if s.measuring:
                        s.latency_ms.append((time.time_ns() - stamp_ns(f["header"])) / 1e6)

                outputs = {c: CameraOutputs(mask, lambda f: None) for c in group}
                setup.loops.append((SegmentationLoop(seg, outputs, clock=time.time_ns, output_resolution=resolution,
                                                     window=100_000), group))
            setups.append(setup)
    return setups


def camera_messages(frames: list[np.ndarray], frame: tuple[int, int], cameras: list[str]) -> dict[str, object]:
    """One bgr8 Image per camera, each a different frame at the camera size."""
    from rosbags.typesys import Stores, get_typestore

    t = get_typestore(Stores.ROS2_HUMBLE).types
    out = {}
    for i, c in enumerate(cameras):
        bgr = cv2.resize(frames[i % len(frames)], frame[::-1], interpolation=cv2.INTER_LINEAR)
        head = t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=0, nanosec=0), frame_id=c)
        out[c] = t["sensor_msgs/msg/Image"](header=head, height=frame[0], width=frame[1], encoding="bgr8",
                                            is_bigendian=0, step=3 * frame[1], data=bgr.reshape(-1))
    return out


def stamp_now(msg) -> None:
    now = time.time_ns()
    msg.header.stamp.sec, msg.header.stamp.nanosec = now // 1_000_000_000, now % 1_000_000_000


def measure(setups: list[Setup], msgs: dict[str, object], ticks: int, rounds: int, warmup: int) -> None:
    for s in setups:
        for _ in range(warmup):
            s.tick(msgs, stamp_now)
        s.reset()
    for r in range(rounds):
        order = setups if r % 2 == 0 else setups[::-1]
        for s in order:
            s.run(msgs, max(1, ticks // rounds), stamp_now)


def table(rows: list[dict]) -> str:
    head = ("| frame | graph | output | setup | frames/s | per camera Hz | latency p50 ms | ms/frame | network | "
            "predict | other |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "\n".join(
        f"| {r['frame']} | {r['graph']} | {r['output_resolution']} | {r['setup']} | {r['frames_per_s']:.1f} | "
        f"{r['camera_hz']:.1f} | {r['latency_p50_ms']:.0f} | {r['total_ms_per_frame']:.1f} | "
        f"{r['network_ms_per_frame']:.1f} | {r['predict_ms_per_frame']:.1f} | {r['other_ms_per_frame']:.1f} |"
        for r in rows)


def build_parser() -> Parser:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="the student to export (default: a randomly initialised MiT-B0; the "
                                         "weights do not change the timing)")
    ap.add_argument("--size", default="128x256", help="network HxW")
    ap.add_argument("--frame-size", nargs="+", default=["720x1280"], help="camera frame HxW (several: one run each)")
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--ticks", type=int, default=30, help="ticks (one frame per camera each) timed per setup")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds the ticks are split into")
    ap.add_argument("--warmup", type=int, default=2, help="ticks per setup before timing")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads per session (0: default)")
    ap.add_argument("--labels", action="store_true", help="also labels graphs at the camera size")
    ap.add_argument("--json", metavar="FILE", help="write the settings and every row as JSON")
    return ap


def run(args: argparse.Namespace) -> int:
    import torch

    from pipeline.models import build_model, load_model
    from pipeline.timing import machine

    size = parse_size(args.size, "--size")
    frames_hw = [parse_size(f, "--frame-size") for f in args.frame_size]
    cameras = ["front", "left", "right", "rear", "front_left", "front_right", "rear_left", "rear_right"]
    cameras = cameras[:args.cameras] if args.cameras <= len(cameras) else [f"cam{i}" for i in range(args.cameras)]
    torch.manual_seed(0)
    model = load_model(args.checkpoint) if args.checkpoint else build_model("mit_b0", num_classes=19)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"exporting the student at {size[0]}x{size[1]} ...", file=sys.stderr)
        graphs = export_graphs(model.eval(), Path(tmp), size, len(cameras), frames_hw if args.labels else [],
                               Path(tmp) / "synthetic")
        from pipeline.data import build_dataset

        val = build_dataset("synthetic", Path(tmp) / "synthetic", "val")
        frames = [np.ascontiguousarray(val.read(i)[0][:, :, ::-1]) for i in range(len(val))]
        for frame in frames_hw:
            msgs = camera_messages(frames, frame, cameras)
            setups = build_setups(graphs, frame, cameras, args.labels, args.threads)
            measure(setups, msgs, args.ticks, args.rounds, args.warmup)
            rows += [{"frame": f"{frame[0]}x{frame[1]}", **s.row(len(cameras))} for s in setups]
    print(table(rows))
    if args.json:
        write_json(args.json, {"settings": {k: v for k, v in vars(args).items() if k != "func"},
                               "network_size": list(size), "camera_names": cameras, "machine": machine(),
                               "rows": rows})
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(cli_main(build_parser(), run, argv))


if __name__ == "__main__":
    main()
