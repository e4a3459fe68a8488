"""Lite Vision Transformer (LVT, Yang et al., CVPR 2022) encoder as the TransKD reference builds it, in an
ONNX-opset-17 form (no Unfold/Col2Im) that works on B x N x C tokens like the Mix Transformer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import InputError
from pipeline.models.mit import DropPath, MixFFN, StagedEncoder, grid_of, tokens_of
from pipeline.models.registry import SegFormerConfig

# Convolutional self-attention (stage 1): 3 x 3 windows on a stride-2 grid, as in the reference.
CSA_KERNEL, CSA_STRIDE, CSA_PADDING = 3, 2, 1
WINDOW = CSA_KERNEL * CSA_KERNEL  # positions in a window (9)
# Recursive atrous self-attention (stages 2-4): the TransKD LVT student's rasa_cfg.
ATROUS_RATES = (1, 3, 5)
RECURSIONS = 2  # r_num


def one_hot_windows(channels: int) -> torch.Tensor:
    """Depth-wise kernel (9C x 1 x 3 x 3) whose output channel c*9 + j copies window position j of channel c.

    As F.conv2d(groups=C) it is an unfold (nn.Unfold's channel order, c-major); as F.conv_transpose2d(groups=C),
    its adjoint, it is a fold: every window value is added back where it came from.
    """
    eye = torch.eye(WINDOW).reshape(WINDOW, 1, CSA_KERNEL, CSA_KERNEL)
    return eye.repeat(channels, 1, 1, 1)


class ConvSelfAttention(nn.Module):
    """CSA: per 3 x 3 window on a stride-2 grid, a 9 x 9 attention predicted from the 2 x 2 average-pooled
    input mixes the window's 9 values (each position with its own C x C value matrix); overlapping windows
    are summed back onto the full grid."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.scale = (dim // heads) ** -0.5
        self.affinity = nn.Linear(dim, WINDOW * WINDOW * heads)
        # one C x C matrix per window position: group j of the 9C channels holds position j (reference layout)
        self.value = nn.Conv2d(WINDOW * dim, WINDOW * dim, 1, groups=WINDOW, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("one_hot", one_hot_windows(dim), persistent=False)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, c, d = x.shape[0], self.dim, self.dim // self.heads
        grid = grid_of(x, h, w)
        # ceil_mode keeps one pooled cell per window when a side is odd; the reference's AvgPool2d divides an
        # overhanging cell by its in-bounds count. With padding 0 PyTorch (and onnxruntime) give that with either
        # count_include_pad; False exports count_include_pad=0, so a runtime that treats the ceil overhang as
        # padding still divides by the in-bounds count.
        pooled = F.avg_pool2d(grid, CSA_STRIDE, CSA_STRIDE, ceil_mode=True, count_include_pad=False)
        hp, wp = pooled.shape[2], pooled.shape[3]
        attn = self.affinity(tokens_of(pooled)).reshape(b, hp * wp, self.heads, WINDOW, WINDOW).transpose(1, 2)
        attn = (attn * self.scale).softmax(dim=-1)  # B x heads x L x 9 (query position) x 9 (key position)
        # unfold as a one-hot depth-wise conv (ceil(H/2) x ceil(W/2) windows, like nn.Unfold), then the channel
        # shuffle c*9 + j -> j*C + c that puts each window position in its own group of the value conv
        cols = F.conv2d(grid, self.one_hot, stride=CSA_STRIDE, padding=CSA_PADDING, groups=c)
        cols = cols.reshape(b, c, WINDOW, hp, wp).transpose(1, 2).reshape(b, WINDOW * c, hp, wp)
        v = self.value(cols).reshape(b, WINDOW, self.heads, d, hp * wp).permute(0, 2, 4, 1, 3)
        out = (attn @ v).permute(0, 1, 4, 3, 2).reshape(b, c * WINDOW, hp, wp)  # back to c-major, c = head*d + i
        return self.proj(tokens_of(self._fold(out, h, w)))

    def _fold(self, cols: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Sum the windows back onto an h x w grid (F.fold without ONNX's opset-18 Col2Im).

        Window p (of hp = ceil(h/2)) puts kernel row a (0..2) on row 2p - 1 + a. conv_transpose2d with stride 2,
        padding 1 does the same and drops row -1, as fold does; with output_padding 1 it is 2(hp - 1) - 2 + 3 + 1
        = 2hp rows, and the last row any window reaches is 2(hp - 1) - 1 + 2 = 2hp - 1, so nothing is cut off.
        Even h: 2hp = h, the crop is a no-op. Odd h: 2hp = h + 1, the crop drops row h, which fold drops as out
        of range. Columns likewise. output_padding must be static, so one value (1) serves both parities.
        """
        out = F.conv_transpose2d(cols, self.one_hot, stride=CSA_STRIDE, padding=CSA_PADDING, output_padding=1,
                                 groups=self.dim)
        return out[:, :, :h, :w]

    def attention_macs(self, x: torch.Tensor, h: int, w: int) -> int:
        """MACs outside nn.Linear/nn.Conv2d modules: the one-hot unfold (9 taps per output), attn @ v (9 per
        output) and the one-hot fold (9 taps per input), each 81 * C per window: 243 * B * C * L."""
        b, _, c = x.shape
        windows = math.ceil(h / CSA_STRIDE) * math.ceil(w / CSA_STRIDE)
        return 3 * WINDOW * WINDOW * b * c * windows


class AtrousDepthwise(nn.Module):
    """One depth-wise 3 x 3 kernel applied at several dilations (padding = dilation), each through SiLU, summed:
    the multi-scale query of RASA (the reference's ds_conv2d, no bias)."""

    def __init__(self, dim: int, rates: tuple[int, ...] = ATROUS_RATES) -> None:
        super().__init__()
        self.rates = rates
        self.weight = nn.Parameter(torch.empty(dim, 1, 3, 3))
        nn.init.kaiming_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        for r in self.rates:
            out = out + F.silu(F.conv2d(x, self.weight, None, 1, r, r, self.weight.shape[0]))
        return out

    def macs(self, elements: int) -> int:
        """9 MACs per output element per dilation, for an input of `elements` values (depth-wise: as many out)."""
        return 9 * len(self.rates) * elements


class RecursiveAtrousSelfAttention(nn.Module):
    """RASA: efficient self-attention (keys/values from a grid shrunk R times) whose queries pass the atrous
    depth-wise conv, applied recursively: y1 = SiLU(A(x)); y2 = SiLU(A(y1 + x)) (the reference's r_num = 2)."""

    def __init__(self, dim: int, heads: int, sr_ratio: int, eps: float, recursions: int = RECURSIONS) -> None:
        super().__init__()
        self.heads = heads
        self.sr_ratio = sr_ratio
        self.recursions = recursions
        self.q = nn.Linear(dim, dim, bias=False)
        self.atrous = AtrousDepthwise(dim)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.sr_norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, dim)

    def _attend(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.heads
        q = tokens_of(self.atrous(grid_of(self.q(x), h, w))).reshape(b, n, self.heads, d).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.sr_norm(tokens_of(self.sr(grid_of(x, h, w))))
        k, v = self.kv(x).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # default scale head_dim ** -0.5, as the reference
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        # exactly the reference's loop: SiLU only when there is a recursion; the residual feeds the next pass
        x_in = x
        x = self._attend(x, h, w)
        if self.recursions > 1:
            x = F.silu(x)
        for _ in range(self.recursions - 1):
            x = x + x_in
            x_in = x
            x = F.silu(self._attend(x, h, w))
        return x

    def attention_macs(self, x: torch.Tensor, h: int, w: int) -> int:
        """Per pass: Q K^T and A V (N * N' * C each) and the functional atrous convs (27 * N * C)."""
        b, n, c = x.shape
        r = self.sr_ratio
        n_kv = (h // r) * (w // r) if r > 1 else n
        return self.recursions * (2 * b * n * n_kv * c + self.atrous.macs(x.numel()))


class TokenMLP(nn.Module):
    """Stage 1's feed-forward network: Linear, GELU, Linear (no depth-wise conv in the reference)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LvtBlock(nn.Module):
    """Pre-norm block: CSA + plain MLP in stage 1, RASA + Mix-FFN in stages 2-4."""

    def __init__(self, cfg: SegFormerConfig, i: int, drop_path: float) -> None:
        super().__init__()
        dim, eps = cfg.dims[i], cfg.norm_eps
        hidden = dim * cfg.mlp_ratios[i]
        self.norm1 = nn.LayerNorm(dim, eps=eps[1])
        self.norm2 = nn.LayerNorm(dim, eps=eps[1])
        if i == 0:
            self.attn: nn.Module = ConvSelfAttention(dim, cfg.heads[i])
            self.ffn: nn.Module = TokenMLP(dim, hidden)
        else:
            self.attn = RecursiveAtrousSelfAttention(dim, cfg.heads[i], cfg.sr_ratios[i], eps[2])
            self.ffn = MixFFN(dim, hidden)  # the reference's 1x1 conv / depth-wise / 1x1 conv Mlp, same function
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.ffn(self.norm2(x), h, w))


class LvtPatchEmbed(nn.Module):
    """Strided overlapping conv then LayerNorm; also returns the conv output as tokens (the distillation tap)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(c_out, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        x = self.proj(x)
        tap = tokens_of(x)
        return self.norm(tap), tap, x.shape[2], x.shape[3]


class LvtStage(nn.Module):
    """Patch embedding and blocks; LVT has no stage LayerNorm (the reference's downstream_norms are Identity)."""

    def __init__(self, cfg: SegFormerConfig, i: int, drop_paths: list[float]) -> None:
        super().__init__()
        c_in = 3 if i == 0 else cfg.dims[i - 1]
        self.embed = LvtPatchEmbed(c_in, cfg.dims[i], cfg.patch_sizes[i], cfg.strides[i], cfg.norm_eps[0])
        self.blocks = nn.ModuleList(LvtBlock(cfg, i, p) for p in drop_paths)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        tokens, tap, h, w = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens, h, w)
        return grid_of(tokens, h, w), tap, (h, w)


class LiteVisionTransformer(StagedEncoder):
    """The four-stage LVT encoder; returns per stage the map, the patch-embedding tap and its grid size.

    The tap is the patch-embedding conv output BEFORE its LayerNorm: the TransKD reference returns that for LVT
    (its OverlapPatchEmbed flattens before normalising), while its MiT taps are after the norm. Distilling onto
    the reference's tap keeps its loss scales, so we keep its choice.
    """

    def __init__(self, cfg: SegFormerConfig) -> None:
        if cfg.backbone != "lvt":
            raise InputError(f"model config: LiteVisionTransformer needs backbone 'lvt', got {cfg.backbone!r}")
        super().__init__(cfg, LvtStage)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference's initialisation, tensor by tensor:

        | tensor                                   | init                                          |
        |------------------------------------------|-----------------------------------------------|
        | every Linear (incl. stage-1 MLP)         | trunc_normal std 0.02, bias 0                 |
        | every LayerNorm                          | weight 1, bias 0                              |
        | patch-embedding conv, RASA sr conv       | normal(0, sqrt(2 / (k*k*out/groups))), bias 0 |
        | CSA value conv (groups 9)                | normal(0, sqrt(2 / (9C))): not divided by groups |
        | RASA atrous weight                       | kaiming_uniform_ defaults (bound sqrt(6/9))   |
        | stage 2-4 Mix-FFN fc1, dwconv, fc2       | PyTorch defaults                              |

        The last row: the reference's Mlp there is Conv2d (1x1, 3x3 dw, 1x1) that no init hook touches; a 1x1
        Conv2d's default init (kaiming_uniform a=sqrt(5), bias U(+-1/sqrt(fan_in)), fan_in = C_in) is exactly
        nn.Linear's default, so our Linear fc1/fc2 get the same distribution from reset_parameters().
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, LvtPatchEmbed):
                _normal_fan_out(m.proj)
            elif isinstance(m, RecursiveAtrousSelfAttention):
                if m.sr_ratio > 1:
                    _normal_fan_out(m.sr)
                nn.init.kaiming_uniform_(m.atrous.weight)
            elif isinstance(m, ConvSelfAttention):
                nn.init.normal_(m.value.weight, 0.0, math.sqrt(2.0 / m.value.out_channels))
            elif isinstance(m, MixFFN):
                for layer in (m.fc1, m.dwconv, m.fc2):
                    layer.reset_parameters()


def _normal_fan_out(conv: nn.Conv2d) -> None:
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
