"""The segmentation model of every family (MiT + all-MLP head, PVTv2 + Semantic FPN, LVT + all-MLP head): `forward`
gives logits, `features` the distillation taps."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.classes import IMAGENET_MEAN, IMAGENET_STD, default_classes, default_palette
from pipeline.errors import InputError
from pipeline.models.fpn import SemanticFPN
from pipeline.models.lvt import LiteVisionTransformer
from pipeline.models.mit import MixFFN, MixTransformer, grid_of, tokens_of
from pipeline.models.registry import SegFormerConfig

# Below this the deepest key/value reduction (stride 4 * 8) leaves no token.
MIN_INPUT_SIDE = 32


@dataclass
class ModelMeta:
    """What a deployed model needs besides its weights: label set, colours, input contract, provenance."""

    classes: list[str]
    palette: list[list[int]]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: tuple[int, int] = (512, 1024)
    source: str = "random init"

    @classmethod
    def default(cls, num_classes: int) -> ModelMeta:
        return cls(default_classes(num_classes), default_palette(num_classes))


@dataclass
class Taps:
    """What distillation reads from a forward pass, per stage (shallowest first), and the logits."""

    # B x N_i x C_i: patch tokens, LayerNormed as stage i's blocks receive them (MiT, PVTv2), or before that norm
    # where the reference distils them so (LVT)
    embeddings: list[torch.Tensor]
    sizes: list[tuple[int, int]]  # (H_i, W_i) of each token grid, N_i = H_i * W_i
    maps: list[torch.Tensor]  # B x C_i x H_i x W_i: stage outputs
    logits: torch.Tensor  # B x classes x H_1 x W_1 (1/4 of the input)
    image: torch.Tensor  # the input batch itself: the Embedding Assistant embeds it again

    def map(self, fn) -> Taps:
        """The same taps with `fn` applied to every tensor (e.g. clone inference tensors for autograd)."""
        return Taps([fn(e) for e in self.embeddings], list(self.sizes), [fn(m) for m in self.maps],
                    fn(self.logits), fn(self.image))


class SegFormerHead(nn.Module):
    """Project every stage to D channels, upsample to stage 1, fuse with 1x1 conv + BN + ReLU, classify."""

    def __init__(self, cfg: SegFormerConfig) -> None:
        super().__init__()
        d = cfg.decoder_dim
        self.style = cfg.head_style
        mmseg = cfg.head_style == "mmseg"
        self.proj = nn.ModuleList(nn.Linear(c, d, bias=not mmseg) for c in cfg.dims)
        self.proj_bn = nn.ModuleList(nn.BatchNorm2d(d) for _ in cfg.dims) if mmseg else None
        self.act = nn.ReLU()  # a module, not F.relu, so module-hook FLOP counters see it as mmcv's would
        self.fuse = nn.Conv2d(d * len(cfg.dims), d, 1, bias=False)
        self.bn = nn.BatchNorm2d(d)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(d, cfg.num_classes, 1)

    def reset_parameters(self) -> None:
        # mmcv ConvModule's Kaiming init for the fusion conv; a small classifier (std 0.01, as mmseg's decode
        # heads) so a fresh model starts near uniform class probabilities; PyTorch defaults for the projections
        nn.init.kaiming_normal_(self.fuse.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[2:]
        outs = []
        for i, m in enumerate(maps):
            y = grid_of(self.proj[i](tokens_of(m)), m.shape[2], m.shape[3])
            if self.proj_bn is not None:
                y = self.act(self.proj_bn[i](y))
            if i > 0:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            outs.append(y)
        if self.style == "mlp":
            outs.reverse()
        x = self.act(self.bn(self.fuse(torch.cat(outs, dim=1))))
        # the maps are channels-last views; hand out plain NCHW logits (a small copy at 1/4 resolution)
        return self.classifier(self.dropout(x)).contiguous()


class FoldedHead(nn.Module):
    """The "mlp" decode head for deployment (eval only), with the fusion folded into the projections.

    Projection, bilinear upsampling, the fusing 1x1 conv and eval-mode BN are all linear, and upsampling acts per
    channel, so BN(fuse(cat_i(up(P_i x_i + p_i)))) == sum_i up(A F_i P_i x_i) + (A sum_i F_i p_i + c), with F_i the
    fuse block of stage i and A, c the BN scale and shift. The fusion then runs at each stage's own resolution
    instead of on 4 x D channels at 1/4 scale (MiT-B0 at 512x1024: 13.7 -> 5.1 GMACs in the paper's convention).
    "mmseg" heads put BN + ReLU after every projection, which does not fold.
    """

    def __init__(self, head: SegFormerHead) -> None:
        super().__init__()
        if head.proj_bn is not None or head.training:
            raise ValueError("FoldedHead: only an eval-mode 'mlp' head folds")
        d, n = head.fuse.out_channels, len(head.proj)
        with torch.no_grad():
            bn = head.bn
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            bias = bn.bias.double() - scale * bn.running_mean.double()
            fuse = head.fuse.weight.double()[:, :, 0, 0]
            self.proj = nn.ModuleList()
            for i, proj in enumerate(head.proj):
                k = n - 1 - i if head.style == "mlp" else i  # "mlp" concatenates the deepest stage first
                block = scale[:, None] * fuse[:, k * d:(k + 1) * d]
                lin = nn.Linear(proj.in_features, d, bias=False)
                lin.weight.copy_(block @ proj.weight.double())
                if proj.bias is not None:
                    bias += block @ proj.bias.double()
                self.proj.append(lin)
        self.bias = nn.Parameter(bias.float().view(1, d, 1, 1), requires_grad=False)
        self.act = nn.ReLU()
        self.classifier = copy.deepcopy(head.classifier)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[2:]
        x = grid_of(self.proj[0](tokens_of(maps[0])), maps[0].shape[2], maps[0].shape[3])
        for proj, m in zip(self.proj[1:], maps[1:]):
            y = grid_of(proj(tokens_of(m)), m.shape[2], m.shape[3])
            x = x + F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return self.classifier(self.act(x + self.bias)).contiguous()


class ConvMixFFN(nn.Module):
    """Mix-FFN for deployment: fc1 and fc2 as 1x1 convs on the grid, the same function. ONNX's Conv is NCHW
    only, so an exported token-layout Mix-FFN transposes its 4C hidden channels into and out of the depth-wise
    conv; this form transposes the C input channels once each way instead (ONNX Runtime CPU, MiT-B0 at
    512x1024: 121 -> 111 ms)."""

    def __init__(self, ffn: MixFFN) -> None:
        super().__init__()
        self.fc1, self.fc2 = (nn.Conv2d(lin.in_features, lin.out_features, 1) for lin in (ffn.fc1, ffn.fc2))
        with torch.no_grad():
            for conv, lin in ((self.fc1, ffn.fc1), (self.fc2, ffn.fc2)):
                conv.weight.copy_(lin.weight[:, :, None, None])
                conv.bias.copy_(lin.bias)
        self.dwconv = copy.deepcopy(ffn.dwconv)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return tokens_of(self.fc2(F.gelu(self.dwconv(self.fc1(grid_of(x, h, w))))))


def deploy_copy(model: SegFormer) -> SegFormer:
    """An eval-mode copy of `model` for export and inference, reparameterised with the same function: the
    decode head folded where it folds, Mix-FFNs as convolutions."""
    out = copy.deepcopy(model).eval()
    if isinstance(out.head, SegFormerHead) and out.head.proj_bn is None:  # a folded head stays as it is
        out.head = FoldedHead(out.head)
    for block in out.encoder.modules():
        if isinstance(getattr(block, "ffn", None), MixFFN):
            block.ffn = ConvMixFFN(block.ffn)
    return out


# the encoder of each backbone and the head of each head style (registry.py's BACKBONES and HEAD_STYLES)
ENCODERS = {"mit": MixTransformer, "lvt": LiteVisionTransformer}
HEADS = {"mlp": SegFormerHead, "mmseg": SegFormerHead, "fpn": SemanticFPN}


class SegFormer(nn.Module):
    """The segmentation network of every family: a four-stage encoder and a head on its stage maps. Its `config`
    fixes the architecture, its `meta` travels into every sidecar."""

    def __init__(self, config: SegFormerConfig, meta: ModelMeta | None = None) -> None:
        super().__init__()
        self.config = config
        self.meta = meta or ModelMeta.default(config.num_classes)
        self.encoder = ENCODERS[config.backbone](config)
        self.head = HEADS[config.head_style](config)
        self.encoder.reset_parameters()
        self.head.reset_parameters()

    def _check_input(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return  # shapes are fixed while exporting; checking them would only bake constants into the graph
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"model input: expected a B x 3 x H x W float tensor (normalised RGB), got {shape}")
        if x.shape[2] < MIN_INPUT_SIDE or x.shape[3] < MIN_INPUT_SIDE:
            raise InputError(
                f"model input: {x.shape[2]} x {x.shape[3]} is too small, expected H and W >= {MIN_INPUT_SIDE}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at 1/4 of the input resolution (ceil for sizes that are not multiples of 4)."""
        self._check_input(x)
        maps, _, _ = self.encoder(x)
        return self.head(maps)

    def features(self, x: torch.Tensor) -> Taps:
        """One forward pass that also returns the stage maps and patch embeddings distillation compares."""
        self._check_input(x)
        maps, embeddings, sizes = self.encoder(x)
        return Taps(embeddings, sizes, maps, self.head(maps), x)


def build_model(variant: str = "mit_b0", num_classes: int = 19, **overrides) -> SegFormer:
    """A randomly initialised model of a registry variant (`mit_b0`..`mit_b5`, `pvt_v2_b0`..`pvt_v2_b5`, `lvt`);
    overrides set config fields."""
    return SegFormer(SegFormerConfig.from_variant(variant, num_classes, **overrides))


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ModelMeta", "SegFormer", "SegFormerHead", "Taps", "build_model"]
