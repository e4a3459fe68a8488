"""Segmentation scoring: one confusion-matrix core for models (`evaluate`) and artifacts (`score`); Cityscapes results.

mIoU follows the standard definition (cityscapesscripts, mmsegmentation): IoU_c = TP / (TP + FP + FN) counted
over pixels whose label is not ignored, averaged over the classes that occur in the labels or the predictions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline import amp
from pipeline.data.classes import CITYSCAPES_LABEL_IDS, IGNORE_INDEX
from pipeline.errors import ConfigError, InputError
from pipeline.io import atomic_path, progress_interval


class ConfusionMatrix:
    """counts[label, prediction] over non-ignored pixels, kept on the device the predictions are on."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.counts = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add a batch: `pred` and `label` integer tensors of one shape (class ids; label may hold ignore)."""
        if pred.shape != label.shape:
            raise InputError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
        c = self.num_classes
        if self.counts.device != pred.device:
            self.counts = self.counts.to(pred.device)
        label = label.to(pred.device, torch.int64)
        keep = label != self.ignore_index
        label, pred = label[keep], pred[keep].to(torch.int64)
        if label.numel() and int(label.max()) >= c:
            raise InputError(f"label id {int(label.max())} is outside 0..{c - 1} (and {self.ignore_index} = ignore)")
        self.counts += torch.bincount(label * c + pred, minlength=c * c).view(c, c)

    def reduce(self) -> ConfusionMatrix:
        """Sum the counts over every process of a distributed run (each scored its own shard); in place."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)
        return self

    def result(self, classes: Sequence[str] | None = None) -> EvalResult:
        m = self.counts.to("cpu", torch.float64)
        tp = m.diag()
        gt, predicted = m.sum(1), m.sum(0)
        union = gt + predicted - tp
        iou = [float(tp[i] / union[i]) if union[i] > 0 else math.nan for i in range(self.num_classes)]
        acc = [float(tp[i] / gt[i]) if gt[i] > 0 else math.nan for i in range(self.num_classes)]
        total = float(gt.sum())
        names = list(classes) if classes is not None else [str(i) for i in range(self.num_classes)]
        return EvalResult(
            miou=_nanmean(iou), iou=iou, pixel_acc=float(tp.sum()) / total if total else math.nan,
            mean_acc=_nanmean(acc), acc=acc, pixels=[int(v) for v in gt.tolist()], classes=names,
            confusion=self.counts.cpu().tolist(),
        )


def _nanmean(values: Iterable[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _json_float(v: float) -> float | None:
    return None if math.isnan(v) else v


@dataclass
class EvalResult:
    """Scores in [0, 1]; a class with no labelled and no predicted pixel has IoU NaN and stays out of the mean."""

    miou: float
    iou: list[float]
    pixel_acc: float
    mean_acc: float
    acc: list[float]
    pixels: list[int]
    classes: list[str]
    confusion: list[list[int]] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict:
        return {
            "miou": _json_float(self.miou), "pixel_acc": _json_float(self.pixel_acc),
            "mean_acc": _json_float(self.mean_acc),
            "per_class": {name: {"iou": _json_float(i), "acc": _json_float(a), "pixels": p}
                          for name, i, a, p in zip(self.classes, self.iou, self.acc, self.pixels)},
            "confusion": self.confusion,
        }

    def table(self, classes: Sequence[str] | None = None) -> str:
        names = list(classes) if classes is not None else self.classes
        width = max(12, *(len(n) for n in names))
        pct = lambda v: "    -" if math.isnan(v) else f"{100 * v:5.2f}"  # noqa: E731
        rows = [f"{'class':<{width}}  {'IoU %':>6}  {'acc %':>6}  {'pixels':>12}"]
        rows += [f"{n:<{width}}  {pct(i):>6}  {pct(a):>6}  {p:>12,}"
                 for n, i, a, p in zip(names, self.iou, self.acc, self.pixels)]
        rows.append("-" * len(rows[0]))
        rows.append(f"{'mIoU':<{width}}  {pct(self.miou):>6}")
        rows.append(f"{'pixel acc':<{width}}  {pct(self.pixel_acc):>6}")
        rows.append(f"{'mean acc':<{width}}  {pct(self.mean_acc):>6}")
        return "\n".join(rows)


def predict(model: nn.Module, image: torch.Tensor, size: tuple[int, int] | None = None,
            amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Class ids (N x H x W, int64): logits upsampled bilinearly (align_corners=False) to `size`, then argmax;
    `size=None` keeps the logits' own resolution (1/4 of the input). `amp_dtype`: the network under autocast in that
    dtype (pipeline.amp's choice), the upsampling and argmax in float32."""
    with amp.autocast(amp_dtype, image.device):
        logits = model(image)
    logits = logits.float()
    if size is not None and tuple(logits.shape[2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits.argmax(1)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def tally(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
          classes: Sequence[str] | None = None, reduce: bool = False) -> EvalResult:
    """The one scoring core: a confusion matrix over (class ids, label) pairs of one shape each, summed over the
    processes of a distributed run with `reduce` (every process must then call it), and its result."""
    cm = ConfusionMatrix(num_classes)
    for ids, label in pairs:
        cm.update(ids, label)
    return (cm.reduce() if reduce else cm).result(classes)


def evaluate(model: nn.Module, loader: Iterable[dict], device: torch.device | str = "cpu",
             num_classes: int | None = None, classes: Sequence[str] | None = None, quarter_res: bool = False,
             amp_dtype: torch.dtype | None = None, progress: bool = True) -> EvalResult:
    """Score `model` on batches of {"image": N x 3 x h x w, "label": N x H x W}.

    By default the logits are upsampled to the label's full resolution. `quarter_res=True` is the TransKD
    reference's shortcut: labels are downsampled (nearest) to the logits' 1/4 resolution instead; it exists for
    comparison with published numbers only. In a distributed run each process passes its own shard and the
    counts are summed over all of them.
    """
    device = torch.device(device)

    def pairs():
        for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False,
                          mininterval=progress_interval()):
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            if quarter_res:
                ids = predict(model, image, None, amp_dtype)
                label = F.interpolate(label[:, None].float(), size=tuple(ids.shape[1:]), mode="nearest")[:, 0].long()
            else:
                ids = predict(model, image, tuple(label.shape[1:]), amp_dtype)
            yield ids, label

    with _eval_mode(model):
        return tally(pairs(), num_classes or model.config.num_classes, classes, reduce=True)


def spread(n: int, count: int) -> list[int]:
    """`count` indices spread evenly over a split of `n` frames (all of them for count <= 0 or >= n)."""
    if count <= 0 or count >= n:
        return list(range(n))
    return [int(i) for i in np.linspace(0, n - 1, count).round()]


def score(seg, dataset, frames: int = 0, progress: bool = True) -> EvalResult:
    """mIoU of a Segmenter (any artifact: checkpoint, ONNX, engine) on `frames` spread over `dataset` (0: all), at
    full label resolution. The dataset's transform is not used: raw frames go in as a camera gives them (BGR
    uint8), Segmenter resizes them to the network and returns class ids at the frame's resolution, the path the
    ROS node takes; so a PyTorch checkpoint scores what `evaluate` gives."""
    n_classes = len(seg.classes)
    if n_classes != dataset.num_classes:
        raise InputError(f"{seg.path}: predicts {n_classes} classes, {dataset.name} has {dataset.num_classes}")
    if len(dataset) == 0:
        raise InputError(f"{dataset.root}: the {dataset.split} split is empty")

    def pairs():
        for i in tqdm(spread(len(dataset), frames), desc=seg.path.name, disable=not progress, leave=False,
                      mininterval=progress_interval()):
            rgb, label = dataset.read(i)
            ids = seg.predict(np.ascontiguousarray(rgb[:, :, ::-1]))
            yield torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(label.astype(np.int64))

    return tally(pairs(), n_classes, dataset.classes)


def write_cityscapes(model: nn.Module, loader: Iterable[dict], out_dir: str | Path, device: torch.device | str = "cpu",
                     amp_dtype: torch.dtype | None = None, progress: bool = True) -> list[Path]:
    """Predictions as the Cityscapes benchmark takes them: one `{city}_{seq}_{frame}_leftImg8bit.png` per
    sample, single-channel Cityscapes labelIds at the label's resolution, in `out_dir` (flat). The official
    `cityscapesscripts` pixel-level evaluator reads the folder as it is. Each file is written atomically."""
    num_classes = model.config.num_classes
    if num_classes != len(CITYSCAPES_LABEL_IDS):
        raise ConfigError(f"--write-cityscapes: the model predicts {num_classes} classes; the Cityscapes format "
                          f"needs the {len(CITYSCAPES_LABEL_IDS)} Cityscapes train ids")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out_dir}: cannot create the output folder ({e.strerror or e})") from None
    to_label_id = torch.tensor(CITYSCAPES_LABEL_IDS, dtype=torch.uint8)
    device = torch.device(device)
    written = []
    with _eval_mode(model):
        for batch in tqdm(loader, desc="cityscapes results", unit="batch", disable=not progress,
                          leave=False, mininterval=progress_interval()):
            image = batch["image"].to(device)
            ids = predict(model, image, tuple(batch["label"].shape[1:]), amp_dtype).cpu()
            for name, pred in zip(batch["name"], to_label_id[ids].numpy()):
                path = out_dir / f"{name}_leftImg8bit.png"
                ok, data = cv2.imencode(".png", np.ascontiguousarray(pred))
                if not ok:
                    raise InputError(f"{path}: PNG encoding failed")
                with atomic_path(path) as tmp:
                    tmp.write_bytes(data.tobytes())
                written.append(path)
    return written
