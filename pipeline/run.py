"""`python -m pipeline.run STAGE [STAGE ...] [--config FILE] [--run-dir DIR] [key=value ...]`: the pipeline's CLI."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from pipeline import config as config_mod
from pipeline.config import Config
from pipeline.errors import ConfigError, InputError, PipelineError
from pipeline.io import atomic_path, write_json

STAGES = {
    "teacher": "train the teacher on the dataset (from scratch, teacher.pretrained or teacher.checkpoint)",
    "distill": "distil the student from the teacher (trains the teacher first when there is none)",
    "eval": "mIoU of a checkpoint (--checkpoint, default the run's student) on the validation split",
    "export": "student.onnx (parity-checked), student.fp16.onnx, student.int8.onnx + sidecars and export.md; "
              "TensorRT plans where TensorRT and a GPU exist (--checkpoint X exports any loadable checkpoint)",
    "trt-build": "TensorRT engines from the run's ONNX files (fails when TensorRT or a GPU is missing)",
    "bench": "params, GMACs, latency and mIoU of every artifact in the run: report.md, report.json, report.png",
    "segment-bag": "segment --topic of a ROS 1 / ROS 2 bag (--bag) with --artifact into a new bag (--out) holding "
                   "the original messages plus mask and overlay topics; --video adds an mp4 of the overlays",
}
TRAINING_STAGES = ("teacher", "distill")
log = logging.getLogger("pipeline")


class _TqdmHandler(logging.Handler):
    """Console log lines that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(run_dir: Path | None, main: bool, debug: bool) -> None:
    log.handlers.clear()
    log.setLevel(logging.DEBUG)
    log.propagate = False
    console = _TqdmHandler()
    console.setLevel(logging.DEBUG if debug else logging.INFO)
    console.setFormatter(logging.Formatter("[pipeline] %(message)s"))
    if main:
        log.addHandler(console)
    if run_dir is not None and main:
        file = logging.FileHandler(run_dir / "run.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file)
    data_log = logging.getLogger("pipeline.data")
    data_log.handlers, data_log.propagate = [], True


def build_parser() -> argparse.ArgumentParser:
    lines = [f"  {k:<28} {json.dumps(v, default=list)}" for k, v in config_mod.keys().items()]
    epilog = ("stages:\n" + "\n".join(f"  {k:<10} {v}" for k, v in STAGES.items())
              + "\n\nkeys (key=value, defaults shown):\n" + "\n".join(lines)
              + "\n\nexample: python -m pipeline.run distill data.size=128x256 train.steps=200 "
              "distill.method=transkd-ea")
    ap = argparse.ArgumentParser(prog="python -m pipeline.run", description="Distil, export and benchmark a "
                                 "SegFormer student with TransKD.", epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("items", nargs="*", metavar="STAGE|key=value", help="stages to run, left to right, and overrides")
    ap.add_argument("--config", help="YAML file with sections data, teacher, student, train, distill")
    ap.add_argument("--run-dir", help="run directory (default: runs/<date>-<time>); an existing one is resumed")
    ap.add_argument("--checkpoint", help="eval, export: the checkpoint to use (anything load_model loads; default "
                    "the run's student.safetensors)")
    ap.add_argument("--write-cityscapes", metavar="DIR", help="eval: also write Cityscapes-format predictions")
    ap.add_argument("--quarter-res", action="store_true",
                    help="eval: score at 1/4 resolution like the TransKD reference (comparison only)")
    ap.add_argument("--bag", help="segment-bag: the input, a ROS 1 .bag file or a ROS 2 bag directory (sqlite3 or "
                    "MCAP)")
    ap.add_argument("--topic", help="segment-bag: the camera topic (sensor_msgs/Image or CompressedImage)")
    ap.add_argument("--artifact", help="segment-bag: engine, ONNX or checkpoint (default: the run's student.onnx)")
    ap.add_argument("--out", help="segment-bag: the output bag (default: <run dir>/<input name>.segmented[.bag])")
    ap.add_argument("--video", metavar="MP4", help="segment-bag: also write the overlays as an mp4 video")
    ap.add_argument("--fps", type=float, default=0.0, help="segment-bag: video frame rate (default: the topic's)")
    ap.add_argument("--no-overlay", action="store_true", help="segment-bag: write the mask topic only")
    ap.add_argument("--mask-topic", default="/segmentation/mask", help="segment-bag: topic of the mono8 class ids")
    ap.add_argument("--overlay-topic", default="/segmentation/overlay", help="segment-bag: topic of the rgb8 overlay")
    ap.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return ap


def _write_config(run_dir: Path, cfg: Config, training: bool) -> None:
    """config.yaml, the resolved config, written before anything else happens. An existing run directory keeps
    its config: training there with other values of keys that change results is refused before anything is
    touched; other changes (workers, logging, or an eval-only call) archive the old file as config.<time>.yaml."""
    from pipeline.train import RESUMABLE_KEYS

    path = run_dir / "config.yaml"
    text = config_mod.dump(cfg)
    if path.is_file():
        old_text = path.read_text()
        if old_text == text:
            return
        try:
            old = config_mod.flatten(yaml.safe_load(old_text) or {})
        except yaml.YAMLError:
            old = {}
        new = config_mod.flatten(yaml.safe_load(text))
        # export.* and bench.* only shape artifacts made from the trained models, never the training itself
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_KEYS
                        and not k.startswith(("export.", "bench.")))
        if training and cfg.train.resume == "auto" and differ:
            shown = ", ".join(differ[:6]) + (f" (+{len(differ) - 6} more)" if len(differ) > 6 else "")
            raise ConfigError(f"{path}: this run directory was made with other values of {shown}; use another "
                              "--run-dir, the same values, or train.resume=never to start over")
        os.replace(path, run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    except OSError as e:
        raise ConfigError(f"{run_dir}: cannot write the run directory ({e.strerror or e})") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        return _run(args)
    except PipelineError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; `resume=auto` continues from the last checkpoint", file=sys.stderr)
        return 130


def _run(args) -> int:
    stages = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if not stages:
        raise ConfigError(f"no stage given; expected one or more of {', '.join(STAGES)} (see --help)")
    for s in stages:
        if s not in STAGES:
            raise ConfigError(f"unknown stage {s!r}; expected one of {', '.join(STAGES)}")
    cfg = config_mod.load(args.config, overrides)
    if args.checkpoint and not Path(args.checkpoint).exists():
        raise InputError(f"{args.checkpoint}: no such file or directory (--checkpoint)")

    from pipeline.train import init_distributed  # torch is imported only once the command line is valid

    env = init_distributed(cfg.train.device)
    run_dir = Path(args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if env.main:
        _write_config(run_dir, cfg, training=any(s in TRAINING_STAGES for s in stages))
    env.barrier()
    setup_logging(run_dir, env.main, args.debug)
    log.info("run directory %s (config.yaml written), device %s, %d process(es)", run_dir, env.device, env.world)
    from pipeline import stages as stage_impl

    results = {}
    for s in stages:
        results[s] = getattr(stage_impl, f"run_{s.replace('-', '_')}")(cfg, run_dir, env, args)
    if env.main:
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        summary.update(results)
        write_json(summary_path, summary)
        stage_impl.print_outputs(run_dir, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Config", "STAGES", "main"]
