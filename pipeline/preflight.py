"""Validate first: the resolved config of every requested stage, the files it reads and the places it writes are
checked before any data is generated, any model built or any file written; a failure is one line and leaves the
run directory as it was."""

from __future__ import annotations

import argparse
import difflib
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from pipeline import config as config_mod
from pipeline.artifacts import run_file, sidecar_path
from pipeline.config import Config, ModelConfig, method_options, qad_options
from pipeline.errors import ConfigError, DataError, InputError, PipelineError

if TYPE_CHECKING:
    from pipeline.models.registry import SegFormerConfig

def check(cfg: Config, stages: list[str], args: argparse.Namespace, run_dir: Path) -> None:
    """Every check of a run of `stages` with `cfg` and the stage flags in `args`, before any work; the first
    problem found is raised as a one-line PipelineError."""
    from pipeline.stages import STAGES

    if any(STAGES[s].reads_data for s in stages):
        check_data(cfg)
    for i, stage in enumerate(stages):
        earlier = stages[:i]
        if stage == "teacher":
            model_config("teacher", cfg.teacher, cfg)
        elif stage == "distill":
            check_distill(cfg, run_dir, trained_teacher="teacher" in earlier)
        elif stage == "qad":
            check_qad(cfg, run_dir, args, distilled_here="distill" in earlier, trained_teacher="teacher" in earlier)
        elif stage in ("eval", "export"):
            check_student(cfg, run_dir, stage, args, made_here="distill" in earlier)
        elif stage == "segment-bag":
            check_segment_bag(run_dir, args, exported_here="export" in earlier)
        elif stage == "segment":
            check_segment(run_dir, args, exported_here="export" in earlier)
        elif stage == "export-triton":
            check_triton(cfg, run_dir, exported_here="export" in earlier)
    if "export" in stages and cfg.export.triton:
        check_triton(cfg, run_dir, exported_here=True)
    if "eval" in stages and getattr(args, "write_cityscapes", None):
        writable_folder(Path(args.write_cityscapes), "--write-cityscapes")
    check_run_dir(run_dir, cfg, training=any(STAGES[s].trains for s in stages), qad="qad" in stages)


# ------------------------------------------------------------------------------------------------ places
def writable_folder(path: Path, key: str) -> None:
    """`path` is, or can be made as, a folder we may write in: its nearest existing ancestor is a writable folder
    (a regular file on the way, a read-only file system or a missing permission is refused, naming `key`)."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{key} {path}: {existing} is a file, not a folder; choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{key} {path}: {existing} is not writable (read-only or no permission); choose another "
                         f"{key}")


def check_run_dir(run_dir: Path, cfg: Config, training: bool, qad: bool = False) -> None:
    """The run directory can be written, and an existing one was made with the same values of every key that
    changes what its training computes (else training there is refused, unless train.resume=never). The qad.* keys
    count only when the qad stage (`qad`) resumes a training of its own there."""
    writable_folder(run_dir, "--run-dir")
    path = run_dir / "config.yaml"
    if not (training and cfg.train.resume == "auto" and path.is_file()):
        return
    from pipeline.train import RESUMABLE_KEYS

    try:
        old = config_mod.flatten(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, OSError, UnicodeDecodeError, AttributeError):
        return  # an unreadable record is archived by the run, not compared
    new = config_mod.flatten(yaml.safe_load(config_mod.dump(cfg)))
    # export.* and bench.* only shape artifacts made from the trained models, never the training itself; qad.* only
    # the qad stage's training (a run directory distilled before, or made before the qad keys existed, takes any)
    resumes_qad = qad and (run_dir / "checkpoints" / "qad" / "last.json").is_file()
    ignored = ("export.", "bench.") + (() if resumes_qad else ("qad.",))
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_KEYS
                    and not k.startswith(ignored))
    if differ:
        shown = ", ".join(differ[:6]) + (f" (+{len(differ) - 6} more)" if len(differ) > 6 else "")
        raise ConfigError(f"{path}: this run directory was made with other values of {shown}; use another "
                          "--run-dir, the same values, or train.resume=never to start over")


def check_data(cfg: Config) -> None:
    """A real dataset's folder exists; the synthetic one can be generated where data.root says."""
    d = cfg.data
    root = Path(d.root)
    if d.dataset != "synthetic":
        if not root.is_dir():
            raise DataError(f"data.root {root}: {d.dataset} dataset folder not found; set data.root to the folder "
                            f"that holds {d.dataset} in its published layout (docs/training.md)")
        return
    if root.exists():
        if not root.is_dir():
            raise DataError(f"data.root {root}: a file, not a folder; set data.root to a folder for the synthetic set")
        return  # ensure_synthetic keeps a matching set and refuses a folder that is not one
    writable_folder(root, "data.root")  # generated there


def dataset_classes(cfg: Config) -> int:
    """The class count of data.dataset, from its label set (no file is read)."""
    from pipeline.data.classes import LABEL_SETS

    return len(LABEL_SETS[cfg.data.dataset][0])


# ------------------------------------------------------------------------------------------------ models
def checkpoint_config(path: Path, key: str, num_classes: int | None = None) -> SegFormerConfig:
    """The architecture of a checkpoint: from its sidecar record where it has ours, else by loading it (a foreign
    file); with `num_classes`, as a backbone gets it (the head resized). A file that does not load is refused here."""
    from pipeline.artifacts import read_sidecar
    from pipeline.models import load_model
    from pipeline.models.registry import SegFormerConfig

    if not path.exists():
        raise InputError(f"{path}: no such file or directory ({key}); give an existing checkpoint or drop {key}")
    if path.suffix == ".safetensors" and sidecar_path(path).is_file():
        try:
            meta = read_sidecar(path)
            if meta.kind == "checkpoint":
                cfg = SegFormerConfig.from_dict(meta.details["config"])
                return replace(cfg, num_classes=num_classes) if num_classes else cfg
        except (PipelineError, TypeError, KeyError, ValueError):
            pass  # load_model names what is wrong with the file
    from pipeline.errors import CheckpointWarning

    with warnings.catch_warnings():  # a backbone's skipped head is reported when the run loads it
        warnings.simplefilter("ignore", CheckpointWarning)
        return load_model(path, strict=num_classes is None, num_classes=num_classes).config


def check_variant(key: str, path: str | Path, found: str, wanted: str) -> None:
    """A checkpoint of another table variant than `<role>.variant` is refused, with the two ways out. A custom
    architecture (not one of B0..B5) has no variant name to set, so it is taken as it is."""
    if found in (wanted, "custom"):
        return
    role = key.split(".")[0]
    raise ConfigError(f"{key}: {path} holds a {found} model, but {role}.variant is {wanted}; set "
                      f"{role}.variant={found} to use it, or drop {key} to train a {wanted} instead")


ENCODER_FIELDS = ("backbone", "dims", "depths", "mlp_ratios", "sr_ratios", "patch_sizes", "strides")


def backbone_config(key: str, path: str | Path, found: SegFormerConfig, wanted: str) -> SegFormerConfig:
    """The model a `<role>.pretrained` backbone starts: the file's own when it is of the variant, else the variant
    built around the file's encoder where the two encoders are one architecture (an encoder-only B5 file is named
    mit_b5, and PVTv2-B5's encoder is MiT-B5's); any other encoder is refused as check_variant refuses it."""
    from pipeline.models.registry import SegFormerConfig

    if found.variant in (wanted, "custom"):
        return found
    target = SegFormerConfig.from_variant(wanted, num_classes=found.num_classes, norm_eps=found.norm_eps)
    if all(getattr(found, f) == getattr(target, f) for f in ENCODER_FIELDS):
        return target
    check_variant(key, path, found.variant, wanted)
    return found


def check_classes(key: str, path: str | Path, found: int, cfg: Config) -> None:
    wanted = dataset_classes(cfg)
    if found != wanted:
        raise ConfigError(f"{key}: {path} predicts {found} classes, the dataset {cfg.data.dataset} has {wanted}; give "
                          f"a checkpoint of {cfg.data.dataset}'s classes, or the data.dataset it was trained on")


def model_config(role: str, spec: ModelConfig, cfg: Config) -> SegFormerConfig:
    """The architecture stages.new_model makes for `role` (spec.checkpoint, spec.pretrained, or spec.variant from
    scratch), with every file it would read checked: present, of spec.variant, of the dataset's classes."""
    from pipeline.models.registry import SegFormerConfig

    n = dataset_classes(cfg)
    if spec.pretrained and not Path(spec.pretrained).exists():
        raise InputError(f"{spec.pretrained}: no such file or directory ({role}.pretrained); give an existing "
                         f"backbone or drop {role}.pretrained")
    if spec.checkpoint:
        found = checkpoint_config(Path(spec.checkpoint), f"{role}.checkpoint")
        check_variant(f"{role}.checkpoint", spec.checkpoint, found.variant, spec.variant)
        check_classes(f"{role}.checkpoint", spec.checkpoint, found.num_classes, cfg)
        return found
    if spec.pretrained:
        found = checkpoint_config(Path(spec.pretrained), f"{role}.pretrained", num_classes=n)
        return backbone_config(f"{role}.pretrained", spec.pretrained, found, spec.variant)
    return SegFormerConfig.from_variant(spec.variant, num_classes=n)


def distill_teacher(cfg: Config, run_dir: Path, trained_teacher: bool) -> SegFormerConfig:
    """The architecture of the teacher run_distill uses: teacher.checkpoint, the run's trained teacher, or the one it
    trains first."""
    in_run = run_dir / run_file("checkpoint", "teacher")
    if cfg.teacher.checkpoint:
        return model_config("teacher", cfg.teacher, cfg)
    if not trained_teacher and in_run.is_file() and (run_dir / run_file("checkpoint", "teacher.last")).is_file():
        teacher = checkpoint_config(in_run, "the run's teacher")
        check_classes("the run's teacher", in_run, teacher.num_classes, cfg)
        return teacher
    return model_config("teacher", cfg.teacher, cfg)  # trained first, by this run


def check_distill(cfg: Config, run_dir: Path, trained_teacher: bool) -> None:
    """The teacher run_distill will use and the student it will make, and the method resolved for the pair: method
    name, every distill.weights key and value, the pair's widths and classes."""
    from pipeline.distill.methods import resolve_method

    teacher = distill_teacher(cfg, run_dir, trained_teacher)
    student = model_config("student", cfg.student, cfg)
    resolve_method(cfg.distill.method, teacher, student, **method_options(cfg))


LOGIT_KD = ("kd", "temperature")  # the logit-KD term and its option (method kd's), which QAD adds to any method


def qad_settings(cfg: Config, teacher: SegFormerConfig, student: SegFormerConfig) -> tuple[dict, dict]:
    """The qad stage's method settings for the pair, every key and value checked (ConfigError): (the options of
    distill.method, qad.weights over distill.weights; {"kd": weight, "temperature": T} where that method has no
    logit-KD term of its own and QAD adds one, else {})."""
    from pipeline.distill.methods import COMMON_OPTIONS, METHODS, resolve_method

    name = cfg.distill.method
    native = [*METHODS[name].weights, *METHODS[name].options, *COMMON_OPTIONS]
    for key in cfg.qad.weights:
        if key not in native and key not in LOGIT_KD:
            close = difflib.get_close_matches(key, [*native, *LOGIT_KD], n=1)
            raise ConfigError(f"qad.weights.{key}: unknown setting {key!r}; expected one of "
                              f"{', '.join([*native, *LOGIT_KD])} (method {name}'s settings and logit KD"
                              f"{f'; did you mean {close[0]}?' if close else ''})")
    own = qad_options(cfg)
    added = {k: own.pop(k) for k in LOGIT_KD if k in own and k not in native}
    resolve_method(name, teacher, student, **own)
    if not added:
        return own, {}
    try:
        kd = resolve_method("kd", teacher, student, **{"kd": 0.0, **added})
    except ConfigError as e:
        raise ConfigError(f"qad.weights (logit KD): {e}") from None
    return own, {"kd": kd.weights["kd"], "temperature": kd.options["temperature"]} if kd.weights["kd"] > 0 else {}


def check_qad(cfg: Config, run_dir: Path, args: argparse.Namespace, distilled_here: bool,
              trained_teacher: bool) -> None:
    """What the qad stage reads: the float student (--checkpoint, or the run's unless this run distils it first),
    never a QAD state; the teacher (teacher.checkpoint, or the run's); the method with qad.weights for the pair."""
    given = getattr(args, "checkpoint", None)
    if given or not distilled_here:
        path = Path(given or run_dir / run_file("checkpoint"))
        key = "--checkpoint" if given else "the run's student"
        if not path.exists():
            raise InputError(f"{path}: no student to fine-tune with quantization (qad); run the distill stage first or "
                             "pass --checkpoint")
        from pipeline.quant import is_qad_file

        if is_qad_file(path):
            raise InputError(f"{key} {path}: already fake-quantized (a QAD state); qad starts from the float student")
        student = checkpoint_config(path, key)
        check_classes(key, path, student.num_classes, cfg)
    else:
        student = model_config("student", cfg.student, cfg)
    in_run = run_dir / run_file("checkpoint", "teacher")
    if cfg.teacher.checkpoint or distilled_here:
        teacher = distill_teacher(cfg, run_dir, trained_teacher)
    elif in_run.is_file():
        teacher = checkpoint_config(in_run, "the run's teacher")
        check_classes("the run's teacher", in_run, teacher.num_classes, cfg)
    else:
        raise InputError(f"{in_run}: no teacher to distil from while quantizing (qad); run the distill stage first or "
                         "set teacher.checkpoint")
    qad_settings(cfg, teacher, student)


def check_student(cfg: Config, run_dir: Path, stage: str, args: argparse.Namespace, made_here: bool) -> None:
    """The checkpoint eval or export reads (--checkpoint, or the run's student unless this run distils it) exists
    and predicts the dataset's classes."""
    given = getattr(args, "checkpoint", None)
    if not given and made_here:
        return
    path = Path(given or run_dir / run_file("checkpoint"))
    if not path.exists():
        raise InputError(f"{path}: no student to {stage}; run the distill stage first or pass --checkpoint")
    found = checkpoint_config(path, "--checkpoint" if given else "the run's student")
    check_classes("--checkpoint" if given else "the run's student", path, found.num_classes, cfg)


# ------------------------------------------------------------------------------------------------ bags, images
def check_artifact(run_dir: Path, args: argparse.Namespace, exported_here: bool) -> None:
    """--artifact, or the run's student.onnx where no earlier stage of this call exports it, exists."""
    if args.artifact or not exported_here:
        artifact = Path(args.artifact or run_dir / run_file("onnx"))
        if not artifact.exists():
            raise InputError(f"{artifact}: no such artifact (--artifact: an engine, ONNX or checkpoint)")


def check_segment_bag(run_dir: Path, args: argparse.Namespace, exported_here: bool) -> None:
    """The bag and the artifact exist; the output bag and the video can be written where they are asked for."""
    from pipeline.bag import check_outputs, check_topics, default_out

    if not getattr(args, "bag", None) or not getattr(args, "topic", None):
        raise InputError("segment-bag: give --bag IN and --topic /camera/... (and --artifact, --out)")
    bag = Path(args.bag)
    if not bag.exists():
        raise InputError(f"{bag}: no such bag (--bag: a ROS 1 .bag file or a ROS 2 bag directory)")
    check_topics(args.topic, args.batch)
    check_artifact(run_dir, args, exported_here)
    check_outputs(Path(args.out) if args.out else default_out(bag, run_dir), Path(args.video) if args.video else None)


def check_triton(cfg: Config, run_dir: Path, exported_here: bool) -> None:
    """The triton.* settings, tritonclient's schema, and, unless this call exports them first, the run's artifacts
    and where the repository goes (<run dir>/deploy, replaced when an earlier export or export-triton wrote it)."""
    from pipeline import triton
    from pipeline.stages import DEPLOY

    t = cfg.triton
    settings = triton.Settings(t.max_batch_size, t.instances, t.instance_kind, t.max_queue_delay_us)
    if exported_here:
        settings.check()
        triton.schema()
        out = run_dir / DEPLOY
        if out.exists() and not triton.is_repository(out):  # refused now, not after the export's work
            raise InputError(f"{out}: exists and is not a repository export-triton wrote; move it away")
    else:
        triton.check_repository_args(run_dir, run_dir / DEPLOY, settings=settings, replace=True)


def check_segment(run_dir: Path, args: argparse.Namespace, exported_here: bool) -> None:
    """The images or video and the artifact exist; the output folder and the video can be written; every image
    decodes (or --skip-bad)."""
    from pipeline import segment

    if not getattr(args, "source", None):
        raise InputError("segment: give --source (an image, a folder, a glob or a video) and --artifact, --out")
    segment.check_settings(1 if args.batch is None else args.batch, args.fps)
    sources = segment.find_sources(args.source)
    check_artifact(run_dir, args, exported_here)
    segment.check_outputs(Path(args.out) if args.out else segment.default_out(sources, run_dir),
                          Path(args.video) if args.video else None)
    segment.check_sources(sources, args.skip_bad)


__all__ = ["backbone_config", "check", "check_classes", "check_variant", "checkpoint_config", "model_config",
           "writable_folder"]
