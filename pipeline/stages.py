"""The stages `python -m pipeline.run` chains: teacher, distill, eval; each reads and writes one run directory."""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from pipeline.config import Config, ModelConfig
from pipeline.data import EvalTransform, TrainTransform, build_dataset, ensure_synthetic
from pipeline.distill import build_method
from pipeline.errors import ConfigError
from pipeline.evaluate import evaluate, write_cityscapes
from pipeline.io import write_json
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
    width = max(len(k) for k, _ in rows)
    print("\n".join([f"run directory: {run_dir}", *(f"  {k:<{width}}  {v}" for k, v in rows)]))
