"""Mix Transformer (MiT) encoder of SegFormer, also the encoder of PVTv2 (per-stage MLP ratios); variants in
registry.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.registry import SegFormerConfig


def grid_of(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """B x N x C tokens as a B x C x H x W map without a copy (the map is channels-last in memory).

    Convolutions take channels-last maps directly, and `tokens_of` turns their channels-last output back
    into tokens as a view: the encoder never transposes a full-resolution tensor in memory.
    """
    return tokens.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)


def tokens_of(fmap: torch.Tensor) -> torch.Tensor:
    """B x C x H x W map -> B x (H*W) x C tokens (a view when the map is channels-last)."""
    return fmap.permute(0, 2, 3, 1).reshape(fmap.shape[0], -1, fmap.shape[1])


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's residual branch with probability p while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows, flattened to tokens and normalised: the 'patch embedding'."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(c_out, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        return self.norm(tokens_of(x)), x.shape[2], x.shape[3]


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys and values come from a grid shrunk by a strided conv (ratio R)."""

    def __init__(self, dim: int, heads: int, sr_ratio: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.sr_norm = nn.LayerNorm(dim, eps=eps)

    def attention_macs(self, x: torch.Tensor, h: int, w: int) -> int:
        """Q K^T and A V, the matmuls no module does: 2 * N * N' * C for N queries and N' keys."""
        b, n, c = x.shape
        r = self.sr_ratio
        return 2 * b * n * (h // r) * (w // r) * c

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.heads
        q = self.q(x).reshape(b, n, self.heads, d).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.sr_norm(tokens_of(self.sr(grid_of(x, h, w))))
        k, v = self.kv(x).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MixFFN(nn.Module):
    """Linear, 3x3 depth-wise conv on the token grid (the implicit position code), GELU, linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = tokens_of(self.dwconv(grid_of(self.fc1(x), h, w)))
        return self.fc2(F.gelu(x))


class Block(nn.Module):
    """Pre-norm transformer block: efficient self-attention, then Mix-FFN, each with a residual."""

    def __init__(self, dim: int, heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float, eps: tuple) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps[1])
        self.attn = EfficientSelfAttention(dim, heads, sr_ratio, eps[2])
        self.norm2 = nn.LayerNorm(dim, eps=eps[1])
        self.ffn = MixFFN(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.ffn(self.norm2(x), h, w))


class Stage(nn.Module):
    """Patch embedding, transformer blocks, final LayerNorm, reshape to a B x C x H x W map."""

    def __init__(self, cfg: SegFormerConfig, i: int, drop_paths: list[float]) -> None:
        super().__init__()
        c_in = 3 if i == 0 else cfg.dims[i - 1]
        self.embed = OverlapPatchEmbed(c_in, cfg.dims[i], cfg.patch_sizes[i], cfg.strides[i], cfg.norm_eps[0])
        self.blocks = nn.ModuleList(
            Block(cfg.dims[i], cfg.heads[i], cfg.sr_ratios[i], cfg.mlp_ratios[i], p, cfg.norm_eps) for p in drop_paths
        )
        self.norm = nn.LayerNorm(cfg.dims[i], eps=cfg.norm_eps[1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        tokens, h, w = self.embed(x)
        embedding = tokens
        for block in self.blocks:
            tokens = block(tokens, h, w)
        return grid_of(self.norm(tokens), h, w), embedding, (h, w)


class StagedEncoder(nn.Module):
    """The encoder contract of every family: stages run in turn, and per stage (shallowest first) the map, the
    patch-embedding tap and its grid size come out. Stochastic depth rises linearly over all blocks."""

    def __init__(self, cfg: SegFormerConfig, stage: type[nn.Module]) -> None:
        super().__init__()
        total = sum(cfg.depths)
        rates = [cfg.drop_path * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(cfg.depths[:i]) for i in range(len(cfg.depths))]
        self.stages = nn.ModuleList(
            stage(cfg, i, rates[s : s + d]) for i, (s, d) in enumerate(zip(starts, cfg.depths))
        )

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
        maps, embeddings, sizes = [], [], []
        for stage in self.stages:
            x, emb, hw = stage(x)
            maps.append(x)
            embeddings.append(emb)
            sizes.append(hw)
        return maps, embeddings, sizes


class MixTransformer(StagedEncoder):
    """The four-stage hierarchical encoder of SegFormer and PVTv2."""

    def __init__(self, cfg: SegFormerConfig) -> None:
        super().__init__(cfg, Stage)

    def reset_parameters(self) -> None:
        self.apply(_init_weights)


def _init_weights(m: nn.Module) -> None:
    # The reference encoder initialisation (NVlabs MiT, whai362 PVTv2): it matters when a student trains without
    # pre-training.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
