"""The model-family registry: every variant of every family as one row of numbers, and the config of a model."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from pipeline.errors import InputError

# LayerNorm epsilons (patch embedding, transformer blocks + stage norm, key/value reduction). The implementations
# whose weights we import differ here; matching them makes an import numerically exact.
NORM_EPS: dict[str, tuple[float, float, float]] = {
    "nvlabs": (1e-5, 1e-6, 1e-5),  # NVlabs/SegFormer, whai362/PVT (PVTv2) and the TransKD reference code
    "hf": (1e-5, 1e-5, 1e-5),  # Hugging Face SegFormer (nn.LayerNorm defaults)
    "hf_pvt": (1e-6, 1e-6, 1e-6),  # Hugging Face PvtV2: config.layer_norm_eps everywhere
    "mmseg": (1e-6, 1e-6, 1e-6),  # mmsegmentation: norm_cfg=dict(type="LN", eps=1e-6) everywhere
    "lvt": (1e-5, 1e-5, 1e-5),  # LVT (Yang et al.) and its copy in the TransKD reference: nn.LayerNorm defaults
}

BACKBONES = ("mit", "lvt")  # "mit": Mix Transformer, also PVTv2's encoder (MiT descends from it: MLP ratios differ)
HEAD_STYLES = ("mlp", "mmseg", "fpn")


@dataclass(frozen=True)
class Variant:
    """One row of the registry: the numbers that make a named model (19-class head unless told otherwise)."""

    dims: tuple[int, ...]  # stage widths C1..C4
    depths: tuple[int, ...]  # transformer blocks per stage
    heads: tuple[int, ...]  # attention heads per stage
    decoder_dim: int  # all-MLP head width D; for "fpn" the FPN neck's width
    mlp_ratios: tuple[int, ...] = (4, 4, 4, 4)
    backbone: str = "mit"
    head_style: str = "mlp"  # "mlp": SegFormer all-MLP head; "fpn": Semantic FPN (neck + head)
    fpn_channels: int = 128  # Semantic FPN head width (only "fpn")
    norm_eps: tuple[float, float, float] = NORM_EPS["nvlabs"]
    drop_path: float = 0.1
    dropout: float = 0.1


_MIT = (1, 2, 5, 8)
_B1_B5 = (64, 128, 320, 512)
# MiT: Xie et al., SegFormer (2021), Table 6. PVTv2: Wang et al., PVT v2 (2022), Table 1, with the Semantic FPN
# (Kirillov et al., 2019) the TransKD reference pairs it with (FPN neck to 256 channels, head of 128).
# LVT: Yang et al., Lite Vision Transformer (2022), as the TransKD reference builds it, with an all-MLP head of 256
# and no dropout or stochastic depth (its drop_path_rate 0 also turns the head's Dropout2d off).
VARIANTS: dict[str, Variant] = {
    "mit_b0": Variant((32, 64, 160, 256), (2, 2, 2, 2), _MIT, 256),
    "mit_b1": Variant(_B1_B5, (2, 2, 2, 2), _MIT, 256),
    "mit_b2": Variant(_B1_B5, (3, 4, 6, 3), _MIT, 768),
    "mit_b3": Variant(_B1_B5, (3, 4, 18, 3), _MIT, 768),
    "mit_b4": Variant(_B1_B5, (3, 8, 27, 3), _MIT, 768),
    "mit_b5": Variant(_B1_B5, (3, 6, 40, 3), _MIT, 768),
    "pvt_v2_b0": Variant((32, 64, 160, 256), (2, 2, 2, 2), _MIT, 256, (8, 8, 4, 4), head_style="fpn"),
    "pvt_v2_b1": Variant(_B1_B5, (2, 2, 2, 2), _MIT, 256, (8, 8, 4, 4), head_style="fpn"),
    "pvt_v2_b2": Variant(_B1_B5, (3, 4, 6, 3), _MIT, 256, (8, 8, 4, 4), head_style="fpn"),
    "pvt_v2_b3": Variant(_B1_B5, (3, 4, 18, 3), _MIT, 256, (8, 8, 4, 4), head_style="fpn"),
    "pvt_v2_b4": Variant(_B1_B5, (3, 8, 27, 3), _MIT, 256, (8, 8, 4, 4), head_style="fpn"),
    "pvt_v2_b5": Variant(_B1_B5, (3, 6, 40, 3), _MIT, 256, (4, 4, 4, 4), head_style="fpn"),
    "lvt": Variant((64, 64, 160, 256), (2, 2, 2, 2), (2, 2, 5, 8), 256, (4, 8, 4, 4), backbone="lvt",
                   norm_eps=NORM_EPS["lvt"], drop_path=0.0, dropout=0.0),
}
# the fields of a Variant that name an architecture (the rest are training-time defaults)
ARCH_FIELDS = ("dims", "depths", "heads", "decoder_dim", "mlp_ratios", "backbone", "head_style", "fpn_channels")


@dataclass(frozen=True)
class SegFormerConfig:
    """Everything that fixes the architecture (and so the checkpoint layout) of one segmentation model of any
    family in VARIANTS: a hierarchical four-stage encoder and a head on its stage maps."""

    variant: str
    dims: tuple[int, ...]
    depths: tuple[int, ...]
    heads: tuple[int, ...]
    decoder_dim: int
    num_classes: int = 19
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    mlp_ratios: tuple[int, ...] = (4, 4, 4, 4)
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
    strides: tuple[int, ...] = (4, 2, 2, 2)
    backbone: str = "mit"
    # "mlp": linear per stage, concat deepest first (NVlabs, Hugging Face, TransKD, LVT);
    # "mmseg": 1x1 conv + BN + ReLU per stage, concat shallowest first (mmsegmentation's SegformerHead);
    # "fpn": Semantic FPN, an FPN neck to decoder_dim channels and a head of fpn_channels (PVTv2).
    head_style: str = "mlp"
    fpn_channels: int = 128
    norm_eps: tuple[float, float, float] = field(default=NORM_EPS["nvlabs"])
    drop_path: float = 0.1
    dropout: float = 0.1

    def __post_init__(self) -> None:
        n = len(self.dims)
        for name in ("depths", "heads", "sr_ratios", "mlp_ratios", "patch_sizes", "strides"):
            if len(getattr(self, name)) != n:
                raise InputError(f"model config: {name} has {len(getattr(self, name))} entries, expected {n}")
        for c, h in zip(self.dims, self.heads):
            if h < 1 or c % h:
                raise InputError(f"model config: width {c} is not divisible by {h} heads")
        if self.backbone not in BACKBONES:
            raise InputError(f"model config: backbone {self.backbone!r}, expected one of {', '.join(BACKBONES)}")
        if self.head_style not in HEAD_STYLES:
            raise InputError(f"model config: head_style {self.head_style!r}, expected one of "
                             f"{', '.join(repr(s) for s in HEAD_STYLES)}")
        if self.backbone == "lvt" and n != 4:
            raise InputError(f"model config: an LVT backbone has 4 stages, not {n}")
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
        row = VARIANTS[variant]
        fields = {k: getattr(row, k) for k in row.__dataclass_fields__}
        fields["num_classes"] = num_classes
        fields.update(cls._checked_fields(overrides))
        # a table architecture keeps its name; any change to what ARCH_FIELDS hold makes it "custom"
        name = variant_of(**{k: fields[k] for k in ARCH_FIELDS})
        fields.setdefault("variant", variant if name == variant else "custom")
        return cls(**fields)

    @classmethod
    def from_dict(cls, d: dict) -> SegFormerConfig:
        """The config a sidecar recorded (lists from JSON become tuples); a sidecar written before the registry
        recorded one `mlp_ratio` for every stage."""
        d = dict(d)
        if "mlp_ratio" in d and "mlp_ratios" not in d and "dims" in d:
            d["mlp_ratios"] = [d.pop("mlp_ratio")] * len(d["dims"])
        return cls(**cls._checked_fields(d))

    @classmethod
    def _checked_fields(cls, d: dict) -> dict:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"model config: unknown field(s) {', '.join(unknown)}")
        return {k: _typed(f"model config: {k}", v, str(cls.__dataclass_fields__[k].type)) for k, v in d.items()}


def _typed(name: str, value: object, hint: str):
    """`value` as the field annotated `hint` takes it (str, int >= 1, float in [0, 1), or a tuple of them)."""
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


def variant_of(dims, depths, heads=None, decoder_dim=None, mlp_ratios=None, backbone=None, head_style=None,
               fpn_channels=None) -> str | None:
    """The table name of an architecture, or None when it is none of VARIANTS; a field left None matches any
    value (weights alone do not show the attention heads, for one)."""
    given = dict(dims=dims, depths=depths, heads=heads, decoder_dim=decoder_dim, mlp_ratios=mlp_ratios,
                 backbone=backbone, head_style=head_style, fpn_channels=fpn_channels)
    for name, row in VARIANTS.items():
        if all(v is None or _same(k, v, row) for k, v in given.items()):
            return name
    return None


def _same(key: str, value, row: Variant) -> bool:
    if key == "fpn_channels" and row.head_style != "fpn":  # the field means nothing without an FPN
        return True
    if key == "head_style":  # mmsegmentation's SegFormer head is the same model as the all-MLP one
        return {"mmseg": "mlp"}.get(value, value) == row.head_style
    return (tuple(value) if isinstance(value, (list, tuple)) else value) == getattr(row, key)
