"""The table of distillation methods; `build_method` turns an entry into train-only modules and a loss."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.distill.csf import CrossSelectiveFusion, hcl_loss
from pipeline.distill.embedding import EmbeddingAssistant, GlobalLocalMixer, PatchEmbedAlign, resize_tokens
from pipeline.distill.losses import CE_RESOLUTIONS, ce_loss, cwd_loss, kd_loss, resize_to
from pipeline.errors import ConfigError
from pipeline.models.registry import SegFormerConfig
from pipeline.models.segformer import SegFormer, Taps


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: the loss terms with their default weights, the train-only modules it attaches,
    and its other hyper-parameters. Defaults are the TransKD reference's (docs/method.md)."""

    summary: str
    weights: dict[str, float]
    modules: tuple[str, ...] = ()
    options: dict[str, object] = field(default_factory=dict)


CSF = {"csf_mid": 64}
PEA = {"pea_stage_weights": (0.1, 0.1, 0.5, 1.0)}
METHODS: dict[str, MethodSpec] = {
    "none": MethodSpec("student alone, cross-entropy", {"ce": 1.0}),
    "kd": MethodSpec("logit distillation (Hinton) at temperature T", {"ce": 1.0, "kd": 1.0},
                     options={"temperature": 4.0}),
    "cwd": MethodSpec("channel-wise distillation (Shu et al.) of the logits, or of the stage maps through a 1x1 "
                      "conv per stage (cwd_on=maps)", {"ce": 1.0, "cwd": 3.0},
                      options={"tau": 4.0, "cwd_on": "logits"}),
    "review": MethodSpec("Knowledge Review baseline: CSF + hierarchical context loss on the stage maps",
                         {"ce": 1.0, "hcl": 1.0}, ("csf",), dict(CSF)),
    "transkd-base": MethodSpec("TransKD-Base: CSF + HCL, and Patch Embedding Alignment on all four stages",
                               {"ce": 1.0, "hcl": 1.0, "pea": 1.0}, ("csf", "pea"), {**CSF, **PEA}),
    "transkd-gl": MethodSpec("TransKD-GL: TransKD-Base with the Global-Local Context Mixer on stage 4's embedding",
                             {"ce": 1.0, "hcl": 1.0, "pea": 1.0}, ("csf", "pea", "gl"),
                             {**CSF, **PEA, "gl_heads": 8}),
    "transkd-ea": MethodSpec("TransKD-EA: TransKD-Base with the Embedding Assistant",
                             {"ce": 1.0, "hcl": 1.0, "pea": 1.0}, ("csf", "pea", "ea"), {**CSF, **PEA}),
}
# ce_resolution: where the cross-entropy is taken, "label" (logits upsampled to the labels, the default) or
# "quarter" (labels downsampled to the 1/4-resolution logits, the reference's); see losses.ce_loss
COMMON_OPTIONS: dict[str, object] = {"class_weights": None, "ce_resolution": "label"}

Builder = Callable[[SegFormerConfig, SegFormerConfig, dict], nn.Module]
MODULES: dict[str, Builder] = {  # train-only module name -> builder(student config, teacher config, options)
    "csf": lambda s, t, o: CrossSelectiveFusion(s.dims, t.dims, o["csf_mid"]),
    "pea": lambda s, t, o: PatchEmbedAlign(s.dims, t.dims),
    "gl": lambda s, t, o: GlobalLocalMixer(s.dims[-1], o["gl_heads"]),
    "ea": lambda s, t, o: EmbeddingAssistant(s.dims, t.dims, s.patch_sizes, s.strides, s.norm_eps[0]),
    "cwd_proj": lambda s, t, o: nn.ModuleList(nn.Conv2d(cs, ct, 1) for cs, ct in zip(s.dims, t.dims)),
}


class DistillMethod:
    """A built method: `modules` holds every train-only parameter; `loss` turns taps into named terms."""

    def __init__(self, name: str, teacher: SegFormer | None, student: SegFormer, weights: dict[str, float],
                 options: dict[str, object], modules: dict[str, nn.Module]) -> None:
        self.name = name
        self.teacher = teacher
        self.student = student
        self.weights = weights
        self.options = options
        self.modules = nn.ModuleDict(modules)
        cw = options.get("class_weights")
        self._class_weights = torch.tensor(cw, dtype=torch.float32) if cw is not None else None

    @property
    def needs_teacher(self) -> bool:
        return any(term != "ce" and w > 0 for term, w in self.weights.items())

    def describe(self) -> dict:
        """What a run directory records about the method."""
        return {"name": self.name, "weights": dict(self.weights),
                "options": {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()},
                "train_only_parameters": sum(p.numel() for p in self.modules.parameters())}

    def teacher_features(self, x: torch.Tensor) -> Taps | None:
        """The frozen teacher's taps for a batch (None when no term needs them), computed without autograd, in the
        caller's autocast dtype (the losses cast them to float32).

        Inference-mode tensors cannot be saved for backward, and every distillation loss saves its target,
        so the taps are cloned out of inference mode (a copy of the taps, cheaper than a tracked forward).
        """
        if self.teacher is None or not self.needs_teacher:
            return None
        self.teacher.eval()
        with torch.inference_mode():
            taps = self.teacher.features(x)
        return taps.map(torch.Tensor.clone)

    def loss(self, student: Taps, teacher: Taps | None, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted loss terms by name, and their sum under "total". Terms with weight 0 are not computed."""
        w = {k: v for k, v in self.weights.items() if v > 0}
        if teacher is None and any(k != "ce" for k in w):
            raise ConfigError(f"method {self.name}: the loss needs teacher taps, got None")
        terms: dict[str, torch.Tensor] = {}
        if "ce" in w:
            cw = self._class_weights
            terms["ce"] = ce_loss(student.logits, labels, cw.to(student.logits.device) if cw is not None else None,
                                  resolution=str(self.options["ce_resolution"]))
        if "kd" in w:
            terms["kd"] = kd_loss(student.logits, teacher.logits, float(self.options["temperature"]))
        if "cwd" in w:
            terms["cwd"] = self._cwd(student, teacher)
        if "hcl" in w:
            fused = self.modules["csf"](student.maps)
            terms["hcl"] = hcl_loss([resize_to(f.float(), t.shape[2:]) for f, t in zip(fused, teacher.maps)],
                                    teacher.maps)
        if "pea" in w:
            terms["pea"] = self._embedding_loss(student, teacher)
        out = {k: w[k] * v for k, v in terms.items()}
        out["total"] = sum(out.values())
        return out

    def _cwd(self, student: Taps, teacher: Taps) -> torch.Tensor:
        tau = float(self.options["tau"])
        if self.options["cwd_on"] == "logits":
            return cwd_loss(student.logits, teacher.logits, tau)
        proj = self.modules["cwd_proj"]
        return sum(cwd_loss(p(s), t, tau) for p, s, t in zip(proj, student.maps, teacher.maps))

    def _embedding_loss(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """PEA (with GL-Mixer on the deepest stage and the Embedding Assistant where the method has them); the
        modules run in the step's autocast dtype, the resampling and the MSE in float32 (distill/losses.py)."""
        gl = self.modules["gl"] if "gl" in self.modules else None
        ea = self.modules["ea"] if "ea" in self.modules else None
        last = len(student.embeddings) - 1
        total = student.logits.new_zeros((), dtype=torch.float32)
        for i, (weight, tokens) in enumerate(zip(self.options["pea_stage_weights"], student.embeddings)):
            if gl is not None and i == last:
                tokens = gl(tokens)
            aligned = self.modules["pea"](i, tokens)
            if ea is not None:
                aligned = ea(i, aligned, student.image if i == 0 else student.maps[i - 1])
            aligned = resize_tokens(aligned.float(), student.sizes[i], teacher.sizes[i])
            total = total + weight * F.mse_loss(aligned, teacher.embeddings[i].float())
        return total


@dataclass(frozen=True)
class ResolvedMethod:
    """A method of the table resolved for a teacher/student pair of architectures: every weight and option
    settled and checked, and the train-only modules to build. No tensor is made."""

    name: str
    weights: dict[str, float]
    options: dict[str, object]
    modules: tuple[str, ...]

    @property
    def needs_teacher(self) -> bool:
        return any(term != "ce" and w > 0 for term, w in self.weights.items())


def resolve_method(name: str, teacher: SegFormerConfig | None, student: SegFormerConfig,
                   **overrides) -> ResolvedMethod:
    """Settle a method of the table for a teacher/student pair of configs; `overrides` set loss weights (by term
    name) or options (temperature, tau, cwd_on, csf_mid, pea_stage_weights, gl_heads, class_weights,
    ce_resolution).

    Every inconsistency is a ConfigError here, from the configs alone: the CLI checks a run with it before any data
    is made or model built, and build_method with the same call.
    """
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown distillation method {name!r}{hint}; expected one of {', '.join(METHODS)}")
    spec = METHODS[name]
    weights = dict(spec.weights)
    options = {**COMMON_OPTIONS, **spec.options}
    for key, value in overrides.items():
        if key in weights:
            weights[key] = _weight(name, key, value)
        elif key in options:
            options[key] = value
        else:
            close = difflib.get_close_matches(key, [*weights, *options], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"distill.weights.{key}: unknown setting {key!r}; expected one of "
                              f"{', '.join([*weights, *options])} (the settings of method {name}{hint})")

    needs_teacher = any(k != "ce" and v > 0 for k, v in weights.items())
    if needs_teacher and teacher is None:
        raise ConfigError(f"method {name}: needs a teacher model, none was given")
    modules = spec.modules + (("cwd_proj",) if options.get("cwd_on") == "maps" else ())
    if not needs_teacher:
        modules = ()  # every distillation term is weighted 0: nothing to align, nothing to train besides the student
    if teacher is not None and needs_teacher:
        _check_pair(name, teacher, student, modules, weights)
    _check_options(name, options, student)
    return ResolvedMethod(name, weights, options, modules)


def build_method(name: str, teacher: SegFormer | None, student: SegFormer, **overrides) -> DistillMethod:
    """Build a method of the table for a teacher/student pair (resolve_method on their configs, then the train-only
    modules); the teacher is frozen."""
    r = resolve_method(name, teacher.config if teacher is not None else None, student.config, **overrides)
    if teacher is not None:
        teacher.eval().requires_grad_(False)  # frozen: no gradient, BatchNorm statistics fixed
    built = {m: MODULES[m](student.config, teacher.config, r.options) for m in r.modules}
    return DistillMethod(name, teacher, student, r.weights, r.options, built)


def _weight(method: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not value >= 0:
        raise ConfigError(f"method {method}: weight {key}={value!r}, expected a number >= 0")
    return float(value)


def _check_pair(name: str, t: SegFormerConfig, s: SegFormerConfig, modules: tuple[str, ...], weights) -> None:
    if len(t.dims) != len(s.dims):
        raise ConfigError(f"method {name}: teacher has {len(t.dims)} stages, student {len(s.dims)}")
    uses_logits = weights.get("kd", 0) > 0 or (weights.get("cwd", 0) > 0 and "cwd_proj" not in modules)
    if uses_logits and t.num_classes != s.num_classes:
        raise ConfigError(f"method {name}: teacher predicts {t.num_classes} classes, student {s.num_classes}")
    if modules:
        for i, (ct, cs) in enumerate(zip(t.dims, s.dims)):
            if ct < cs:
                raise ConfigError(
                    f"method {name}: teacher {t.variant} (widths {list(t.dims)}) is narrower than student "
                    f"{s.variant} (widths {list(s.dims)}) at stage {i + 1}; its modules project student "
                    "features up to the teacher's width, so choose a teacher at least as wide (teacher.variant) "
                    "or a narrower student (student.variant)"
                )


def _check_options(name: str, o: dict, s: SegFormerConfig) -> None:
    n = len(s.dims)
    if "pea_stage_weights" in o:
        sw = o["pea_stage_weights"]
        if not isinstance(sw, (list, tuple)) or len(sw) != n:
            raise ConfigError(f"method {name}: pea_stage_weights={sw!r}, expected a list of {n} numbers, one a stage")
        o["pea_stage_weights"] = tuple(_weight(name, "pea_stage_weights", v) for v in sw)
    for key in ("temperature", "tau"):
        if key in o and (isinstance(o[key], bool) or not isinstance(o[key], Real) or not o[key] > 0):
            raise ConfigError(f"method {name}: {key}={o[key]!r}, expected a number > 0")
    if "cwd_on" in o and o["cwd_on"] not in ("logits", "maps"):
        raise ConfigError(f"method {name}: cwd_on={o['cwd_on']!r}, expected 'logits' or 'maps'")
    if "csf_mid" in o and (not isinstance(o["csf_mid"], int) or o["csf_mid"] < 1):
        raise ConfigError(f"method {name}: csf_mid={o['csf_mid']!r}, expected a positive integer")
    if "gl_heads" in o and (not isinstance(o["gl_heads"], int) or o["gl_heads"] < 1 or s.dims[-1] % o["gl_heads"]):
        raise ConfigError(f"method {name}: gl_heads={o['gl_heads']!r} must divide the student's stage-4 width "
                          f"{s.dims[-1]}")
    if o.get("ce_resolution", "label") not in CE_RESOLUTIONS:
        raise ConfigError(f"method {name}: ce_resolution={o['ce_resolution']!r}, expected one of "
                          f"{', '.join(CE_RESOLUTIONS)}")
    cw = o.get("class_weights")
    if cw is not None and (not isinstance(cw, (list, tuple)) or len(cw) != s.num_classes):
        raise ConfigError(f"method {name}: class_weights has {len(cw) if isinstance(cw, (list, tuple)) else cw!r} "
                          f"entries, expected {s.num_classes} (one a class)")
