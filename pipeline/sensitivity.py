"""Sensitivity of each quantization group of a fake-quantized student, and the mixed precision meeting an mIoU budget.

Two measurements of a setting of the model (which groups of quant.groups run in float, the rest in INT8), both on
validation frames spread as export spreads them (evaluate.spread):
- mIoU exactly as export scores an artifact: evaluate.score through a Segmenter over the PyTorch model at the export
  size, raw BGR frames in, class ids at full label resolution out;
- logit SQNR in dB, 10 log10(sum ref^2 / sum (ref - q)^2) over the 1/4-resolution logits of the FP32 student (ref)
  and of the fake-quantized model (q), on export.graph_inputs frames (the parity and calibration preprocessing:
  float NCHW at the export size). It costs one forward pass per frame, no scoring, and it moves with every rounding
  error where mIoU moves only when a pixel flips: the cheap signal that orders the groups.
Every measurement runs on the CPU, in eval mode. mIoU values are fractions (0..1, as EvalResult); drops, gains and
budgets are in mIoU points (1.0 = one point)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline import quant
from pipeline.errors import ExportError
from pipeline.evaluate import score, spread
from pipeline.infer import Segmenter, TorchBackend
from pipeline.io import atomic_path
from pipeline.models.checkpoints import checkpoint_metadata

SQNR_FRAMES = 8  # validation frames of the SQNR ranking: export's parity_frames default
_TINY = 1e-30  # a noise power of exactly zero (identical logits) reads as a very large, finite SQNR


@dataclass
class Sensitivity:
    """One group's record. (a) only this group INT8, all others float: the noise it adds on its own; (b) only this
    group float, all others INT8: what keeping it float buys the all-INT8 model. mIoU fields are None when only the
    SQNR was measured."""

    group: str
    only_int8_sqnr_db: float  # (a)
    only_float_sqnr_db: float  # (b)
    only_float_sqnr_gain_db: float  # (b) minus the all-INT8 SQNR
    only_int8_drop: float | None = None  # (a) FP32 mIoU minus this setting's, points
    only_float_gain: float | None = None  # (b) this setting's mIoU minus all-INT8's, points


@dataclass
class Choice:
    """The mixed precision `choose` found: the first `len(float_groups)` groups of `order` float, the rest INT8.
    `trajectory` is every setting it measured, in the order measured: (k first groups of `order` float, mIoU)."""

    max_drop: float
    float_groups: list[str]
    fp32_miou: float
    miou: float
    order: list[str]
    trajectory: list[tuple[int, float]]
    frames: int
    seconds: float

    @property
    def drop(self) -> float:
        """mIoU points below FP32."""
        return 100 * (self.fp32_miou - self.miou)

    def record(self) -> dict:
        """The record for a sidecar: what was asked, what was chosen, what was measured on the way."""
        return {**asdict(self), "drop": self.drop, "trajectory": [{"float": k, "miou": m} for k, m in self.trajectory]}


@dataclass
class Curve:
    """mIoU against the number of INT8 groups: miou[k] with the first k groups of `order` (least sensitive first)
    INT8 and the rest float; miou[0] is all float, miou[-1] all INT8."""

    order: list[str]
    miou: list[float]
    fp32_miou: float
    frames: int
    sqnr_db: list[float] = field(default_factory=list)  # the logit SQNR of each point


class _Probe:
    """Measures settings of `qmodel` against `float_model`: the FP32 logits of the SQNR frames are computed once."""

    def __init__(self, qmodel: nn.Module, float_model: nn.Module, val_set, frames: int, sqnr_frames: int,
                 size: tuple[int, int] | None) -> None:
        if not quant.is_quantized(qmodel):
            raise ExportError("sensitivity: the model is not fake-quantized (quant.quantize and quant.calibrate it "
                              "first)")
        if sqnr_frames < 1 or frames < 0:
            raise ExportError(f"sensitivity: sqnr_frames {sqnr_frames} must be >= 1 and frames {frames} >= 0 "
                              "(0: the whole split)")
        self.qmodel, self.float_model, self.val_set, self.frames = qmodel, float_model, val_set, frames
        self.size = tuple(size or float_model.meta.input_size)
        self.inputs = [torch.from_numpy(x) for x in _graph_inputs(val_set, sqnr_frames, self.size, float_model)]
        qmodel.cpu().eval()
        with torch.inference_mode():
            self.reference = [float_model.cpu().eval()(x).double() for x in self.inputs]
        self.signal = float(sum(r.square().sum() for r in self.reference))
        self._fp32: float | None = None

    def sqnr(self, float_groups: Sequence[str]) -> float:
        quant.set_float(self.qmodel, float_groups)
        noise = 0.0
        with torch.inference_mode():
            for x, ref in zip(self.inputs, self.reference):
                noise += float((self.qmodel(x).double() - ref).square().sum())
        return 10 * math.log10(max(self.signal, _TINY) / max(noise, _TINY))

    def miou(self, float_groups: Sequence[str]) -> float:
        quant.set_float(self.qmodel, float_groups)
        return _score(self.qmodel, self.val_set, self.frames, self.size, "student.int8")

    def fp32_miou(self) -> float:
        if self._fp32 is None:
            self._fp32 = _score(self.float_model, self.val_set, self.frames, self.size, "student")
        return self._fp32

    @property
    def frame_count(self) -> int:
        return len(spread(len(self.val_set), self.frames))


def _graph_inputs(val_set, count: int, size: tuple[int, int], model: nn.Module) -> list:
    # imported here: export.py calls `choose`, and a module-level import each way would be a cycle
    from pipeline.config import ExportConfig
    from pipeline.export import graph_inputs

    return graph_inputs(val_set, count, ExportConfig(size=size), checkpoint_metadata(model).normalization)


def _score(model: nn.Module, val_set, frames: int, size: tuple[int, int], name: str) -> float:
    seg = Segmenter(TorchBackend(model, "cpu"), checkpoint_metadata(model, name), Path(name), size=size)
    return score(seg, val_set, frames, progress=False).miou


# ------------------------------------------------------------------------------------------------ ranking
def rank(qmodel: nn.Module, float_model: nn.Module, val_set, *, frames: int = 0, sqnr_frames: int = SQNR_FRAMES,
         size: tuple[int, int] | None = None, miou: bool = True) -> list[Sensitivity]:
    """Every group of `qmodel` measured (a) alone in INT8 and (b) alone in float, most sensitive first; `frames`
    validation frames scored for mIoU (0: all; `miou=False` measures the SQNR only: 2 forward passes per group and
    SQNR frame, no scoring), `size` the network size (default: the student's training size). The model's float
    groups are restored afterwards.

    The order is by (a)'s SQNR, lowest first: the noise a group adds by itself, independent of the other groups'.
    (b)'s gain would order the same groups the same way while the groups' noises add up, but one dominant group
    leaves every other gain near 0 dB, where their order is chance; (a) keeps its resolution. Ties go to the
    larger (b) gain. mIoU is recorded, not ranked on: on tens of frames most groups move it by nothing."""
    probe = _Probe(qmodel, float_model, val_set, frames, sqnr_frames, size)
    before = quant.float_groups(qmodel)
    try:
        return _rank(probe, quant.groups(qmodel), miou)
    finally:
        quant.set_float(qmodel, before)


def _rank(probe: _Probe, names: list[str], miou: bool) -> list[Sensitivity]:
    int8_sqnr = probe.sqnr([])
    fp32, int8 = (probe.fp32_miou(), probe.miou([])) if miou else (math.nan, math.nan)
    records = []
    for g in names:
        others = [n for n in names if n != g]
        alone_float = probe.sqnr([g])
        r = Sensitivity(g, probe.sqnr(others), alone_float, alone_float - int8_sqnr)
        if miou:
            r.only_int8_drop = 100 * (fp32 - probe.miou(others))
            r.only_float_gain = 100 * (probe.miou([g]) - int8)
        records.append(r)
    return sorted(records, key=lambda r: (r.only_int8_sqnr_db, -r.only_float_sqnr_gain_db))


def _order(qmodel: nn.Module, ranking: Sequence[Sensitivity]) -> list[str]:
    """The groups of `ranking`, checked against the model's (a ranking of another model is refused)."""
    names, known = [r.group for r in ranking], quant.groups(qmodel)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ExportError(f"sensitivity ranking: groups {unknown} are not in the model (a ranking of another "
                          f"model?); its groups are {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ExportError(f"sensitivity ranking: a group appears twice in {names}")
    return names


# ------------------------------------------------------------------------------------------------ mixed precision
def choose(qmodel: nn.Module, float_model: nn.Module, val_set, max_drop: float,
           ranking: Sequence[Sensitivity] | None = None, *, frames: int = 0, sqnr_frames: int = SQNR_FRAMES,
           size: tuple[int, int] | None = None) -> Choice:
    """Mixed precision within `max_drop` mIoU points of the FP32 student: all groups INT8, then the most sensitive
    groups float, a prefix of `ranking` (default: the groups by rank's SQNR key, measured here), until the measured
    drop is within the budget or every group is float. Leaves `qmodel` set to the choice (`record()`: its record).

    Greedy along the ranking, with its stopping point found by doubling the prefix (0, 1, 2, 4 ... groups float)
    then bisecting: at most 10 mIoU scorings beside FP32's for MiT-B0's 23 groups instead of up to 24, and the
    same prefix as one group at a time while the drop shrinks as groups turn float. Whatever the curve's shape, the
    chosen setting is one measured within the budget, or all float. A negative budget is refused:
    export.int8_max_drop < 0 means no search at all, the caller's branch."""
    if not max_drop >= 0:  # NaN too
        raise ExportError(f"mixed precision: max_drop {max_drop}: expected mIoU points >= 0 (a negative "
                          "export.int8_max_drop turns the search off: every group INT8, choose not called)")
    start = time.perf_counter()
    given = None if ranking is None else _order(qmodel, ranking)  # refused before anything is measured
    probe = _Probe(qmodel, float_model, val_set, frames, sqnr_frames, size)
    before, chosen = quant.float_groups(qmodel), None
    try:
        order = given if given is not None else _ranked(probe, qmodel)
        fp32 = probe.fp32_miou()
        measured: dict[int, float] = {}

        def within(k: int) -> bool:
            if k not in measured:
                measured[k] = probe.miou(order[:k])
            return 100 * (fp32 - measured[k]) <= max_drop

        k = _first_within(within, len(order))
        chosen = order[:k]
    finally:  # the choice, or what the model had when the search failed
        quant.set_float(qmodel, before if chosen is None else chosen)
    return Choice(max_drop, chosen, fp32, measured[k], order, list(measured.items()), probe.frame_count,
                  time.perf_counter() - start)


def _ranked(probe: _Probe, qmodel: nn.Module) -> list[str]:
    """The groups by rank's primary key alone, (a)'s SQNR lowest first: half the forward passes of rank(miou=False)
    (the caller restores the float groups)."""
    names = quant.groups(qmodel)
    alone = {g: probe.sqnr([n for n in names if n != g]) for g in names}
    return sorted(names, key=alone.__getitem__)


def _first_within(within: Callable[[int], bool], n: int) -> int:
    """The smallest k in 0..n with within(k), for a `within` that stays true once true: k = 0, then 1, 2, 4 ... until
    one passes (n when none does), then bisection between the last that failed and it."""
    if within(0) or n == 0:
        return 0
    lo, hi = 0, 1  # within(lo) is false
    while not within(hi):
        if hi == n:
            return n
        lo, hi = hi, min(2 * hi, n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if within(mid) else (mid, hi)
    return hi


# ------------------------------------------------------------------------------------------------ curve, plot, table
def curve(qmodel: nn.Module, float_model: nn.Module, val_set, ranking: Sequence[Sensitivity] | None = None, *,
          frames: int = 0, sqnr_frames: int = SQNR_FRAMES, size: tuple[int, int] | None = None) -> Curve:
    """mIoU (and SQNR) with 0, 1, ... all groups INT8, turned INT8 least sensitive first (the reverse of `ranking`,
    default: by rank's SQNR key, measured here): the settings `choose` picks from, one per budget. The float groups
    are restored after."""
    given = None if ranking is None else _order(qmodel, ranking)
    probe = _Probe(qmodel, float_model, val_set, frames, sqnr_frames, size)
    before = quant.float_groups(qmodel)
    try:
        order = (given if given is not None else _ranked(probe, qmodel))[::-1]
        settings = [order[k:] for k in range(len(order) + 1)]  # float groups with the first k INT8
        return Curve(order, [probe.miou(s) for s in settings], probe.fp32_miou(), probe.frame_count,
                     [probe.sqnr(s) for s in settings])
    finally:
        quant.set_float(qmodel, before)


def plot(c: Curve, path: str | Path) -> None:
    """mIoU against the number of INT8 groups, with the FP32 student's as a line; a PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.plot(range(len(c.miou)), [100 * m for m in c.miou], marker="o", ms=3, label="fake-quant INT8 + float")
    ax.axhline(100 * c.fp32_miou, color="grey", ls="--", lw=1, label="FP32 student")
    ax.set_xlabel("groups in INT8 (turned INT8 least sensitive first)")
    ax.set_ylabel(f"mIoU % ({c.frames} validation frames)")
    ax.set_title("What each INT8 group costs")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def table(records: Sequence[Sensitivity]) -> str:
    """The ranking as a markdown table, most sensitive first ("-": not measured)."""
    pts = lambda v: "-" if v is None else f"{round(v, 2) + 0.0:+.2f}"  # noqa: E731 (+ 0.0: no "-0.00")
    rows = ["| # | group | only INT8: SQNR dB | only INT8: mIoU drop | only float: SQNR dB | only float: SQNR gain dB "
            "| only float: mIoU gain |", "|---:|---|---:|---:|---:|---:|---:|"]
    rows += [f"| {i} | {r.group} | {r.only_int8_sqnr_db:.1f} | {pts(r.only_int8_drop)} | {r.only_float_sqnr_db:.1f} "
             f"| {r.only_float_sqnr_gain_db:+.2f} | {pts(r.only_float_gain)} |" for i, r in enumerate(records, 1)]
    return "\n".join(rows)


__all__ = ["SQNR_FRAMES", "Choice", "Curve", "Sensitivity", "choose", "curve", "plot", "rank", "table"]
