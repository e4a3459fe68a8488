"""Mix Transformer (MiT) encoder of SegFormer, variants B0..B5 declared as one table of numbers."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import InputError

# variant: (stage widths C1..C4, blocks per stage, attention heads, decoder width D)
# Xie et al., SegFormer (2021), Table 6; docs/method.md section 1.
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]] = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2), (1, 2, 5, 8), 256),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2), (1, 2, 5, 8), 256),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3), (1, 2, 5, 8), 768),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3), (1, 2, 5, 8), 768),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3), (1, 2, 5, 8), 768),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3), (1, 2, 5, 8), 768),
}

# LayerNorm epsilons (patch embedding, transformer blocks + stage norm, key/value reduction). The three
# implementations whose weights we import differ here; matching them makes an import numerically exact.
NORM_EPS: dict[str, tuple[float, float, float]] = {
    "nvlabs": (1e-5, 1e-6, 1e-5),  # NVlabs/SegFormer and the TransKD reference code
    "hf": (1e-5, 1e-5, 1e-5),  # Hugging Face transformers (nn.LayerNorm defaults)
    "mmseg": (1e-6, 1e-6, 1e-6),  # mmsegmentation: norm_cfg=dict(type="LN", eps=1e-6) everywhere
}


@dataclass(frozen=True)
class SegFormerConfig:
    """Everything that fixes the architecture (and so the checkpoint layout) of one SegFormer."""

    variant: str
    dims: tuple[int, ...]
    depths: tuple[int, ...]
    heads: tuple[int, ...]
    decoder_dim: int
    num_classes: int = 19
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    mlp_ratio: int = 4
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
    strides: tuple[int, ...] = (4, 2, 2, 2)
    # "mlp": linear per stage, concat deepest first (NVlabs, Hugging Face, TransKD);
    # "mmseg": 1x1 conv + BN + ReLU per stage, concat shallowest first (mmsegmentation's SegformerHead).
    head_style: str = "mlp"
    norm_eps: tuple[float, float, float] = field(default=NORM_EPS["nvlabs"])
    drop_path: float = 0.1
    dropout: float = 0.1

    def __post_init__(self) -> None:
        n = len(self.dims)
        for name in ("depths", "heads", "sr_ratios", "patch_sizes", "strides"):
            if len(getattr(self, name)) != n:
                raise InputError(f"model config: {name} has {len(getattr(self, name))} entries, expected {n}")
        for c, h in zip(self.dims, self.heads):
            if h < 1 or c % h:
                raise InputError(f"model config: width {c} is not divisible by {h} heads")
        if self.head_style not in ("mlp", "mmseg"):
            raise InputError(f"model config: head_style {self.head_style!r}, expected 'mlp' or 'mmseg'")
        if len(self.norm_eps) != 3:
            raise InputError(f"model config: norm_eps has {len(self.norm_eps)} entries, expected 3")
        if self.num_classes < 1:
            raise InputError(f"model config: num_classes {self.num_classes}, expected >= 1")

    @classmethod
    def from_variant(cls, variant: str, num_classes: int = 19, **overrides) -> SegFormerConfig:
        if variant not in VARIANTS:
            close = difflib.get_close_matches(variant, VARIANTS, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise InputError(f"unknown model variant {variant!r}{hint}; expected one of {', '.join(VARIANTS)}")
        dims, depths, heads, decoder_dim = VARIANTS[variant]
        fields = dict(dims=dims, depths=depths, heads=heads, decoder_dim=decoder_dim, num_classes=num_classes)
        fields.update(cls._checked_fields(overrides))
        # a table architecture keeps its name; any change to widths, depths, heads or decoder makes it "custom"
        name = variant_of(fields["dims"], fields["depths"], fields["heads"], fields["decoder_dim"])
        fields.setdefault("variant", variant if name == variant else "custom")
        return cls(**fields)

    @classmethod
    def from_dict(cls, d: dict) -> SegFormerConfig:
        """The config a sidecar recorded (lists from JSON become tuples)."""
        return cls(**cls._checked_fields(d))

    @classmethod
    def _checked_fields(cls, d: dict) -> dict:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"model config: unknown field(s) {', '.join(unknown)}")
        return {k: _typed(f"model config: {k}", v, cls.__dataclass_fields__[k].type) for k, v in d.items()}


def _typed(name: str, value: object, hint: str):
    """`value` as the field annotated `hint` takes it (str, int >= 1, finite float, or a tuple of them)."""
    if hint.startswith("tuple["):
        item = hint[len("tuple["):].split(",")[0].strip()
        if not isinstance(value, (list, tuple)) or not value:
            raise InputError(f"{name} {value!r}: expected a list of {item}s")
        return tuple(_typed(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint == "int" and not (number and isinstance(value, int) and value >= 1):
        raise InputError(f"{name} {value!r}: expected an integer >= 1")
    if hint == "float" and not (number and 0 <= value < 1):
        raise InputError(f"{name} {value!r}: expected a number within [0, 1)")
    if hint == "str" and not isinstance(value, str):
        raise InputError(f"{name} {value!r}: expected a string")
    return float(value) if hint == "float" else value


def variant_of(dims, depths, heads=None, decoder_dim=None) -> str | None:
    """The table name of an architecture, or None when it is not one of B0..B5."""
    for name, (v_dims, v_depths, v_heads, v_dec) in VARIANTS.items():
        if tuple(dims) == v_dims and tuple(depths) == v_depths:
            if (heads is None or tuple(heads) == v_heads) and (decoder_dim is None or decoder_dim == v_dec):
                return name
    return None


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
            Block(cfg.dims[i], cfg.heads[i], cfg.sr_ratios[i], cfg.mlp_ratio, p, cfg.norm_eps) for p in drop_paths
        )
        self.norm = nn.LayerNorm(cfg.dims[i], eps=cfg.norm_eps[1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        tokens, h, w = self.embed(x)
        embedding = tokens
        for block in self.blocks:
            tokens = block(tokens, h, w)
        return grid_of(self.norm(tokens), h, w), embedding, (h, w)


class MixTransformer(nn.Module):
    """The four-stage hierarchical encoder; returns per stage the map, the patch embedding and its grid size."""

    def __init__(self, cfg: SegFormerConfig) -> None:
        super().__init__()
        total = sum(cfg.depths)
        rates = [cfg.drop_path * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(cfg.depths[:i]) for i in range(len(cfg.depths))]
        self.stages = nn.ModuleList(
            Stage(cfg, i, rates[s : s + d]) for i, (s, d) in enumerate(zip(starts, cfg.depths))
        )

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
        maps, embeddings, sizes = [], [], []
        for stage in self.stages:
            x, emb, hw = stage(x)
            maps.append(x)
            embeddings.append(emb)
            sizes.append(hw)
        return maps, embeddings, sizes
