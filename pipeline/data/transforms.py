"""Joint image/label transforms in OpenCV and the one network-input preprocessing every path shares."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

from pipeline.data.classes import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import InputError

if TYPE_CHECKING:  # torch only where tensors are made: Segmenter's preprocessing (network_input) runs without it
    import torch


def network_input(image: np.ndarray, size: tuple[int, int] | None, mean: Sequence[float], std: Sequence[float],
                  input_kind: str = "float", *, bgr: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """One uint8 H x W x 3 frame (RGB, or BGR with `bgr`) as a network takes it: resized to `size` (H, W) with
    INTER_LINEAR where it is not already (None: kept), then either H x W x 3 uint8 BGR ("uint8": the graph
    normalises inside) or 3 x H x W float32 RGB `(x - mean) * (1 / std)` on the 0..255 scale ("float"). Written
    into `out` when given (a slot of a reused batch buffer). The one preprocessing of training, evaluation,
    export parity and calibration, and the Segmenter."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"network input: expected an H x W x 3 image, got shape {tuple(image.shape)}")
    h, w = size if size is not None else image.shape[:2]
    if image.shape[:2] != (h, w):
        if input_kind == "uint8" and bgr and out is not None:  # the camera path: resized straight into the batch
            return cv2.resize(image, (w, h), dst=out, interpolation=cv2.INTER_LINEAR)
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    if input_kind == "uint8":
        if out is None:
            return np.ascontiguousarray(image if bgr else image[:, :, ::-1])
        out[...] = image if bgr else image[:, :, ::-1]
        return out
    mean32 = np.asarray(mean, np.float32)
    scale = 1.0 / np.asarray(std, np.float32)  # a multiply by the float32 reciprocal, as training has always done
    if out is None:
        out = np.empty((3, h, w), np.float32)
    for c in range(3):  # channel by channel straight into the CHW destination: no H x W x 3 float temporary
        np.subtract(image[:, :, 2 - c if bgr else c], mean32[c], out=out[c], dtype=np.float32)
        np.multiply(out[c], scale[c], out=out[c])
    return out


def label_tensor(label: np.ndarray) -> torch.Tensor:
    """uint8 H x W train ids -> int64 tensor (what cross-entropy and the confusion matrix index with)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


def height_size(shape: tuple[int, ...], height: int) -> tuple[int, int]:
    """(H, W) of an image of `shape` scaled so its height is `height`, aspect kept (width rounded)."""
    h, w = shape[:2]
    return (h, w) if h == height else (height, max(1, round(w * height / h)))


def _check_pair(rgb: np.ndarray, label: np.ndarray) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InputError(f"expected a uint8 H x W x 3 RGB image, got {rgb.dtype} {tuple(rgb.shape)}")
    if label.shape != rgb.shape[:2]:
        raise InputError(f"label {tuple(label.shape)} does not match image {tuple(rgb.shape[:2])}")


class TrainTransform:
    """Random rescale (relative to the crop height), crop with ignore padding, flip and photometric jitter.

    Every random draw comes from the `rng` passed to `__call__`, in a fixed order and number whatever the
    flags, so a sample's augmentation is a pure function of its seed: exact resume and the same batches for
    any number of DataLoader workers depend on this.
    """

    def __init__(self, size: tuple[int, int] = (512, 1024), scale: tuple[float, float] = (0.5, 2.0),
                 flip: bool = True, jitter: bool = True, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        self.flip, self.jitter = flip, jitter
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, rgb: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(rgb, label)
        H, W = self.size
        factor, crop_y, crop_x, flip, *jitter = rng.random(12)

        h, w = rgb.shape[:2]
        s = H / h * (self.scale[0] + factor * (self.scale[1] - self.scale[0]))
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST)

        if nh < H or nw < W:
            pad = dict(top=0, bottom=max(0, H - nh), left=0, right=max(0, W - nw), borderType=cv2.BORDER_CONSTANT)
            rgb = cv2.copyMakeBorder(rgb, **pad, value=(0, 0, 0))
            label = cv2.copyMakeBorder(label, **pad, value=IGNORE_INDEX)
        y0 = int(crop_y * (rgb.shape[0] - H + 1))
        x0 = int(crop_x * (rgb.shape[1] - W + 1))
        rgb, label = rgb[y0:y0 + H, x0:x0 + W], label[y0:y0 + H, x0:x0 + W]

        if self.flip and flip < 0.5:
            rgb, label = cv2.flip(rgb, 1), cv2.flip(label, 1)
        if self.jitter:
            rgb = photometric(rgb, np.asarray(jitter))
        import torch

        return torch.from_numpy(network_input(rgb, None, self.mean, self.std)), label_tensor(label)

    def __repr__(self) -> str:
        return f"TrainTransform(size={self.size}, scale={self.scale}, flip={self.flip}, jitter={self.jitter})"


def photometric(rgb: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Brightness, contrast, saturation and hue changes, each applied half the time, from 8 uniforms in [0, 1).

    Pairs (on/off, amount): brightness +-32, contrast x0.5..1.5, saturation x0.5..1.5, hue +-18 OpenCV hue
    units (+-36 degrees): the ranges of mmsegmentation's PhotoMetricDistortion, which SegFormer and TransKD
    train with.
    """
    bright_on, bright, contrast_on, contrast, sat_on, sat, hue_on, hue = u
    x = rgb.astype(np.float32)
    if bright_on < 0.5:
        x += (bright - 0.5) * 64.0
    if contrast_on < 0.5:
        x *= 0.5 + contrast
    if sat_on < 0.5 or hue_on < 0.5:
        hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
        if sat_on < 0.5:
            hsv[..., 1] *= 0.5 + sat
        if hue_on < 0.5:
            hsv[..., 0] = (hsv[..., 0] + (hue - 0.5) * 36.0) % 180  # OpenCV's uint8 hue wraps at 180
        x = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    return np.clip(x, 0, 255).astype(np.uint8)


class EvalTransform:
    """Deterministic: the image scaled to height H (aspect kept), the label returned at full resolution.

    Evaluation scores the logits upsampled to the label's size, as the Cityscapes benchmark does; `size=None`
    keeps the image as it is (the dataset default). The arithmetic is `network_input`'s, shared with the deployed path.
    """

    def __init__(self, size: tuple[int, int] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, rgb: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(rgb, label)
        size = height_size(rgb.shape, self.size[0]) if self.size is not None else None
        import torch

        return torch.from_numpy(network_input(rgb, size, self.mean, self.std)), label_tensor(label)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size})"
