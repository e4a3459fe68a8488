"""The stages `python -m pipeline.run` chains, and their registry: each stage's function, help, own flags and the
rows it adds to the run's list of outputs. The CLI builds its help from this module before torch is imported, so
the stages import what they run with inside their functions."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.artifacts import ARTIFACTS, INPUT_NAME, kinds, run_file
from pipeline.bag import CAMERA_MASK, CAMERA_OVERLAY, MASK_TOPIC, OVERLAY_TOPIC, default_out
from pipeline.config import Config, ModelConfig, export_size, method_options
from pipeline.errors import ConfigError, ExportError, InputError
from pipeline.io import atomic_path, write_json
from pipeline.preflight import backbone_config, check_variant, qad_settings

if TYPE_CHECKING:
    from pipeline.distill.methods import DistillMethod
    from pipeline.models.segformer import SegFormer
    from pipeline.train import DistEnv

log = logging.getLogger("pipeline")
Row = tuple[str, str]  # (file or name, what it is): one line of the outputs list printed after a run
STUDENT = run_file("checkpoint")
TEACHER = run_file("checkpoint", "teacher")
QAD_STUDENT = run_file("checkpoint-qad")
DEPLOY = "deploy"  # in the run directory: the Triton repository (deploy/triton) and DeepStream configs
ENGINE_KINDS = tuple(kinds("tensorrt"))  # each built from the ONNX of its row's `source`


def data_root(cfg: Config, env: DistEnv) -> Path:
    """The dataset folder; the synthetic default is generated (by rank 0) when missing."""
    from pipeline.data import ensure_synthetic

    d = cfg.data
    if d.dataset != "synthetic":
        return Path(d.root)
    if env.main:
        ensure_synthetic(Path(d.root), d.synthetic_train, d.synthetic_val, d.synthetic_size, d.synthetic_seed)
    env.barrier()
    return Path(d.root)


def datasets(cfg: Config, run_dir: Path, env: DistEnv):
    from pipeline.data import EvalTransform, TrainTransform, build_dataset
    from pipeline.models.segformer import IMAGENET_MEAN, IMAGENET_STD

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


def new_model(role: str, spec: ModelConfig, train_set, size, seed: int) -> SegFormer:
    """The `role` model (teacher, student) for the dataset's label set: from spec.checkpoint (fine-tune),
    spec.pretrained (backbone) or scratch (initialised from `seed`, so every process and every rerun starts from the
    same weights), always of spec.variant; its meta (classes, palette, input size) comes from the dataset."""
    from pipeline.models import build_model, load_model
    from pipeline.models.segformer import IMAGENET_MEAN, IMAGENET_STD, ModelMeta, SegFormer
    from pipeline.train import seed_everything

    seed_everything(seed)
    if spec.checkpoint:
        model = load_model(spec.checkpoint, strict=True)
        if model.config.num_classes != train_set.num_classes:
            raise ConfigError(f"{spec.checkpoint}: predicts {model.config.num_classes} classes, the dataset "
                              f"{train_set.name} has {train_set.num_classes}")
    elif spec.pretrained:
        model = load_model(spec.pretrained, strict=False, num_classes=train_set.num_classes)
        wanted = backbone_config(f"{role}.pretrained", spec.pretrained, model.config, spec.variant)
        if wanted != model.config:  # the variant around the file's encoder (the same architecture, another head)
            encoder = model.encoder.state_dict()
            model = SegFormer(wanted, model.meta)
            model.encoder.load_state_dict(encoder)
    else:
        model = build_model(spec.variant, num_classes=train_set.num_classes)
    if spec.checkpoint:
        check_variant(f"{role}.checkpoint", spec.checkpoint, model.config.variant, spec.variant)
    model.meta = ModelMeta(list(train_set.classes), [list(c) for c in train_set.palette], IMAGENET_MEAN,
                           IMAGENET_STD, tuple(size), model.meta.source)
    return model


# ------------------------------------------------------------------------------------------------ training
def run_teacher(cfg: Config, run_dir: Path, env: DistEnv, args=None) -> dict:
    from pipeline.distill import build_method
    from pipeline.train import Trainer, derived_seed

    train, val = datasets(cfg, run_dir, env)
    teacher = new_model("teacher", cfg.teacher, train, cfg.data.size, derived_seed(cfg.seed, "teacher", "init"))
    method = build_method("none", None, teacher)
    summary = Trainer("teacher", cfg, run_dir, teacher, method, train, val, env).fit()
    return {**summary, "skipped_samples": _skipped(run_dir)}


def run_distill(cfg: Config, run_dir: Path, env: DistEnv, args=None) -> dict:
    from pipeline.distill import build_method
    from pipeline.models import load_model
    from pipeline.train import Trainer, derived_seed, seed_everything

    out = {}
    if cfg.teacher.checkpoint:
        teacher_path = Path(cfg.teacher.checkpoint)
    else:
        teacher_path = run_dir / TEACHER
        if not (run_dir / run_file("checkpoint", "teacher.last")).is_file():
            log.info("no teacher.checkpoint given and none trained in %s: training the teacher first", run_dir)
            out["teacher"] = run_teacher(cfg, run_dir, env)
    train, val = datasets(cfg, run_dir, env)
    teacher = load_model(teacher_path)
    if teacher.config.num_classes != train.num_classes:
        raise ConfigError(f"{teacher_path}: the teacher predicts {teacher.config.num_classes} classes, the dataset "
                          f"{train.name} has {train.num_classes}")
    student = new_model("student", cfg.student, train, cfg.data.size, derived_seed(cfg.seed, "student", "init"))
    seed_everything(derived_seed(cfg.seed, "modules", "init"))  # the method's train-only modules
    method = build_method(cfg.distill.method, teacher, student, **method_options(cfg))
    log.info("distilling %s -> %s with %s (%d train-only parameters)", teacher.config.variant,
             student.config.variant, method.name, method.describe()["train_only_parameters"])
    if env.main:
        write_json(run_dir / "method.json", method.describe())
    summary = Trainer("student", cfg, run_dir, student, method, train, val, env).fit()
    return {**out, **summary, "teacher_checkpoint": str(teacher_path), "skipped_samples": _skipped(run_dir)}


# ------------------------------------------------------------------------------------------------ QAD
def run_qad(cfg: Config, run_dir: Path, env: DistEnv, args=None) -> dict:
    """Quantization-aware distillation: the run's student (or --checkpoint) fake-quantized as the INT8 export
    quantizes it and calibrated as its PTQ is, then fine-tuned by the Trainer against the frozen teacher with the
    run's method plus logit KD (qad.*). Step 0 scores the calibrated model: the log and summary read PTQ -> QAD."""
    from pipeline.io import sha256_file
    from pipeline.models import load_model
    from pipeline.train import Trainer

    given = getattr(args, "checkpoint", None)
    path = Path(given or run_dir / STUDENT)  # both checked by preflight.check_qad
    teacher_path = Path(cfg.teacher.checkpoint or run_dir / TEACHER)
    train, val = datasets(cfg, run_dir, env)
    teacher, student = load_model(teacher_path), load_model(path)
    for file, model in ((teacher_path, teacher), (path, student)):
        if model.config.num_classes != train.num_classes:
            raise ConfigError(f"{file}: predicts {model.config.num_classes} classes, the dataset {train.name} has "
                              f"{train.num_classes}")
    qmodel, calibration = qad_student(cfg, student, train, val)
    method = qad_method(cfg, teacher, qmodel)
    modules = "none" if not len(method.modules) else "seeded init" if given else distill_modules(run_dir, method)
    log.info("qad: %s -> INT8 %s with %s, weights %s; train-only modules from %s", path.name,
             qmodel.config.variant, method.name, json.dumps(method.weights), modules)
    record = {"source_sha256": sha256_file(path),
              "quantization": {"calibration": calibration, "learn_ranges": cfg.qad.learn_ranges,
                               "method": method.describe(), "modules_from": modules}}
    summary = Trainer("qad", cfg, run_dir, qmodel, method, train, val, env, record=record).fit()
    return {**summary, "student_checkpoint": str(path), "teacher_checkpoint": str(teacher_path),
            "skipped_samples": _skipped(run_dir)}


def qad_student(cfg: Config, student: SegFormer, train_set, val_set) -> tuple[SegFormer, dict]:
    """(the fake-quantized student QAD starts from, its calibration record): quant.quantize, every group INT8,
    calibrated by the export's own PTQ path (export.quantize_student) on qad.calibration_frames training frames
    at the exported size, so that PTQ and QAD start from one point; ranges trainable when qad.learn_ranges."""
    from pipeline import quant
    from pipeline.artifacts import Normalization
    from pipeline.export import quantize_student

    q = cfg.qad
    e = replace(cfg.export, size=export_size(cfg), calibration_frames=q.calibration_frames,
                calibration_method=q.calibration_method, int8_max_drop=-1.0)
    norm = Normalization(list(student.meta.mean), list(student.meta.std))
    qmodel, calibration = quantize_student(student.cpu().eval(), e, train_set, val_set, norm, q.float_ends, q.bits)
    quant.learn_ranges(qmodel, q.learn_ranges)
    return qmodel, calibration


def qad_method(cfg: Config, teacher: SegFormer, qmodel: SegFormer) -> DistillMethod:
    """The run's distill.method for the fake-quantized student: qad.weights over distill.weights, and logit KD added
    where the method has no such term (preflight.qad_settings); train-only modules from the seeded init distill
    starts them from."""
    from pipeline.distill import DistillMethod, build_method
    from pipeline.train import derived_seed, seed_everything

    own, logit_kd = qad_settings(cfg, teacher.config, qmodel.config)
    seed_everything(derived_seed(cfg.seed, "modules", "init"))
    method = build_method(cfg.distill.method, teacher, qmodel, **own)
    if not logit_kd:
        return method
    return DistillMethod(method.name, teacher, qmodel, {**method.weights, "kd": logit_kd["kd"]},
                         {**method.options, "temperature": logit_kd["temperature"]}, dict(method.modules))


def distill_modules(run_dir: Path, method: DistillMethod) -> str:
    """Load `method`'s train-only modules from the distill run's newest training state (checkpoints/student) when it
    holds them for this method with these shapes: they were trained against this teacher on the float student's
    features, which the fake-quantized student's follow closely. Returns where they came from."""
    from pipeline.errors import CheckpointError
    from pipeline.io import load_state

    fresh = "seeded init (no matching distill state)"
    pointer = run_dir / "checkpoints" / "student" / "last.json"
    try:
        stem = pointer.parent / json.loads(pointer.read_text())["checkpoint"]
        state = load_state(stem)
    except (CheckpointError, OSError, ValueError, KeyError, TypeError):
        return fresh
    saved, own = state.get("modules"), method.modules.state_dict()
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    if config.get("distill.method") != method.name or not isinstance(saved, dict) or set(saved) != set(own) or \
            any(saved[k].shape != own[k].shape for k in own):
        return fresh
    method.modules.load_state_dict(saved)
    return f"{stem}.safetensors"


def _qad_rows(result: dict) -> list[Row]:
    """The QAD state with its validation mIoU before the first step (the calibrated PTQ model) and at its best."""
    from pipeline.train import model_files

    if not result:
        return []
    best, last = model_files("qad")
    start = result.get("start_val_miou")
    scores = f"val mIoU {100 * start:.2f} % (PTQ, step 0) -> " if start is not None else ""
    return [(best, f"fake-quantized student (+ .json sidecar), {scores}best {100 * result['best_val_miou']:.2f} %; "
                   f"{last}: final step")]


def _training_rows(result: dict) -> list[Row]:
    """The best validation mIoU of each model the stage trained (distill may have trained the teacher first)."""
    parts = ([result["teacher"]] if isinstance(result.get("teacher"), dict) else []) + [result]
    return [(f"{p['role']} ({p['method']})", f"best val mIoU {100 * p['best_val_miou']:.2f} %")
            for p in parts if p and p.get("best_val_miou") is not None and p.get("role")]


# ------------------------------------------------------------------------------------------------ evaluation
def run_eval(cfg: Config, run_dir: Path, env: DistEnv, args=None) -> dict:
    from torch.utils.data import DataLoader, Subset

    from pipeline import amp
    from pipeline.evaluate import evaluate, write_cityscapes
    from pipeline.models import load_model

    path = Path(getattr(args, "checkpoint", None) or run_dir / STUDENT)
    model = load_model(path).to(env.device)
    _, val = datasets(cfg, run_dir, env)
    if model.config.num_classes != val.num_classes:
        raise ConfigError(f"{path}: predicts {model.config.num_classes} classes, {val.name} has {val.num_classes}")
    quarter = bool(getattr(args, "quarter_res", False))
    precision = amp.choose(cfg.train.amp, env.device)  # the precision training evaluates in, by the same choice
    log.info("eval: %s on %s (%s)", "float32" if precision.dtype is None else f"{precision.name} autocast",
             env.device, precision.reason)
    # every process scores its own shard; evaluate() sums the confusion matrices
    shard = Subset(val, range(env.rank, len(val), env.world))
    loader = DataLoader(shard, batch_size=1, num_workers=cfg.data.workers)
    result = evaluate(model, loader, device=env.device, num_classes=val.num_classes, classes=val.classes,
                      quarter_res=quarter, amp_dtype=precision.dtype, progress=env.main)
    out = {"checkpoint": str(path), "dataset": cfg.data.dataset, "split": cfg.data.val_split,
           "samples": len(val), "resolution": "1/4 of the input (reference shortcut)" if quarter else "full label",
           "amp": precision.record(cfg.train.amp, env.device), **result.to_dict()}
    if env.main:
        print(result.table(val.classes))
        write_json(run_dir / "eval.json", out)
    if getattr(args, "write_cityscapes", None):
        files = write_cityscapes(model, loader, Path(args.write_cityscapes), device=env.device,
                                 amp_dtype=precision.dtype, progress=env.main)
        log.info("wrote %d Cityscapes-format predictions to %s", len(files), args.write_cityscapes)
    return {"checkpoint": str(path), "miou": result.miou, "amp": precision.name}


def _eval_rows(result: dict) -> list[Row]:
    return [("eval.json", f"mIoU {100 * result['miou']:.2f} % of {result['checkpoint']} ({result.get('amp', 'fp32')})")]


# ------------------------------------------------------------------------------------------------ export
def run_export(cfg: Config, run_dir: Path, env: DistEnv, args=None) -> dict:
    """ONNX artifacts of the student (or of --checkpoint), checked and scored; engines where TensorRT runs."""
    from pipeline.export import export_student, report_table
    from pipeline.models import load_model

    if not env.main:
        return {}  # one process exports; the others (under torchrun) have nothing to do
    path = Path(getattr(args, "checkpoint", None) or run_dir / STUDENT)  # checked by preflight.check_student
    model = load_model(path)
    train, val = datasets(cfg, run_dir, env)
    if model.config.num_classes != val.num_classes:
        raise ConfigError(f"{path}: predicts {model.config.num_classes} classes, {val.name} has {val.num_classes}; "
                          "export checks and calibrates on the run's dataset (data.dataset, data.root)")
    e = replace(cfg.export, size=export_size(cfg))
    report = export_student(model, run_dir, e, val, train, source=path, qad=_qad_state(run_dir, path))
    if e.engines == "auto":
        from trt.build import tensorrt_unavailable

        reason = tensorrt_unavailable()
        if reason:
            log.info("export: no TensorRT engines (%s); every ONNX artifact is written", reason)
            report["engines"] = {"skipped": reason}
        else:
            report["engines"] = _build_engines(cfg, run_dir)
    if cfg.export.triton:
        report["triton"] = _triton_repository(cfg, run_dir)
    write_json(run_dir / "export.json", report)
    table = report_table(report)
    with atomic_path(run_dir / "export.md") as tmp:
        tmp.write_text(f"# Export of {path}\n\n{e.input} input, {e.output} output, {e.size[0]}x{e.size[1]}, "
                       f"batch {e.batch}{', dynamic' if e.dynamic else ''}; mIoU on "
                       f"{report['eval']['frames']} {val.name} {val.split} frames at full label resolution\n\n"
                       f"{table}\n")
    print(table)
    return {"artifacts": {k: v["file"] for k, v in report["artifacts"].items()},
            "miou": {"pytorch": report["pytorch"]["miou"], **{k: v["miou"] for k, v in report["artifacts"].items()}},
            "engines": report.get("engines"), **({"triton": report["triton"]} if cfg.export.triton else {})}


def _triton_repository(cfg: Config, run_dir: Path) -> dict:
    """<run dir>/deploy: the Triton repository and DeepStream configs of the run's artifacts (pipeline/triton.py),
    replacing the one an earlier export or export-triton wrote."""
    from pipeline.triton import write_repository

    t = cfg.triton
    summary = write_repository(run_dir, run_dir / DEPLOY, max_batch_size=t.max_batch_size, instances=t.instances,
                               instance_kind=t.instance_kind, max_queue_delay_us=t.max_queue_delay_us, replace=True)
    log.info("export-triton: %d models -> %s (tritonserver --model-repository=%s)", len(summary["models"]),
             run_dir / DEPLOY, run_dir / DEPLOY / summary["triton"])
    return {"out": str(run_dir / DEPLOY), "models": sorted(summary["models"])}


def run_export_triton(cfg: Config, run_dir: Path, env: DistEnv, args=None) -> dict:
    """The Triton model repository and DeepStream configs of the run's exported artifacts."""
    return _triton_repository(cfg, run_dir) if env.main else {}


def _triton_rows(result: dict) -> list[Row]:
    if not result:
        return []
    return [(f"{DEPLOY}/triton/", f"Triton model repository, {len(result['models'])} models: "
                                  f"{', '.join(result['models'])}"),
            (f"{DEPLOY}/deepstream/", "DeepStream nvinfer configs (float-input graphs and plans)")]


def _qad_state(run_dir: Path, student: Path) -> Path | None:
    """The run's QAD state when it was made from `student` (the record's source_sha256): exported beside the PTQ
    graph. One made from another student (retrained since, or --checkpoint) is left out, saying so."""
    from pipeline.artifacts import read_sidecar
    from pipeline.io import sha256_file

    path = run_dir / QAD_STUDENT
    if not path.is_file():
        return None
    try:
        record = read_sidecar(path)
    except InputError as e:
        log.warning("export: no %s (%s)", run_file("onnx-int8-qad"), e)
        return None
    made_from, bits = record.source_sha256, record.details.get("quantization", {}).get("bits", 8)
    if bits != 8:
        log.warning("export: no %s: %s is a %s-bit stress state (qad.bits), which runs in PyTorch only",
                    run_file("onnx-int8-qad"), path.name, bits)
        return None
    if made_from != sha256_file(student):
        log.warning("export: no %s: %s was made from another student than %s; run the qad stage again",
                    run_file("onnx-int8-qad"), path.name, student)
        return None
    return path


def _export_rows(result: dict) -> list[Row]:
    if not result:
        return []
    rows = [(file, f"{kind} ONNX (+ {file}.json), mIoU {100 * result['miou'][kind]:.2f} %")
            for kind, file in result["artifacts"].items()]
    rows += _engine_rows(result) + _triton_rows(result.get("triton") or {})
    return rows + [("export.md", "parity and mIoU of every artifact (export.json: all details)")]


def _build_engines(cfg: Config, run_dir: Path) -> dict:
    """The TensorRT engine of every ONNX in the run that an engine kind is built from: {precision: file}."""
    from trt.build import build_engine

    e = cfg.export
    shapes = {}
    if e.dynamic:  # one profile: batch 1 at half size up to 2x the batch at twice the size, tuned at the export's
        h, w = export_size(cfg)
        dims = (lambda n, hh, ww: (n, hh, ww, 3)) if e.input == "uint8" else (lambda n, hh, ww: (n, 3, hh, ww))
        shapes = {"min_shapes": {INPUT_NAME: dims(1, h // 2, w // 2)}, "opt_shapes": {INPUT_NAME: dims(e.batch, h, w)},
                  "max_shapes": {INPUT_NAME: dims(2 * e.batch, 2 * h, 2 * w)}}
    built = {}
    for kind in ENGINE_KINDS:
        onnx_path = run_dir / run_file(ARTIFACTS[kind].source)
        if onnx_path.is_file():
            plan = run_dir / run_file(kind)
            log.info("export: building %s from %s", plan.name, onnx_path.name)
            build_engine(onnx_path, plan, workspace_gib=e.workspace_gib, opt_level=e.opt_level,
                         timing_cache_dir=run_dir / "timing-cache", **shapes)
            built[ARTIFACTS[kind].precision] = plan.name
    return built


def run_trt_build(cfg: Config, run_dir: Path, env: DistEnv, args=None) -> dict:
    """Engines from the run's FP16 and INT8 ONNX files; TensorRT and a GPU are required here."""
    if not env.main:
        return {}
    from trt.build import tensorrt_unavailable

    reason = tensorrt_unavailable()
    if reason:
        raise ExportError(f"trt-build: {reason}")
    sources = [run_file(ARTIFACTS[k].source) for k in ENGINE_KINDS]
    if not any((run_dir / s).is_file() for s in sources):
        raise InputError(f"{run_dir}: no {' or '.join(sources)}; run the export stage first")
    return {"engines": _build_engines(cfg, run_dir)}


def _engine_rows(result: dict) -> list[Row]:
    engines = {run_file(k) for k in ENGINE_KINDS}
    return [(file, "TensorRT engine (+ .json sidecar)") for file in (result.get("engines") or {}).values()
            if file in engines]


# ------------------------------------------------------------------------------------------------ bench, bags
def run_bench(cfg: Config, run_dir: Path, env: DistEnv, args=None) -> dict:
    """Params, GMACs, latency and mIoU of every artifact in the run directory (pipeline/report.py)."""
    if not env.main:
        return {}
    from pipeline.report import bench_run

    _, val = datasets(cfg, run_dir, env)
    report = bench_run(cfg, run_dir, val)
    print((run_dir / "report.md").read_text())
    return {"rows": len(report["results"])}


def _bench_rows(result: dict) -> list[Row]:
    return [("report.md", f"params, GMACs, latency and mIoU of {result['rows']} artifact/device pairs "
                          "(report.json, report.png: mIoU against latency)")] if result else []


def run_segment_bag(cfg: Config, run_dir: Path, env: DistEnv, args=None) -> dict:
    """Segment a recorded drive (pipeline/bag.py) with any artifact the Segmenter opens."""
    if not env.main:
        return {}
    from pipeline.bag import segment_bag
    from pipeline.infer import Segmenter

    bag = Path(args.bag)  # --bag, --topic, --artifact, --out and --video: checked by preflight.check_segment_bag
    artifact = Path(args.artifact or run_dir / run_file("onnx"))
    out = Path(args.out) if args.out else default_out(bag, run_dir)
    # PyTorch and dynamic graphs run at the resolution the run evaluates at
    seg = Segmenter.open(artifact, default_size=tuple(cfg.data.size))
    summary = segment_bag(bag, args.topic, seg, out, Path(args.video) if args.video else None,
                          overlay=not args.no_overlay, mask_topic=args.mask_topic, overlay_topic=args.overlay_topic,
                          fps=args.fps, progress=env.main, batch=args.batch)
    log.info("segment-bag: %d frames segmented, %d refused, %d messages copied, %d batches (mean %.2f frames), "
             "%.1f frames/s -> %s", summary["frames"], summary["refused"], summary["copied"], summary["batches"],
             summary["mean_batch"], summary["frames_per_second"], summary["out"])
    for topic, t in summary["topics"].items():
        log.info("  %s: %d frames, %d refused -> %s", topic, t["frames"], t["refused"], t["mask_topic"])
    return summary


def run_segment(cfg: Config, run_dir: Path, env: DistEnv, args=None) -> dict:
    """Segment images or a video (pipeline/segment.py) with any artifact the Segmenter opens."""
    if not env.main:
        return {}
    from pipeline import segment
    from pipeline.infer import Segmenter

    sources = segment.find_sources(args.source)  # --source, --out, --video, --batch, --fps: preflight.check_segment
    artifact = Path(args.artifact or run_dir / run_file("onnx"))
    out = Path(args.out) if args.out else segment.default_out(sources, run_dir)
    seg = Segmenter.open(artifact, default_size=tuple(cfg.data.size))
    summary = segment.segment(sources, seg, out, video=Path(args.video) if args.video else None,
                              overlay=not args.no_overlay, skip_bad=args.skip_bad,
                              batch=1 if args.batch is None else args.batch, fps=args.fps, progress=env.main)
    log.info("segment: %d frames segmented, %d refused, %.1f frames/s -> %s", summary["frames"], summary["refused"],
             summary["frames_per_second"], summary["out"])
    return summary


def _segment_rows(result: dict) -> list[Row]:
    if not result:
        return []
    rows = [(result["out"], f"{result['frames']} class-id PNGs (+ overlay/, summary.json), {result['refused']} "
                            f"refused, {result['frames_per_second']:.1f} frames/s")]
    return rows + ([(result["video"], "overlay video")] if result.get("video") else [])


def _bag_rows(result: dict) -> list[Row]:
    if not result:
        return []
    rows = [(result["out"], f"{result['frames']} frames segmented ({result['refused']} refused), "
                            f"{result['frames_per_second']:.1f} frames/s")]
    return rows + [(v, "overlay video") for v in result.get("videos", [])]


def _skipped(run_dir: Path) -> int:
    f = run_dir / "skipped_samples.txt"
    return len(set(f.read_text().splitlines())) if f.is_file() else 0


# ------------------------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class Flag:
    """A command-line flag of one or more stages; `default` is its value when not given."""

    name: str  # --checkpoint
    help: str
    default: Any = None
    options: dict = field(default_factory=dict)  # more argparse keywords: metavar, type, action
    must_exist: bool = False  # a path, refused before any work when missing

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Config, Path, DistEnv, argparse.Namespace], dict]
    help: str
    flags: tuple[Flag, ...] = ()
    rows: Callable[[dict], list[Row]] = lambda result: []  # what the stage wrote, for the list printed at the end
    trains: bool = False  # an existing run directory refuses other values of the keys that change training
    reads_data: bool = False  # reads data.root (the synthetic set is generated there)


CHECKPOINT = Flag("--checkpoint", f"the checkpoint to use (anything load_model loads; default the run's {STUDENT})",
                  must_exist=True)
EVAL_FLAGS = (Flag("--write-cityscapes", "also write Cityscapes-format predictions", options={"metavar": "DIR"}),
              Flag("--quarter-res", "score at 1/4 resolution like the TransKD reference (comparison only)", False,
                   {"action": "store_true"}))
BATCH = Flag("--batch", "frames per network call (segment: default 1; segment-bag: at most one per camera, default "
             "the number of --topic)", None, {"type": int})
BAG_FLAGS = (
    Flag("--bag", "the input, a ROS 1 .bag file or a ROS 2 bag directory (sqlite3 or MCAP)"),
    Flag("--topic", "a camera topic (sensor_msgs/Image or CompressedImage); repeat it for several cameras, segmented "
         "in batches", options={"action": "append", "metavar": "TOPIC"}),
    Flag("--artifact", f"engine, ONNX or checkpoint (default: the run's {run_file('onnx')})"),
    Flag("--out", "segment-bag: the output bag (default <run dir>/<input name>.segmented[.bag]); segment: a new or "
         "empty folder (default <run dir>/<source name>.segmented)"),
    Flag("--video", "also write the overlays as an mp4 video (segment-bag with several --topic: one per camera, "
         "<stem>_<topic>.mp4)", options={"metavar": "MP4"}),
    Flag("--fps", "video frame rate (default: the topic's or the source video's; 10 for images)", 0.0,
         {"type": float}),
    Flag("--no-overlay", "masks only: no overlay topic / overlay PNGs", False, {"action": "store_true"}),
    Flag("--mask-topic", f"topic of the mono8 class ids (default: {MASK_TOPIC} for one --topic, <camera namespace>/"
         f"{CAMERA_MASK} for several); a relative name goes in each camera's namespace"),
    Flag("--overlay-topic", f"topic of the rgb8 overlay (default: {OVERLAY_TOPIC} for one --topic, <camera "
         f"namespace>/{CAMERA_OVERLAY} for several); a relative name goes in each camera's namespace"),
    BATCH,
)
SEGMENT_FLAGS = (
    Flag("--source", "segment: an image, a folder of images, a quoted glob (\"drive/*.jpg\") or a video (mp4, avi, "
         "mov, mkv)"),
    *(f for f in BAG_FLAGS if f.name in ("--artifact", "--out", "--video", "--fps", "--no-overlay")),
    Flag("--skip-bad", "segment: skip unreadable images and video frames (named in the summary) instead of stopping",
         False, {"action": "store_true"}),
    BATCH,
)
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("teacher", run_teacher, "train the teacher on the dataset (from scratch, teacher.pretrained or "
          "teacher.checkpoint)", rows=_training_rows, trains=True, reads_data=True),
    Stage("distill", run_distill, "distil the student from the teacher (trains the teacher first when there is none)",
          rows=_training_rows, trains=True, reads_data=True),
    Stage("qad", run_qad, f"quantization-aware distillation: the run's student (or --checkpoint) fake-quantized as the "
          f"INT8 export does, calibrated, fine-tuned against the teacher (qad.* keys): {QAD_STUDENT}", (CHECKPOINT,),
          _qad_rows, trains=True, reads_data=True),
    Stage("eval", run_eval, f"mIoU of a checkpoint (--checkpoint, default the run's {STUDENT}) on the validation "
          "split", (CHECKPOINT, *EVAL_FLAGS), _eval_rows, reads_data=True),
    Stage("export", run_export, f"{run_file('onnx')} (parity-checked), "
          f"{', '.join(run_file(k) for k in kinds('onnx')[1:])} + sidecars and export.md; TensorRT plans where "
          "TensorRT and a GPU exist (--checkpoint X exports any loadable checkpoint)", (CHECKPOINT,), _export_rows,
          reads_data=True),
    Stage("trt-build", run_trt_build, "TensorRT engines from the run's ONNX files (fails when TensorRT or a GPU is "
          "missing)", rows=_engine_rows),
    Stage("bench", run_bench, "params, GMACs, latency and mIoU of every artifact in the run: report.md, report.json, "
          "report.png", rows=_bench_rows, reads_data=True),
    Stage("export-triton", run_export_triton, f"a Triton model repository ({DEPLOY}/triton: config.pbtxt validated "
          f"with Triton's schema, labels, records) and DeepStream nvinfer configs ({DEPLOY}/deepstream) for the run's "
          "ONNX files and plans (triton.* keys)", rows=_triton_rows),
    Stage("segment-bag", run_segment_bag, "segment --topic (one or more cameras, batched) of a ROS 1 / ROS 2 bag "
          "(--bag) with --artifact into a new bag (--out) holding the original messages plus mask and overlay "
          "topics; --video adds an mp4 of the overlays", BAG_FLAGS, _bag_rows),
    Stage("segment", run_segment, "segment images or a video (--source) with --artifact into class-id PNGs and "
          "overlays (--out); --video adds an mp4 of the overlays", SEGMENT_FLAGS, _segment_rows),
)}


def stage_flags() -> dict[str, tuple[Flag, list[str]]]:
    """Every flag once, in registry order, with the stages that take it."""
    out: dict[str, tuple[Flag, list[str]]] = {}
    for stage in STAGES.values():
        for flag in stage.flags:
            out.setdefault(flag.name, (flag, []))[1].append(stage.name)
    return out


def outputs(run_dir: Path, results: dict[str, dict]) -> str:
    """Where everything went: the run directory's own files, then what each stage of this call wrote."""
    rows = [("config.yaml", "resolved config of this run"),
            ("run.log", "log; tensorboard/ has the loss, lr and mIoU curves")]
    for role in ("teacher", "student"):
        name = run_file("checkpoint", role)
        if (run_dir / name).is_file():
            rows.append((name, f"best-on-val {role} (+ .json sidecar); {run_file('checkpoint', f'{role}.last')}: "
                               "final step"))
    for name, result in results.items():
        rows += STAGES[name].rows(result)
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"run directory: {run_dir}", *(f"  {k:<{width}}  {v}" for k, v in rows)])
