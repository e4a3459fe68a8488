"""Semantic FPN (Kirillov et al., 2019) as PVTv2 uses it for segmentation: an FPN neck and a multi-scale head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.registry import SegFormerConfig


class SemanticFPN(nn.Module):
    """FPN neck to D = decoder_dim channels (lateral 1x1 convs, top-down nearest upsampling, 3x3 smoothing convs),
    then per level a stack of 3x3 conv + ReLU to fpn_channels with a 2x bilinear upsampling after each conv of the
    deeper levels (1, 1, 2, 3 convs for strides 4, 8, 16, 32), summed at stride 4 and classified.

    As the TransKD reference builds it (train/models/pvtv2: neck and FPNHead with norm_cfg=None): every conv has a
    bias and no normalisation, the neck has no activation, and the parameters keep PyTorch's default
    initialisation (the reference constructs these modules directly, so no mmcv init runs). With 19 classes:
    PVTv2-B0 + FPN 7,527,539 parameters, PVTv2-B2 + FPN 29,098,707.
    """

    def __init__(self, cfg: SegFormerConfig) -> None:
        super().__init__()
        d, c = cfg.decoder_dim, cfg.fpn_channels
        self.lateral = nn.ModuleList(nn.Conv2d(ci, d, 1) for ci in cfg.dims)
        self.smooth = nn.ModuleList(nn.Conv2d(d, d, 3, padding=1) for _ in cfg.dims)
        # the reference's scale head of level i has max(1, log2(stride_i / stride_1)) convs; strides double per level
        self.scale = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(d if k == 0 else c, c, 3, padding=1) for k in range(max(1, i)))
            for i in range(len(cfg.dims))
        )
        # modules, not functions, so module-hook FLOP counters see them as mmcv's does in the reference
        self.act = nn.ReLU()
        self.up = nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(c, cfg.num_classes, 1)

    def reset_parameters(self) -> None:
        """PyTorch's defaults, as the reference (its modules are built outside mmseg's init)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(m) for conv, m in zip(self.lateral, maps)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level adds the one above, nearest-upsampled
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        out = None
        for i, (smooth, convs) in enumerate(zip(self.smooth, self.scale)):
            x = smooth(laterals[i])
            for conv in convs:
                x = self.act(conv(x))
                if i > 0:  # the reference doubles after every conv of a deeper level, then resizes to stride 4
                    x = self.up(x)
            if out is None:
                out = x
            else:
                out = out + F.interpolate(x, size=out.shape[2:], mode="bilinear", align_corners=False)
        return self.classifier(self.dropout(out)).contiguous()
