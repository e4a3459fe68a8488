"""The stages `python -m pipeline.run` chains: teacher, distill, eval; each reads and writes one run directory."""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from pipeline.config import Config, ModelConfig
from pipeline.data import EvalTransform, TrainTransform, build_dataset, ensure_synthetic
from pipeline.distill import build_method
from pipeline.errors import ConfigError, ExportError, InputError
from pipeline.evaluate import evaluate, write_cityscapes
from pipeline.export import ExportPlan, ExportSpec, export_student, report_table
from pipeline.io import atomic_path, write_json
from pipeline.models import build_model, load_model
from pipeline.models.segformer import IMAGENET_MEAN, IMAGENET_STD, ModelMeta, SegFormer
from pipeline.train import DistEnv, Trainer, derived_seed, seed_everything

log = logging.getLogger("pipeline")


def data_root(cfg: Config, env: DistEnv) -> Path:
    """The dataset folder; the synthetic default is generated (by rank 0) when missing."""
    d = cfg.data
    if d.dataset != "synthetic":
        return Path(d.root)
    if env.main:
        ensure_synthetic(Path(d.root), d.synthetic_train, d.synthetic_val, d.synthetic_size, d.synthetic_seed)
    env.barrier()
    return Path(d.root)


def datasets(cfg: Config, run_dir: Path, env: DistEnv):
    d = cfg.data
    root = data_root(cfg, env)
    skip_log = run_dir / "skipped_samples.txt"
    train = build_dataset(d.dataset, root, d.train_split,
                          TrainTransform(size=d.size, scale=d.scale, flip=d.flip, jitter=d.jitter,
                                         mean=IMAGENET_MEAN, std=IMAGENET_STD),
                          skip_bad=d.skip_bad, skip_log=skip_log)
    val = build_dataset(d.dataset, root, d.val_split, EvalTransform(size=d.size, mean=IMAGENET_MEAN, std=IMAGENET_STD),
                        skip_bad=d.skip_bad, skip_log=skip_log)
    return train, val


def new_model(spec: ModelConfig, train_set, size, seed: int) -> SegFormer:
    """A model for the dataset's label set: from spec.checkpoint (fine-tune), spec.pretrained (backbone) or
    scratch (initialised from `seed`, so every process and every rerun starts from the same weights); its meta
    (classes, palette, input size) comes from the dataset."""
    seed_everything(seed)
    if spec.checkpoint:
        model = load_model(spec.checkpoint, strict=True)
        if model.config.num_classes != train_set.num_classes:
            raise ConfigError(f"{spec.checkpoint}: predicts {model.config.num_classes} classes, the dataset "
                              f"{train_set.name} has {train_set.num_classes}")
    elif spec.pretrained:
        model = load_model(spec.pretrained, strict=False, num_classes=train_set.num_classes)
    else:
        model = build_model(spec.variant, num_classes=train_set.num_classes)
    if model.config.variant != spec.variant and not spec.checkpoint:
        raise ConfigError(f"{spec.pretrained}: a {model.config.variant} backbone, but the variant asked for is "
                          f"{spec.variant}")
    model.meta = ModelMeta(list(train_set.classes), [list(c) for c in train_set.palette], IMAGENET_MEAN,
                           IMAGENET_STD, tuple(size), model.meta.source)
    return model


def run_teacher(cfg: Config, run_dir: Path, env: DistEnv, args=None) -> dict:
    train, val = datasets(cfg, run_dir, env)
    teacher = new_model(cfg.teacher, train, cfg.data.size, derived_seed(cfg.seed, "teacher", "init"))
    method = build_method("none", None, teacher)
    summary = Trainer("teacher", cfg, run_dir, teacher, method, train, val, env).fit()
    return {**summary, "skipped_samples": _skipped(run_dir)}


def run_distill(cfg: Config, run_dir: Path, env: DistEnv, args=None) -> dict:
    out = {}
    if cfg.teacher.checkpoint:
        teacher_path = Path(cfg.teacher.checkpoint)
    else:
        teacher_path = run_dir / "teacher.safetensors"
        if not (run_dir / "teacher.last.safetensors").is_file():
            log.info("no teacher.checkpoint given and none trained in %s: training the teacher first", run_dir)
            out["teacher"] = run_teacher(cfg, run_dir, env)
    train, val = datasets(cfg, run_dir, env)
    teacher = load_model(teacher_path)
    if teacher.config.num_classes != train.num_classes:
        raise ConfigError(f"{teacher_path}: the teacher predicts {teacher.config.num_classes} classes, the dataset "
                          f"{train.name} has {train.num_classes}")
    student = new_model(cfg.student, train, cfg.data.size, derived_seed(cfg.seed, "student", "init"))
    seed_everything(derived_seed(cfg.seed, "modules", "init"))  # the method's train-only modules
    method = build_method(cfg.distill.method, teacher, student, **cfg.distill.weights)
    log.info("distilling %s -> %s with %s (%d train-only parameters)", teacher.config.variant,
             student.config.variant, method.name, method.describe()["train_only_parameters"])
    if env.main:
        write_json(run_dir / "method.json", method.describe())
    summary = Trainer("student", cfg, run_dir, student, method, train, val, env).fit()
    return {**out, **summary, "teacher_checkpoint": str(teacher_path), "skipped_samples": _skipped(run_dir)}


def run_eval(cfg: Config, run_dir: Path, env: DistEnv, args=None) -> dict:
    path = Path(getattr(args, "checkpoint", None) or run_dir / "student.safetensors")
    model = load_model(path).to(env.device)
    _, val = datasets(cfg, run_dir, env)
    if model.config.num_classes != val.num_classes:
        raise ConfigError(f"{path}: predicts {model.config.num_classes} classes, {val.name} has {val.num_classes}")
    quarter = bool(getattr(args, "quarter_res", False))
    # every process scores its own shard; evaluate() sums the confusion matrices
    shard = Subset(val, range(env.rank, len(val), env.world))
    loader = DataLoader(shard, batch_size=1, num_workers=cfg.data.workers)
    result = evaluate(model, loader, device=env.device, num_classes=val.num_classes, classes=val.classes,
                      quarter_res=quarter, progress=env.main)
    out = {"checkpoint": str(path), "dataset": cfg.data.dataset, "split": cfg.data.val_split,
           "samples": len(val), "resolution": "1/4 of the input (reference shortcut)" if quarter else "full label",
           **result.to_dict()}
    if env.main:
        print(result.table(val.classes))
        write_json(run_dir / "eval.json", out)
    if getattr(args, "write_cityscapes", None):
        files = write_cityscapes(model, loader, Path(args.write_cityscapes), device=env.device, progress=env.main)
        log.info("wrote %d Cityscapes-format predictions to %s", len(files), args.write_cityscapes)
    return {"checkpoint": str(path), "miou": result.miou}


def run_export(cfg: Config, run_dir: Path, env: DistEnv, args=None) -> dict:
    """ONNX artifacts of the student (or of --checkpoint), checked and scored; engines where TensorRT runs."""
    if not env.main:
        return {}  # one process exports; the others (under torchrun) have nothing to do
    path = Path(getattr(args, "checkpoint", None) or run_dir / "student.safetensors")
    if not path.exists():
        raise InputError(f"{path}: no student to export; run the distill stage first or pass --checkpoint")
    model = load_model(path)
    train, val = datasets(cfg, run_dir, env)
    if model.config.num_classes != val.num_classes:
        raise ConfigError(f"{path}: predicts {model.config.num_classes} classes, {val.name} has {val.num_classes}; "
                          "export checks and calibrates on the run's dataset (data.dataset, data.root)")
    e = cfg.export
    size = tuple(e.size) if tuple(e.size) != (0, 0) else tuple(cfg.data.size)
    spec = ExportSpec(e.input, e.output, size, e.batch, e.dynamic, e.opset)
    plan = ExportPlan(spec, e.fp16, e.int8, e.parity_frames, e.calibration_frames, e.calibration_method,
                      e.int8_backend, e.eval_frames, e.simplify)
    report = export_student(model, run_dir, plan, val, train, source=path)
    if e.engines == "auto":
        from trt.build import tensorrt_unavailable

        reason = tensorrt_unavailable()
        if reason:
            log.info("export: no TensorRT engines (%s); every ONNX artifact is written", reason)
            report["engines"] = {"skipped": reason}
        else:
            report["engines"] = _build_engines(cfg, run_dir)
    write_json(run_dir / "export.json", report)
    table = report_table(report)
    with atomic_path(run_dir / "export.md") as tmp:
        tmp.write_text(f"# Export of {path}\n\n{spec.input} input, {spec.output} output, {size[0]}x{size[1]}, "
                       f"batch {spec.batch}{', dynamic' if spec.dynamic else ''}; mIoU on "
                       f"{report['eval']['frames']} {val.name} {val.split} frames at full label resolution\n\n"
                       f"{table}\n")
    print(table)
    return {"artifacts": {k: v["file"] for k, v in report["artifacts"].items()},
            "miou": {"pytorch": report["pytorch"]["miou"], **{k: v["miou"] for k, v in report["artifacts"].items()}},
            "engines": report.get("engines")}


def _build_engines(cfg: Config, run_dir: Path) -> dict:
    from trt.build import build_engine

    e = cfg.export
    shapes = {}
    if e.dynamic:  # one profile: batch 1 at half size up to 2x the batch at twice the size, tuned at the export's
        h, w = tuple(e.size) if tuple(e.size) != (0, 0) else tuple(cfg.data.size)
        dims = (lambda n, hh, ww: (n, hh, ww, 3)) if e.input == "uint8" else (lambda n, hh, ww: (n, 3, hh, ww))
        shapes = {"min_shapes": {"image": dims(1, h // 2, w // 2)}, "opt_shapes": {"image": dims(e.batch, h, w)},
                  "max_shapes": {"image": dims(2 * e.batch, 2 * h, 2 * w)}}
    built = {}
    for precision in ("fp16", "int8"):
        onnx_path = run_dir / f"student.{precision}.onnx"
        if onnx_path.is_file():
            plan = run_dir / f"student.{precision}.plan"
            log.info("export: building %s from %s", plan.name, onnx_path.name)
            build_engine(onnx_path, plan, workspace_gib=e.workspace_gib, opt_level=e.opt_level,
                         timing_cache_dir=run_dir / "timing-cache", **shapes)
            built[precision] = plan.name
    return built


def run_trt_build(cfg: Config, run_dir: Path, env: DistEnv, args=None) -> dict:
    """Engines from the run's FP16 and INT8 ONNX files; TensorRT and a GPU are required here."""
    if not env.main:
        return {}
    from trt.build import tensorrt_unavailable

    reason = tensorrt_unavailable()
    if reason:
        raise ExportError(f"trt-build: {reason}")
    if not any((run_dir / f"student.{p}.onnx").is_file() for p in ("fp16", "int8")):
        raise InputError(f"{run_dir}: no student.fp16.onnx or student.int8.onnx; run the export stage first")
    return {"engines": _build_engines(cfg, run_dir)}


def run_bench(cfg: Config, run_dir: Path, env: DistEnv, args=None) -> dict:
    """Params, GMACs, latency and mIoU of every artifact in the run directory (benchmarks/report.py)."""
    if not env.main:
        return {}
    from benchmarks.report import bench_run

    _, val = datasets(cfg, run_dir, env)
    report = bench_run(cfg, run_dir, val)
    print((run_dir / "report.md").read_text())
    return {"rows": len(report["results"])}


def run_segment_bag(cfg: Config, run_dir: Path, env: DistEnv, args=None) -> dict:
    """Segment a recorded drive (pipeline/bag.py) with any artifact the Segmenter opens."""
    if not env.main:
        return {}
    from pipeline.bag import segment_bag
    from pipeline.infer import Segmenter

    if not getattr(args, "bag", None) or not getattr(args, "topic", None):
        raise InputError("segment-bag: give --bag IN and --topic /camera/... (and --artifact, --out)")
    bag = Path(args.bag)
    artifact = Path(args.artifact or run_dir / "student.onnx")
    if not artifact.exists():
        raise InputError(f"{artifact}: no such artifact (--artifact: an engine, ONNX or checkpoint)")
    out = Path(args.out or run_dir / (bag.name.removesuffix(".bag") + ".segmented" + (".bag" if bag.suffix == ".bag"
                                                                                        else "")))
    # PyTorch and dynamic graphs run at the resolution the run evaluates at
    seg = Segmenter.open(artifact, default_size=tuple(cfg.data.size))
    summary = segment_bag(bag, args.topic, seg, out, Path(args.video) if args.video else None,
                          overlay=not args.no_overlay, mask_topic=args.mask_topic, overlay_topic=args.overlay_topic,
                          fps=args.fps, progress=env.main)
    log.info("segment-bag: %d frames segmented, %d refused, %d messages copied, %.1f frames/s -> %s",
             summary["frames"], summary["refused"], summary["copied"], summary["frames_per_second"], summary["out"])
    return summary


def _skipped(run_dir: Path) -> int:
    f = run_dir / "skipped_samples.txt"
    return len(set(f.read_text().splitlines())) if f.is_file() else 0


def print_outputs(run_dir: Path, results: dict) -> None:
    """Tell the user where everything went."""
    rows = [("config.yaml", "resolved config of this run"),
            ("run.log", "log; tensorboard/ has the loss, lr and mIoU curves")]
    for role in ("teacher", "student"):
        if (run_dir / f"{role}.safetensors").is_file():
            rows.append((f"{role}.safetensors", f"best-on-val {role} (+ .json sidecar); {role}.last.safetensors: "
                                                 "final step"))
    for name, res in results.items():
        for part in ([res.get("teacher")] if isinstance(res.get("teacher"), dict) else []) + [res]:
            if part and part.get("best_val_miou") is not None and part.get("role"):
                rows.append((f"{part['role']} ({part['method']})",
                             f"best val mIoU {100 * part['best_val_miou']:.2f} %"))
        if name == "eval":
            rows.append(("eval.json", f"mIoU {100 * res['miou']:.2f} % of {res['checkpoint']}"))
        if name == "export" and res:
            for kind, file in res["artifacts"].items():
                rows.append((file, f"{kind} ONNX (+ {file}.json), mIoU {100 * res['miou'][kind]:.2f} %"))
            for file in (res.get("engines") or {}).values():
                if isinstance(file, str) and file.endswith(".plan"):
                    rows.append((file, "TensorRT engine (+ .json sidecar)"))
            rows.append(("export.md", "parity and mIoU of every artifact (export.json: all details)"))
        if name == "segment-bag" and res:
            rows.append((res["out"], f"{res['frames']} frames segmented ({res['refused']} refused), "
                                     f"{res['frames_per_second']:.1f} frames/s"))
            if res.get("video"):
                rows.append((res["video"], "overlay video"))
        if name == "bench" and res:
            rows.append(("report.md", f"params, GMACs, latency and mIoU of {res['rows']} artifact/device pairs "
                                      "(report.json, report.png: mIoU against latency)"))
    width = max(len(k) for k, _ in rows)
    print("\n".join([f"run directory: {run_dir}", *(f"  {k:<{width}}  {v}" for k, v in rows)]))
