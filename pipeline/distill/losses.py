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


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel cross-entropy at label resolution (logits upsampled bilinearly), 255 = ignore."""
    return F.cross_entropy(resize_to(logits.float(), labels.shape[1:]), labels.long(), weight=class_weights,
                           ignore_index=IGNORE_INDEX)


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
