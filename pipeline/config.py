"""Typed configuration: one dataclass per stage, YAML in, `key=value` overrides, validated with one-line errors."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.artifacts import INPUTS, OUTPUTS
from pipeline.errors import ConfigError, InputError


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # one of pipeline.data.DATASETS: synthetic | cityscapes | acdc | nyuv2 | voc
    root: str = "data/synthetic"  # dataset folder; the synthetic set is generated here when missing
    size: tuple[int, int] = (128, 256)  # training crop and evaluation height, H x W
    train_split: str = "train"
    val_split: str = "val"
    scale: tuple[float, float] = (0.5, 2.0)  # random rescale range while training
    flip: bool = True
    jitter: bool = True
    workers: int = 0  # DataLoader worker processes (0: load in the training process)
    skip_bad: bool = False  # log and skip unreadable or inconsistent samples instead of stopping
    synthetic_train: int = 300  # size of the generated synthetic set
    synthetic_val: int = 60
    synthetic_size: tuple[int, int] = (256, 512)
    synthetic_seed: int = 0


@dataclass
class ModelConfig:
    variant: str = "mit_b0"
    checkpoint: str = ""  # any file load_model accepts; empty: train it (teacher) or start fresh (student)
    pretrained: str = ""  # encoder-only ImageNet checkpoint (MiT, PVTv2, LVT) to initialise the backbone from
    steps: int = 0  # training steps for this model; 0: train.steps


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 4  # per process; the global batch is batch_size * accumulate * world size
    accumulate: int = 1  # micro-batches per optimizer step
    lr: float = 6e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 20
    power: float = 1.0  # poly decay exponent
    final_lr_ratio: float = 1 / 3  # the reference ends at 2e-5 from 6e-5
    grad_clip: float = 0.0  # max gradient norm; 0: off
    # autocast of training, evaluation and the teacher's forward (pipeline/amp.py): auto takes bf16 where the hardware
    # computes it natively (CUDA compute capability >= 8.0; a CPU with AVX512-BF16, AMX or Arm BF16), fp16 with a
    # GradScaler on older GPUs, float32 on other CPUs | off: float32 | bf16: as asked (emulated, slow, on a CPU
    # without it) | fp16: on CUDA, float32 on a CPU.
    # A resumed run keeps the precision it started with.
    amp: str = "auto"
    channels_last: bool = True  # on CUDA
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    eval_every: int = 100
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto: continue a run directory's last checkpoint | never


@dataclass
class DistillConfig:
    method: str = "transkd-base"
    weights: dict = field(default_factory=dict)  # loss weights and method options, e.g. {pea: 1.0, temperature: 4}
    # label: logits upsampled to the labels (every labelled pixel scored, as the evaluator scores) | quarter: labels
    # downsampled to the 1/4-resolution logits by nearest neighbour (the TransKD reference's, cheaper)
    ce_resolution: str = "label"


@dataclass
class QadConfig:
    """Quantization-aware distillation (the qad stage): the distilled student fake-quantized as the INT8 export
    quantizes it (pipeline/quant.py), calibrated like the PTQ export, then fine-tuned against the frozen teacher with
    the run's distill.method; the other train.* keys (batch, optimizer, logging, checkpoints) are the run's."""

    steps: int = 100  # fine-tuning steps: 100 add under 3 minutes to the synthetic default on a 2-core CPU
    # about 2 % of train.lr, near the 1 % QAT starts from (Wu et al. 2020): the distilled weights only have to adapt
    # to the INT8 grid, not move on. A converged student (1500 steps, 37.18 %, 5-bit stress, PTQ 35.87 %): lr 6e-5
    # 35.26 % after 100 steps, 1e-5 back to 37.18 % after 60. The 300-step default student is not converged, and a
    # larger lr mostly goes on training it (6e-5: 23.99 -> 24.45 %).
    lr: float = 1e-5
    warmup_steps: int = 10
    eval_every: int = 20  # validation every this many QAD steps (train.eval_every is the distill stage's)
    # loss weights and method options over distill.weights (key by key): the run's terms plus logit KD (`kd`, at
    # `temperature`, default 4) against the teacher's logits; `qad.weights.X=v` sets one, a mapping replaces these
    weights: dict = field(default_factory=lambda: {"kd": 1.0})
    calibration_frames: int = 32  # training frames the activation ranges are calibrated on (as export's PTQ)
    calibration_method: str = "entropy"  # entropy | max
    learn_ranges: bool = True  # activation ranges trained too (LSQ gradient), else kept as calibrated
    # stress settings, not deployment ones: quantize the stem and classifier too (float_ends=false), or use fewer
    # bits than 8 (a PyTorch-only state: the export leaves it out)
    float_ends: bool = True
    bits: int = 8


@dataclass
class ExportConfig:
    input: str = "float"  # float: NCHW RGB float32, normalised outside | uint8: NHWC BGR uint8, normalised inside
    output: str = "logits"  # logits (1/4 resolution) | labels (upsample + argmax inside, int32)
    size: tuple[int, int] = (0, 0)  # HxW of the graph; 0x0: data.size
    # labels graph: HxW of its labels, the camera's (the upsample and argmax then run on the device, not on the host
    # at camera size); 0x0: the input's
    labels_size: tuple[int, int] = (0, 0)
    batch: int = 1
    dynamic: bool = False  # dynamic batch, height and width
    opset: int = 17
    simplify: bool = True  # onnxslim
    fp16: bool = True  # student.fp16.onnx
    int8: bool = True  # student.int8.onnx (Q/DQ, calibrated on training frames)
    calibration_frames: int = 32
    calibration_method: str = "entropy"  # entropy | max
    # torch: the pipeline's placement (pipeline/quant.py: fake quantization in PyTorch, traced to Q/DQ; FP16 elsewhere)
    # | modelopt: Model Optimizer's ONNX PTQ (FP16 elsewhere) | ort: ONNX Runtime's QDQ quantizer (FP32 elsewhere)
    int8_backend: str = "torch"
    # mixed precision (torch backend): keep the most sensitive groups in FP16 until the INT8 graph's mIoU is within
    # this many points of the FP32 graph's on the validation frames; negative: every group INT8
    int8_max_drop: float = -1.0
    # argmax agreement the torch backend's Q/DQ graph must reach with the fake-quantized PyTorch model it was traced
    # from, on the parity frames (trained students: 99.8-99.9 %; an untrained network's near-ties flip far more often)
    int8_min_agreement: float = 0.99
    parity_frames: int = 8  # validation frames the ONNX must match PyTorch on
    parity_max_diff: float = 1e-3  # max |logit difference| of the FP32 ONNX against PyTorch
    parity_min_agreement: float = 0.999  # argmax agreement of the FP32 ONNX with PyTorch
    eval_frames: int = 0  # validation frames each artifact is scored on; 0: all
    engines: str = "auto"  # TensorRT plans: auto (when TensorRT and a GPU exist) | off
    workspace_gib: float = 4.0
    opt_level: int = 3  # TensorRT builder optimization level 0..5
    triton: bool = False  # also write the Triton model repository and DeepStream configs (triton.* keys; export-triton)


@dataclass
class BenchConfig:
    size: tuple[int, int] = (0, 0)  # network HxW latency is measured at; 0x0: the exported size (data.size)
    batch: int = 1
    warmup: int = 3  # calls per artifact before timing
    iterations: int = 20  # timed calls per artifact, interleaved over `rounds`
    rounds: int = 5
    threads: int = 0  # CPU threads for PyTorch and ONNX Runtime; 0: their default
    eval_frames: int = 0  # validation frames each artifact is scored on; 0: all
    cuda: str = "auto"  # auto: also time on the GPU when one is visible | off
    allow_fallback: bool = False  # an ONNX row whose CUDA provider did not start runs on the CPU instead of skipped


@dataclass
class TritonConfig:
    """The Triton model repository (export-triton, or export.triton=true): one model per ONNX file and plan."""

    max_batch_size: int = 8  # frames one request may batch (a static-batch artifact: its own batch, no batching)
    instances: int = 1  # model instances per GPU (or on the CPU)
    instance_kind: str = "gpu"  # gpu | cpu (ONNX only: a plan runs on the GPU it was built for)
    max_queue_delay_us: int = 100  # dynamic batching: how long a request may wait for others to join it


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(variant="mit_b2"))
    student: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    qad: QadConfig = field(default_factory=QadConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    triton: TritonConfig = field(default_factory=TritonConfig)
    seed: int = 0

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


INT64 = 1 << 63  # an integer value must fit the 64 bits torch and numpy take it as

# Allowed values of the keys with a fixed set of words; the keys whose values name a registry entry (a dataset, a
# model variant, a distillation method) are checked against that registry (REGISTRIES).
CHOICES = {
    "train.amp": ("auto", "off", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.resume": ("auto", "never"),
    "distill.ce_resolution": ("label", "quarter"),  # losses.CE_RESOLUTIONS (not imported: it imports torch)
    "export.input": tuple(INPUTS),
    "export.output": tuple(OUTPUTS),
    "qad.calibration_method": ("entropy", "max"),  # quant.calibrate, as export.calibration_method
    "export.calibration_method": ("entropy", "max"),  # precision.to_int8: KL-optimal or max-abs thresholds
    "export.int8_backend": ("torch", "modelopt", "ort"),  # quant.py's placement, or precision.to_int8's backends
    "export.engines": ("auto", "off"),
    "bench.cuda": ("auto", "off"),
    "triton.instance_kind": ("gpu", "cpu"),
}


def _datasets() -> tuple[str, ...]:
    from pipeline.data.datasets import DATASETS

    return tuple(DATASETS)


def _variants() -> tuple[str, ...]:
    from pipeline.models import VARIANTS

    return tuple(VARIANTS)


def _methods() -> tuple[str, ...]:
    from pipeline.distill import METHODS

    return tuple(METHODS)


# imported when first needed: the registries import torch, the config (and `--help`) must not
REGISTRIES = {"data.dataset": _datasets, "teacher.variant": _variants, "student.variant": _variants,
              "distill.method": _methods}


def choices(key: str) -> tuple[str, ...] | None:
    """The values `key` accepts, or None when any value of its type goes."""
    if key in CHOICES:
        return CHOICES[key]
    return REGISTRIES[key]() if key in REGISTRIES else None


def check_choice(key: str, value: object, where: str = "") -> None:
    """ConfigError unless `value` is one of the values `key` accepts (with the close matches of a typo)."""
    allowed = choices(key)
    if allowed is None or value in allowed:
        return
    close = difflib.get_close_matches(str(value), allowed, n=2)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise ConfigError(f"{key}={value!r}{where}: expected one of {', '.join(allowed)}{hint}")


def keys(cfg: Config | None = None) -> dict[str, object]:
    """Every dotted key with its current value (the defaults when no config is given)."""
    cfg = cfg or Config()
    out: dict[str, object] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                out[f"{f.name}.{g.name}"] = getattr(value, g.name)
        else:
            out[f.name] = value
    return out


def _coerce(key: str, value, target_type, current):
    """A YAML/CLI value as the field's type, or ConfigError naming the key and what was expected."""
    origin = typing.get_origin(target_type)
    if isinstance(current, tuple) or origin is tuple:
        if isinstance(value, str):  # "128x256" or "0.5,2.0"
            parts = value.lower().replace("x", ",").split(",")
            with contextlib.suppress(yaml.YAMLError):  # a part YAML refuses (a NUL): refused below as it was given
                value = [yaml.safe_load(p) for p in parts]
        if not isinstance(value, (list, tuple)) or len(value) != len(current):
            raise ConfigError(f"{key}={value!r}: expected {len(current)} values like "
                              f"{'x'.join(str(v) for v in current)}")
        return tuple(_coerce(key, v, type(c), c) for v, c in zip(value, current))
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if isinstance(current, (int, float)) and isinstance(value, str):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads "1e-3" (no dot) as a string
            value = type(current)(value)
    if isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool) and -INT64 <= value < INT64:
            return value
        raise ConfigError(f"{key}={value!r}: expected an integer" + (" of 64 bits" if isinstance(value, int) else ""))
    if isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{key}={value!r}: expected a finite number")
    if isinstance(current, dict):
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return value
        raise ConfigError(f"{key}={value!r}: expected a mapping of names like {{pea: 1.0}}")
    if value is None:
        return ""
    if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans; a text key means the word
        return "off" if value is False else "on"
    if isinstance(value, (list, tuple, dict, set, bytes)) or "\0" in str(value):
        raise ConfigError(f"{key}={value!r}: expected a text value" + (" without NUL characters"
                                                                        if isinstance(value, str) else ""))
    return str(value)


def apply(cfg: Config, overrides: dict[str, object], source: str = "") -> Config:
    """Set dotted keys on `cfg` (values already parsed from YAML or the command line)."""
    known = keys(cfg)
    hints = {t.__name__: typing.get_type_hints(t) for t in (DataConfig, ModelConfig, TrainConfig, DistillConfig,
                                                              QadConfig, ExportConfig, BenchConfig, TritonConfig,
                                                              Config)}
    where = f" (in {source})" if source else ""
    for key, value in overrides.items():
        section, _, term = key.partition(".weights.")
        if section in ("distill", "qad") and term and "." not in term:
            getattr(cfg, section).weights[term] = value
            continue
        if key not in known and key in _sections():
            raise ConfigError(f"{key}={value!r}{where}: expected a mapping of the {key}.* keys")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"unknown key {key!r}{where}; {hint}valid keys: {', '.join(known)}")
        section, _, name = key.rpartition(".")
        obj = getattr(cfg, section) if section else cfg
        target_type = hints[type(obj).__name__][name]
        new = _coerce(key, value, target_type, getattr(obj, name))
        check_choice(key, new, where)
        setattr(obj, name, new)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every value check that a type alone does not express; the one place they are made."""
    for key, value in keys(cfg).items():
        check_choice(key, value)
    _check_train(cfg)
    _check_data(cfg.data)
    _check_qad(cfg.qad)
    _check_export(cfg.export)
    _check_bench(cfg.bench)
    _at_least(1, {"triton.max_batch_size": cfg.triton.max_batch_size, "triton.instances": cfg.triton.instances})
    _at_least(0, {"triton.max_queue_delay_us": cfg.triton.max_queue_delay_us})


def _check_train(cfg: Config) -> None:
    t = cfg.train
    positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "train.accumulate": t.accumulate,
                "train.log_every": t.log_every, "train.eval_every": t.eval_every, "train.ckpt_every": t.ckpt_every,
                "train.keep_checkpoints": t.keep_checkpoints}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value}: expected an integer >= 1")
    if not t.lr > 0:
        raise ConfigError(f"train.lr={t.lr}: expected a number > 0")
    if t.warmup_steps < 0 or not 0 <= t.final_lr_ratio <= 1:
        raise ConfigError("train.warmup_steps must be >= 0 and train.final_lr_ratio within [0, 1]")
    for key, spec in (("teacher.steps", cfg.teacher), ("student.steps", cfg.student)):
        if spec.steps < 0:
            raise ConfigError(f"{key}: expected an integer >= 0")
    if not 0 <= t.betas[0] < 1 or not 0 <= t.betas[1] < 1:
        raise ConfigError(f"train.betas={t.betas}: expected two numbers within [0, 1)")
    _at_least(0, {"train.weight_decay": t.weight_decay, "train.power": t.power, "train.grad_clip": t.grad_clip,
                  "seed": cfg.seed})


def _at_least(low: int, values: dict[str, float]) -> None:
    for key, value in values.items():
        if value < low:
            raise ConfigError(f"{key}={value}: expected a number >= {low}")


def _check_data(d: DataConfig) -> None:
    if min(d.size) < 32:
        raise ConfigError(f"data.size={d.size}: height and width must be >= 32")
    if not 0 < d.scale[0] <= d.scale[1]:
        raise ConfigError(f"data.scale={d.scale}: expected 0 < low <= high")
    if min(d.synthetic_size) < 32:
        raise ConfigError(f"data.synthetic_size={d.synthetic_size}: height and width must be >= 32")
    _at_least(0, {"data.workers": d.workers, "data.synthetic_seed": d.synthetic_seed})
    _at_least(1, {"data.synthetic_train": d.synthetic_train, "data.synthetic_val": d.synthetic_val})


def _check_qad(q: QadConfig) -> None:
    _at_least(1, {"qad.steps": q.steps, "qad.calibration_frames": q.calibration_frames})
    _at_least(0, {"qad.warmup_steps": q.warmup_steps})
    _at_least(1, {"qad.eval_every": q.eval_every})
    if not q.lr > 0:
        raise ConfigError(f"qad.lr={q.lr}: expected a number > 0")
    if not 2 <= q.bits <= 8:
        raise ConfigError(f"qad.bits={q.bits}: expected an integer within 2..8")


def _check_export(e: ExportConfig) -> None:
    if e.size != (0, 0) and min(e.size) < 32:
        raise ConfigError(f"export.size={e.size}: height and width must be >= 32 (or 0x0 for data.size)")
    if e.labels_size != (0, 0) and (e.output != "labels" or min(e.labels_size) < 32):
        raise ConfigError(f"export.labels_size={e.labels_size}: needs export.output=labels and a height and width "
                          ">= 32 (or 0x0 for the input's size)")
    if e.opset < 17:  # a decomposed LayerNormalization (opset < 17) overflows in FP16
        raise ConfigError(f"export.opset={e.opset}: expected >= 17 (native LayerNormalization)")
    if e.batch < 1 or not 0 <= e.opt_level <= 5 or e.calibration_frames < 1:
        raise ConfigError("export.batch and export.calibration_frames must be >= 1, export.opt_level within 0..5")
    if not e.parity_max_diff > 0:
        raise ConfigError(f"export.parity_max_diff={e.parity_max_diff}: expected a number > 0")
    for key, value in (("export.parity_min_agreement", e.parity_min_agreement),
                       ("export.int8_min_agreement", e.int8_min_agreement)):
        if not 0 <= value <= 1:
            raise ConfigError(f"{key}={value}: expected a number within [0, 1]")
    if not e.workspace_gib > 0:
        raise ConfigError(f"export.workspace_gib={e.workspace_gib}: expected a number > 0")
    _at_least(0, {"export.parity_frames": e.parity_frames, "export.eval_frames": e.eval_frames})


def _check_bench(b: BenchConfig) -> None:
    if b.size != (0, 0) and min(b.size) < 32:
        raise ConfigError(f"bench.size={b.size}: height and width must be >= 32 (or 0x0 for the exported size)")
    if min(b.batch, b.iterations, b.rounds) < 1 or b.warmup < 0 or b.threads < 0 or b.eval_frames < 0:
        raise ConfigError("bench.batch, bench.iterations and bench.rounds must be >= 1, bench.warmup, "
                          "bench.threads and bench.eval_frames >= 0")


def method_options(cfg: Config) -> dict[str, object]:
    """The keyword options of the distillation method: `distill.weights` (loss weights and method options) with
    `distill.ce_resolution`, which is set in one place only."""
    if "ce_resolution" in cfg.distill.weights:
        raise ConfigError("distill.weights.ce_resolution: set it as distill.ce_resolution (label or quarter)")
    return {**cfg.distill.weights, "ce_resolution": cfg.distill.ce_resolution}


def qad_options(cfg: Config) -> dict[str, object]:
    """The keyword options of the qad stage's method: method_options with `qad.weights` over them, key by key."""
    if "ce_resolution" in cfg.qad.weights:
        raise ConfigError("qad.weights.ce_resolution: set it as distill.ce_resolution (label or quarter)")
    return {**method_options(cfg), **cfg.qad.weights}


def export_size(cfg: Config) -> tuple[int, int]:
    """The exported graph's H x W: export.size, or data.size where that is 0x0."""
    return tuple(cfg.export.size) if tuple(cfg.export.size) != (0, 0) else tuple(cfg.data.size)


def bench_size(cfg: Config) -> tuple[int, int]:
    """The H x W latency is measured at: bench.size, or the exported size where that is 0x0."""
    return tuple(cfg.bench.size) if tuple(cfg.bench.size) != (0, 0) else export_size(cfg)


def parse_size(text: str, what: str = "--size") -> tuple[int, int]:
    """'512x1024' -> (512, 1024); `what` names the option or parameter in the one-line error."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"{what} {text!r}: expected HEIGHTxWIDTH, e.g. 512x1024") from None
    if h < 32 or w < 32:
        raise InputError(f"{what} {text!r}: height and width must be >= 32")
    return h, w


def parse_overrides(items: list[str]) -> dict[str, object]:
    """`key=value` strings from the command line; values parsed as YAML scalars (so 3, 1e-4, true work)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item!r}: expected key=value, e.g. train.steps=200")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, RecursionError):
            value = raw
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            value = raw.strip()  # YAML 1.1 reads off/on/no/yes as booleans: `train.amp=off` means the word
        out[key.strip()] = value
    return out


def flatten(d: dict) -> dict[str, object]:
    """The sections of a YAML mapping -> dotted keys (`data: {size: ...}` -> data.size). A mapping anywhere else is
    the key's value (distill.weights, or one a type check refuses), never more keys: `root: {}` is not no root."""
    sections, out = _sections(), {}
    for k, v in d.items():
        if k in sections and (isinstance(v, dict) or v is None):  # None: a section with every line commented out
            out.update({f"{k}.{name}": value for name, value in (v or {}).items()})
        else:
            out[str(k)] = v
    return out


def _sections() -> set[str]:
    return {k.partition(".")[0] for k in keys() if "." in k}


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then command-line overrides; every step validated."""
    cfg = Config()
    if path:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to be a config") from None
        data = {} if data is None else data  # an empty file: the defaults
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data, train, ...)")
        apply(cfg, flatten(data), source=str(path))
    apply(cfg, parse_overrides(overrides or []))
    return cfg


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = ["CHOICES", "REGISTRIES", "BenchConfig", "Config", "DataConfig", "DistillConfig", "ExportConfig",
           "ModelConfig", "QadConfig", "TrainConfig", "TritonConfig", "apply", "bench_size", "check_choice", "choices",
           "dump", "export_size", "keys", "load", "method_options", "parse_overrides", "parse_size", "qad_options",
           "validate"]
