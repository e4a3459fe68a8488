"""Loss functions of the methods: cross-entropy, logit KD, channel-wise distillation (CWD), feature MSE.

Every loss computes in float32 whatever the autocast dtype of its inputs: the taps of a bf16 or fp16 step are cast
up first, so resampling, softmax and the reductions keep the reference's float32 maths (CPU autocast would run
interpolate and log_softmax in bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255


def resize_to(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of a B x C x H x W map to `size` (a no-op when it already has it)."""
    size = tuple(size)
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


CE_RESOLUTIONS = ("label", "quarter")


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None,
            resolution: str = "label") -> torch.Tensor:
    """Pixel cross-entropy, 255 = ignore, at one of two resolutions:

    - "label" (the default): the logits are upsampled bilinearly to the labels' size, so every labelled pixel is
      scored, at the resolution the evaluator scores at.
    - "quarter" (the TransKD reference's choice): the labels are downsampled to the logits' size (1/4 of the input)
      by nearest neighbour, sampling each output pixel's centre as PIL's NEAREST resize does ("nearest-exact"):
      no label is blended with another, so ignore pixels stay 255 and stay ignored. Cheaper; the loss sees only
      one label in 16.
    """
    logits = logits.float()
    if resolution == "quarter":
        if tuple(labels.shape[1:]) != tuple(logits.shape[2:]):
            labels = F.interpolate(labels[:, None].float(), size=tuple(logits.shape[2:]), mode="nearest-exact")[:, 0]
    elif resolution == "label":
        logits = resize_to(logits, labels.shape[1:])
    else:
        raise ValueError(f"ce_loss: resolution={resolution!r}, expected one of {', '.join(CE_RESOLUTIONS)}")
    return F.cross_entropy(logits, labels.long(), weight=class_weights, ignore_index=IGNORE_INDEX)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's logit distillation per pixel: KL(p_t || p_s) of the class softmax at temperature T, times T^2."""
    s = F.log_softmax(resize_to(student.float(), teacher.shape[2:]) / temperature, dim=1)
    t = F.log_softmax(teacher.float() / temperature, dim=1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(1).mean() * temperature**2


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """Channel-wise distillation (Shu et al., 2021): each channel as a distribution over spatial positions,
    KL(teacher || student) at temperature tau, scaled by tau^2 / (N * C)."""
    n, c = teacher.shape[:2]
    s = F.log_softmax(resize_to(student.float(), teacher.shape[2:]).reshape(n * c, -1) / tau, dim=1)
    t = F.log_softmax(teacher.float().reshape(n * c, -1) / tau, dim=1)
    return F.kl_div(s, t, log_target=True, reduction="sum") * tau**2 / (n * c)
