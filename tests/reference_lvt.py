"""A straightforward LVT encoder with the TransKD reference's layout (B x H x W x C maps, nn.Unfold / F.fold,
explicit softmax) and its state-dict names (backbone.{s}.0 patch embedding, backbone.{s}.1.{b} blocks).

Test-only: it checks pipeline.models.lvt, which must compute the same function with ONNX-friendly operations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DIMS, HEADS, MLP_RATIOS, SR_RATIOS, DEPTHS = (64, 64, 160, 256), (2, 2, 5, 8), (4, 8, 4, 4), (8, 4, 2, 1), (2,) * 4


class RefPatchEmbed(nn.Module):
    def __init__(self, c_in, c_out, k, s, channels_last_input):
        super().__init__()
        self.proj = nn.Conv2d(c_in, c_out, k, s, k // 2)
        self.norm = nn.LayerNorm(c_out)
        self.channels_last_input = channels_last_input

    def forward(self, x):
        if self.channels_last_input:  # stages 2-4 receive the previous stage's B x H x W x C map
            x = x.permute(0, 3, 1, 2)
        x = self.proj(x)
        tap = x.flatten(2).transpose(1, 2)
        return self.norm(x.permute(0, 2, 3, 1)), tap


class RefCSA(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.attn = nn.Linear(dim, 81 * heads)
        self.weight = nn.Conv2d(9 * dim, 9 * dim, 1, groups=9, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.unfold = nn.Unfold(3, padding=1, stride=2)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True)

    def forward(self, x):
        b, hh, ww, c = x.shape
        h2, w2 = math.ceil(hh / 2), math.ceil(ww / 2)
        n, d = h2 * w2, c // self.heads
        a = self.attn(self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        a = a.reshape(b, n, self.heads, 9, 9).permute(0, 2, 1, 3, 4)
        a = torch.softmax(a * d**-0.5, dim=-1)
        v = self.unfold(x.permute(0, 3, 1, 2)).reshape(b, c, 9, n)
        v = v.permute(0, 3, 2, 1).reshape(b * n, 9 * c, 1, 1)
        v = self.weight(v).reshape(b, n, 9, self.heads, d).permute(0, 3, 1, 2, 4)
        out = torch.matmul(a, v).permute(0, 1, 4, 3, 2).reshape(b, c * 9, n)
        out = F.fold(out, (hh, ww), 3, padding=1, stride=2)
        return self.proj(out.permute(0, 2, 3, 1))


class RefDilated(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, 1, 3, 3))

    def forward(self, x):
        return sum(F.silu(F.conv2d(x, self.weight, padding=r, dilation=r, groups=x.shape[1])) for r in (1, 3, 5))


class RefRASA(nn.Module):
    def __init__(self, dim, heads, sr):
        super().__init__()
        self.dim, self.heads, self.sr_ratio = dim, heads, sr
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim)
        self.ds = RefDilated(dim)

    def inner(self, x):
        b, hh, ww, c = x.shape
        d = c // self.heads
        q = self.q(x).reshape(b, hh * ww, self.heads, d).permute(0, 2, 1, 3)
        q = self.ds(q.permute(0, 1, 3, 2).reshape(b, c, hh, ww))
        q = q.reshape(b, self.heads, d, hh * ww).permute(0, 1, 3, 2)
        src = x
        if self.sr_ratio > 1:
            src = self.norm(self.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        kv = self.kv(src).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        a = torch.softmax(torch.matmul(q, kv[0].transpose(-2, -1)) * d**-0.5, dim=-1)
        return self.proj(torch.matmul(a, kv[1]).transpose(1, 2).reshape(b, hh, ww, c))

    def forward(self, x):
        first = x
        y = F.silu(self.inner(x))
        y = y + first
        return F.silu(self.inner(y))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden, conv):
        super().__init__()
        self.conv = conv
        if conv:
            self.fc1 = nn.Conv2d(dim, hidden, 1)
            self.depconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
            self.fc2 = nn.Conv2d(hidden, dim, 1)
        else:
            self.fc1 = nn.Linear(dim, hidden)
            self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        if not self.conv:
            return self.fc2(F.gelu(self.fc1(x)))
        y = self.fc2(F.gelu(self.depconv(self.fc1(x.permute(0, 3, 1, 2)))))
        return y.permute(0, 2, 3, 1)


class RefBlock(nn.Module):
    def __init__(self, s):
        super().__init__()
        dim = DIMS[s]
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RefCSA(dim, HEADS[s]) if s == 0 else RefRASA(dim, HEADS[s], SR_RATIOS[s])
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = RefMlp(dim, dim * MLP_RATIOS[s], conv=s > 0)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefLVT(nn.Module):
    """The encoder; forward gives (maps B x C x H x W, patch-embedding taps B x N x C)."""

    def __init__(self):
        super().__init__()
        stages = []
        for s in range(4):
            embed = RefPatchEmbed(3 if s == 0 else DIMS[s - 1], DIMS[s], 7 if s == 0 else 3, 4 if s == 0 else 2,
                                  channels_last_input=s > 0)
            stages.append(nn.Sequential(embed, nn.Sequential(*(RefBlock(s) for _ in range(DEPTHS[s])))))
        self.backbone = nn.ModuleList(stages)

    def forward(self, x):
        maps, taps = [], []
        for stage in self.backbone:
            x, tap = stage[0](x)
            x = stage[1](x)
            taps.append(tap)
            maps.append(x.permute(0, 3, 1, 2))
        return maps, taps


# ours (pipeline.models.lvt, without the "encoder." prefix) -> reference, in order of application
RENAMES = (
    (r"^stages\.(\d+)\.embed\.", r"backbone.\1.0."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"backbone.\1.1.\2."),
    (r"\.attn\.affinity\.", ".attn.attn."),
    (r"\.attn\.value\.weight$", ".attn.weight.weight"),
    (r"\.attn\.sr_norm\.", ".attn.norm."),
    (r"\.attn\.atrous\.weight$", ".attn.ds.weight"),
    (r"\.ffn\.dwconv\.", ".mlp.depconv."),
    (r"\.ffn\.", ".mlp."),
)
