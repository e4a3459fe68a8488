"""Independent SegFormer implementations whose module trees name tensors the way NVlabs, mmseg and the TransKD
reference code do.

They exist only to test checkpoint import: a state dict taken from them has exactly the keys of a real NVlabs
(mmseg 0.x based), mmsegmentation (>= 0.20, 1.x) or TransKD reference checkpoint, because the names come from the
same module nesting. They share no code with pipeline.models and compute attention differently (explicit softmax here,
nn.MultiheadAttention for mmseg), so a wrong key mapping or a swapped tensor shows up in the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


# ------------------------------------------------------------------------------------------------ NVlabs layout


class NvPatchEmbed(nn.Module):
    def __init__(self, c_in, c_out, k, s):
        super().__init__()
        self.proj = nn.Conv2d(c_in, c_out, k, s, k // 2)
        self.norm = nn.LayerNorm(c_out)

    def forward(self, x):
        x = self.proj(x)
        h, w = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class NvAttention(nn.Module):
    def __init__(self, dim, heads, sr):
        super().__init__()
        self.heads, self.sr_ratio = heads, sr
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        d = c // self.heads
        q = self.q(x).reshape(b, n, self.heads, d).permute(0, 2, 1, 3)
        src = x
        if self.sr_ratio > 1:
            src = self.norm(self.sr(_to_map(x, h, w)).reshape(b, c, -1).permute(0, 2, 1))
        kv = self.kv(src).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = (q @ k.transpose(-2, -1)) * d**-0.5
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class NvDWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, h, w):
        return self.dwconv(_to_map(x, h, w)).flatten(2).transpose(1, 2)


class NvMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = NvDWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, h, w):
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class NvBlock(nn.Module):
    def __init__(self, dim, heads, sr):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = NvAttention(dim, heads, sr)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = NvMlp(dim, dim * 4)

    def forward(self, x, h, w):
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x), h, w)


class NvMiT(nn.Module):
    def __init__(self, dims, depths, heads, srs=(8, 4, 2, 1)):
        super().__init__()
        for i in range(4):
            k, s = (7, 4) if i == 0 else (3, 2)
            setattr(self, f"patch_embed{i + 1}", NvPatchEmbed(3 if i == 0 else dims[i - 1], dims[i], k, s))
            setattr(self, f"block{i + 1}", nn.ModuleList(NvBlock(dims[i], heads[i], srs[i]) for _ in range(depths[i])))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dims[i], eps=1e-6))

    def forward(self, x):
        outs = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x, h, w)
            x = getattr(self, f"norm{i}")(x)
            x = _to_map(x, h, w)
            outs.append(x)
        return outs


class NvMLP(nn.Module):
    def __init__(self, c, d):
        super().__init__()
        self.proj = nn.Linear(c, d)

    def forward(self, x):
        return self.proj(x.flatten(2).transpose(1, 2))


class ConvBnRelu(nn.Module):
    """mmcv ConvModule(conv, bn, activate): the names `conv` and `bn` are what checkpoints carry."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class NvHead(nn.Module):
    def __init__(self, dims, d, classes):
        super().__init__()
        for i in range(4):
            setattr(self, f"linear_c{i + 1}", NvMLP(dims[i], d))
        self.linear_fuse = ConvBnRelu(4 * d, d)
        self.linear_pred = nn.Conv2d(d, classes, 1)
        self.conv_seg = nn.Conv2d(d, classes, 1)  # built by mmseg 0.x BaseDecodeHead, never used by SegFormer

    def forward(self, feats):
        return _all_mlp_head(self, feats)


def _all_mlp_head(owner: nn.Module, feats: list[torch.Tensor]) -> torch.Tensor:
    """SegFormer's all-MLP decoder over the modules `linear_c1..4`, `linear_fuse`, `linear_pred` of `owner`."""
    size = feats[0].shape[2:]
    outs = []
    for i in (4, 3, 2, 1):
        f = feats[i - 1]
        y = getattr(owner, f"linear_c{i}")(f).permute(0, 2, 1).reshape(f.shape[0], -1, *f.shape[2:])
        outs.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
    return owner.linear_pred(owner.linear_fuse(torch.cat(outs, dim=1)))


class NvSegFormer(nn.Module):
    def __init__(self, dims, depths, heads, d, classes):
        super().__init__()
        self.backbone = NvMiT(dims, depths, heads)
        self.decode_head = NvHead(dims, d, classes)

    def forward(self, x):
        return self.decode_head(self.backbone(x))


# ----------------------------------------------------------------------------------- TransKD reference layout


class TkSegFormer(NvMiT):
    """The TransKD reference code's SegFormer (its `mit_b0`..`mit_b5`): one module with NVlabs' encoder names and
    the all-MLP head beside them at the top level (`linear_c1..4`, `linear_fuse.conv`/`.bn`, `linear_pred`), no
    `backbone.` / `decode_head.` nesting and no unused `conv_seg`."""

    def __init__(self, dims, depths, heads, d, classes):
        super().__init__(dims, depths, heads)
        for i in range(4):
            setattr(self, f"linear_c{i + 1}", NvMLP(dims[i], d))
        self.linear_fuse = ConvBnRelu(4 * d, d)
        self.linear_pred = nn.Conv2d(d, classes, 1)

    def forward(self, x):
        return _all_mlp_head(self, super().forward(x))


# ------------------------------------------------------------------------------------------------- mmseg layout


class MmPatchEmbed(nn.Module):
    def __init__(self, c_in, c_out, k, s):
        super().__init__()
        self.projection = nn.Conv2d(c_in, c_out, k, s, k // 2)
        self.norm = nn.LayerNorm(c_out, eps=1e-6)

    def forward(self, x):
        x = self.projection(x)
        h, w = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), (h, w)


class MmEfficientMHA(nn.Module):
    def __init__(self, dim, heads, sr):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.sr_ratio = sr
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, hw, identity):
        kv = x
        if self.sr_ratio > 1:
            kv = self.norm(self.sr(_to_map(x, *hw)).flatten(2).transpose(1, 2))
        return identity + self.attn(x, kv, kv, need_weights=False)[0]


class MmMixFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden), nn.GELU(),
            nn.Dropout(0.0), nn.Conv2d(hidden, dim, 1), nn.Dropout(0.0),
        )

    def forward(self, x, hw, identity):
        return identity + self.layers(_to_map(x, *hw)).flatten(2).transpose(1, 2)


class MmLayer(nn.Module):
    def __init__(self, dim, heads, sr):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MmEfficientMHA(dim, heads, sr)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = MmMixFFN(dim, dim * 4)

    def forward(self, x, hw):
        x = self.attn(self.norm1(x), hw, identity=x)
        return self.ffn(self.norm2(x), hw, identity=x)


class MmMiT(nn.Module):
    def __init__(self, dims, depths, heads, srs=(8, 4, 2, 1)):
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(4):
            k, s = (7, 4) if i == 0 else (3, 2)
            self.layers.append(nn.ModuleList([
                MmPatchEmbed(3 if i == 0 else dims[i - 1], dims[i], k, s),
                nn.ModuleList(MmLayer(dims[i], heads[i], srs[i]) for _ in range(depths[i])),
                nn.LayerNorm(dims[i], eps=1e-6),
            ]))

    def forward(self, x):
        outs = []
        for embed, blocks, norm in self.layers:
            x, hw = embed(x)
            for blk in blocks:
                x = blk(x, hw)
            x = _to_map(norm(x), *hw)
            outs.append(x)
        return outs


class MmHead(nn.Module):
    def __init__(self, dims, d, classes):
        super().__init__()
        self.convs = nn.ModuleList(ConvBnRelu(c, d) for c in dims)
        self.fusion_conv = ConvBnRelu(4 * d, d)
        self.conv_seg = nn.Conv2d(d, classes, 1)

    def forward(self, feats):
        size = feats[0].shape[2:]
        outs = [F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False)
                for conv, f in zip(self.convs, feats)]
        return self.conv_seg(self.fusion_conv(torch.cat(outs, dim=1)))


class MmSegFormer(nn.Module):
    def __init__(self, dims, depths, heads, d, classes):
        super().__init__()
        self.backbone = MmMiT(dims, depths, heads)
        self.decode_head = MmHead(dims, d, classes)

    def forward(self, x):
        return self.decode_head(self.backbone(x))


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every tensor its own random values (norm weights and BN statistics included), so swaps are visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() == 1 and ("norm" in name or "bn" in name) and name.endswith("weight"):
                t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=g))
            else:
                fan_in = t[0].numel() if t.dim() > 1 else 1
                scale = 1.0 / fan_in**0.5 if t.dim() > 1 else 0.1
                t.copy_(scale * torch.randn(t.shape, generator=g))
    return module.eval()
