"""Patch-embedding transfer: Patch Embedding Alignment, Global-Local Context Mixer, Embedding Assistant."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.mit import OverlapPatchEmbed, grid_of, tokens_of


class PatchEmbedAlign(nn.Module):
    """PEA: per stage a linear map of the student's patch tokens (B x N x C_s) to the teacher's width C_t."""

    def __init__(self, student_dims: tuple[int, ...], teacher_dims: tuple[int, ...]) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(cs, ct) for cs, ct in zip(student_dims, teacher_dims))

    def forward(self, i: int, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj[i](tokens)


class GlobalLocalMixer(nn.Module):
    """GL-Mixer on one stage's student tokens: alpha * multi-head self-attention + beta * gated 1D conv.

    docs/method.md section 4. The reference leaves alpha and beta uninitialised (whatever memory held);
    we start both at 1.0. No residual, as in the reference's default.
    """

    def __init__(self, dim: int, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.local_value = nn.Conv1d(dim, dim, 3, padding=1)
        self.local_gate = nn.Conv1d(dim, dim, 3, padding=1)
        self.alpha = nn.Parameter(torch.ones(()))
        self.beta = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        glob = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        seq = x.transpose(1, 2)  # the token sequence as B x C x N for the 1D convolutions
        local = (self.local_value(seq) * torch.sigmoid(self.local_gate(seq))).transpose(1, 2)
        return self.alpha * glob + self.beta * local


class EmbeddingAssistant(nn.Module):
    """EA: a second, teacher-width patch-embedding path (stage 1 from the image, stage i from the student's
    stage i-1 map), mixed with PEA's projection as w_i * PEA_i + v_i * EA_i (scalars start at 0.1 .. 0.8)."""

    def __init__(self, student_dims: tuple[int, ...], teacher_dims: tuple[int, ...],
                 patch_sizes: tuple[int, ...], strides: tuple[int, ...], eps: float = 1e-5) -> None:
        super().__init__()
        c_in = (3, *student_dims[:-1])
        self.embed = nn.ModuleList(
            OverlapPatchEmbed(ci, ct, k, s, eps) for ci, ct, k, s in zip(c_in, teacher_dims, patch_sizes, strides)
        )
        # The reference builds these with its MiT patch-embedding init: conv weights N(0, sqrt(2 / fan_out)) with
        # fan_out = k * k * C_out, zero bias (LayerNorm 1 / 0 as PyTorch's). PyTorch's conv default differs by a
        # factor that depends on the stage's kernel and widths (0.73x to 1.90x in std for MiT-B2 -> B0).
        for embed in self.embed:
            conv = embed.proj
            fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
            nn.init.zeros_(conv.bias)
        n = len(teacher_dims)
        self.w = nn.Parameter(torch.arange(1, n + 1, dtype=torch.float32) / 10)
        self.v = nn.Parameter(torch.arange(n + 1, 2 * n + 1, dtype=torch.float32) / 10)

    def forward(self, i: int, aligned: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """`aligned`: PEA_i(student tokens); `source`: the image (i = 0) or the student's map of stage i-1."""
        tokens, _, _ = self.embed[i](source)
        return self.w[i] * aligned + self.v[i] * tokens


def resize_tokens(tokens: torch.Tensor, hw: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Tokens of an h x w grid resampled (bilinear) onto another grid: aligns student and teacher embeddings
    when their grids differ (another input size or stride)."""
    if tuple(hw) == tuple(target):
        return tokens
    return tokens_of(F.interpolate(grid_of(tokens, *hw), size=target, mode="bilinear", align_corners=False))
