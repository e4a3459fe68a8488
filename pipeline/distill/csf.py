"""Cross Selective Fusion (CSF) of the student's stage maps and the hierarchical context loss (HCL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelectiveFusion(nn.Module):
    """One CSF unit: reduce a student map to `mid` channels, fuse it with the deeper unit's residual through
    two softmax-normalised channel attentions, and project the result to the teacher's width.

    docs/method.md section 2. The attention squeezes GAP(x + r) to L = max(mid / 16, 32) channels with
    conv + BN + ReLU; with one sample BatchNorm cannot normalise a 1 x 1 map, so the reference switches to a
    separate BN-free conv for batch 1. We keep that behaviour and its parameters (they are in the anchors).
    """

    def __init__(self, c_student: int, c_teacher: int, mid: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(c_student, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.project = nn.Sequential(nn.Conv2d(mid, c_teacher, 3, padding=1, bias=False), nn.BatchNorm2d(c_teacher))
        self.fuse = fuse
        if fuse:
            squeeze = max(mid // 16, 32)
            self.squeeze = nn.Sequential(nn.Conv2d(mid, squeeze, 1, bias=False), nn.BatchNorm2d(squeeze), nn.ReLU())
            self.squeeze_single = nn.Sequential(nn.Conv2d(mid, squeeze, 1, bias=False), nn.ReLU())
            self.attend = nn.ModuleList(nn.Conv2d(squeeze, mid, 1) for _ in range(2))
        # The reference's initialisation of the two convolutions on the data path: kaiming_uniform with a = 1, i.e.
        # U(-b, b) with b = sqrt(3 / fan_in), std 1 / sqrt(fan_in); PyTorch's default (a = sqrt(5)) has std
        # 1 / sqrt(3 fan_in), 0.58x that. The larger start speeds these train-only modules up early on.
        for conv in (self.reduce[0], self.project[0]):
            nn.init.kaiming_uniform_(conv.weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output at the teacher's width, residual for the next shallower unit)."""
        x = self.reduce(x)
        if self.fuse and residual is not None:
            r = F.interpolate(residual, size=x.shape[2:], mode="nearest")
            z = F.adaptive_avg_pool2d(x + r, 1)
            z = self.squeeze_single(z) if x.shape[0] == 1 else self.squeeze(z)
            a = torch.softmax(torch.stack([conv(z) for conv in self.attend]), dim=0)
            x = a[0] * x + a[1] * r
        return self.project(x), x


class CrossSelectiveFusion(nn.Module):
    """CSF over all stages, deepest first: each unit fuses its stage with what the deeper units passed on."""

    def __init__(self, student_dims: tuple[int, ...], teacher_dims: tuple[int, ...], mid: int = 64) -> None:
        super().__init__()
        last = len(student_dims) - 1
        self.units = nn.ModuleList(
            SelectiveFusion(cs, ct, mid, fuse=i != last) for i, (cs, ct) in enumerate(zip(student_dims, teacher_dims))
        )

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Student stage maps (shallowest first) -> fused maps at the teacher's widths, same order."""
        outs: list[torch.Tensor] = [torch.empty(0)] * len(maps)
        residual = None
        for i in reversed(range(len(maps))):
            outs[i], residual = self.units[i](maps[i], residual)
        return outs


def hcl_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], levels: tuple[int, ...] = (4, 2, 1)):
    """Hierarchical context loss: per stage, MSE of the maps plus MSE of their l x l average-pooled contexts
    (l in `levels` smaller than the map height) weighted 1/2, 1/4, 1/8, normalised by the weights used;
    summed over stages; in float32 (pipeline/distill/losses.py)."""
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()
        loss, weight, weights = F.mse_loss(s, t), 1.0, 1.0
        for level in levels:
            if level >= s.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
            weights += weight
        total = total + loss / weights
    return total
