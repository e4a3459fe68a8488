"""The LVT encoder: parameter count, agreement with an independent reference-layout implementation, the one-hot
unfold/fold, ONNX opset-17 export, attention MACs, initialisation and bf16 autocast."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.lvt import ConvSelfAttention, LiteVisionTransformer, RecursiveAtrousSelfAttention
from pipeline.models.registry import SegFormerConfig
from tests.conftest import max_diff
from tests.reference_lvt import RENAMES, RefLVT

LVT_BACKBONE_PARAMS = 3_429_092  # the anchor: TransKD's lvt() backbone


def make_lvt() -> LiteVisionTransformer:
    return LiteVisionTransformer(SegFormerConfig.from_variant("lvt")).eval()


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 1) -> None:
    """Every tensor its own random values (not the init, where many biases are 0 and norms 1), scaled by fan-in.

    Attention logits (CSA affinity, RASA q / kv) get gain 1 so the softmaxes stay peaked; every other matrix 0.7,
    which keeps maps and taps below ~5 after 8 residual blocks: fp32 rounding then stays near 4e-6, well inside
    the 1e-5 the comparison allows (gain 1 everywhere reaches 8e-6).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.dim() == 1:
            p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)  # LayerNorm weight / a bias
        else:
            gain = 1.0 if re.search(r"attn\.(affinity|q|kv)\.", name) else 0.7
            p.copy_(gain * noise / math.sqrt(p[0].numel()))


def to_reference(ours: dict[str, torch.Tensor], ref: nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict under the reference's names and shapes (its stage 2-4 MLP fc1/fc2 are 1x1 convs)."""
    target = ref.state_dict()
    out = {}
    for key, value in ours.items():
        for pattern, repl in RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value.reshape(target[key].shape)
    return out


def paired(seed: int = 1) -> tuple[LiteVisionTransformer, RefLVT]:
    ours, ref = make_lvt(), RefLVT().eval()
    randomise(ours, seed)
    ref.load_state_dict(to_reference(ours.state_dict(), ref), strict=True)
    return ours, ref


def compare(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        maps, taps, sizes = ours(x)
        ref_maps, ref_taps = ref(x)
    assert sizes == [tuple(m.shape[2:]) for m in ref_maps]
    return max(max_diff(a, b) for a, b in zip(maps + taps, ref_maps + ref_taps))


def test_parameter_count_matches_the_reference():
    assert sum(p.numel() for p in make_lvt().parameters()) == LVT_BACKBONE_PARAMS
    assert sum(p.numel() for p in RefLVT().parameters()) == LVT_BACKBONE_PARAMS


def test_one_hot_kernel_is_not_in_the_state_dict():
    keys = make_lvt().state_dict().keys()
    assert not [k for k in keys if "one_hot" in k]
    assert "stages.0.blocks.1.attn.value.weight" in keys and "stages.3.blocks.0.attn.atrous.weight" in keys


@pytest.mark.parametrize("size", [(7, 9), (8, 8), (9, 12), (18, 23)])
def test_one_hot_unfold_and_fold_equal_nn_unfold_and_f_fold(size):
    attn = ConvSelfAttention(4, 2)
    h, w = size
    x = torch.randn(2, 4, h, w)
    cols = F.conv2d(x, attn.one_hot, stride=2, padding=1, groups=4)
    hp, wp = cols.shape[2:]
    assert (hp, wp) == (math.ceil(h / 2), math.ceil(w / 2))
    assert max_diff(cols.reshape(2, 36, -1), nn.Unfold(3, padding=1, stride=2)(x)) == 0.0
    y = torch.randn(2, 36, hp, wp)
    assert max_diff(attn._fold(y, h, w), F.fold(y.reshape(2, 36, -1), (h, w), 3, padding=1, stride=2)) < 1e-6


@pytest.mark.parametrize("batch,size", [(1, (64, 64)), (2, (70, 90)), (1, (96, 160))])
def test_matches_the_reference_layout_implementation(batch, size):
    ours, ref = paired()
    x = torch.randn(batch, 3, *size)
    assert compare(ours, ref, x) <= 1e-5


def test_reference_comparison_catches_a_swapped_tensor():
    ours, ref = paired()
    x = torch.randn(1, 3, 64, 64)
    assert compare(ours, ref, x) <= 1e-5
    sd = ref.state_dict()
    a, b = "backbone.2.1.0.attn.q.weight", "backbone.2.1.1.attn.q.weight"  # same shape, different blocks
    sd[a], sd[b] = sd[b].clone(), sd[a].clone()
    ref.load_state_dict(sd)
    assert compare(ours, ref, x) > 1e-3


def test_batch_elements_are_independent():
    model = make_lvt()
    randomise(model)
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        both = model(x)[0]
        one = model(x[1:])[0]
    assert max(max_diff(a[1:], b) for a, b in zip(both, one)) < 1e-5


def test_bf16_autocast_on_cpu_tracks_fp32():
    model = make_lvt()
    randomise(model)
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        ref = model(x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)[0]
    for a, b in zip(ref, low):
        assert torch.isfinite(b).all()
        assert max_diff(a, b.float()) / a.abs().max().item() < 0.05


def test_initialisation_follows_the_reference():
    model = make_lvt()
    block0, block1 = model.stages[0].blocks[0], model.stages[1].blocks[0]
    # CSA value conv: std sqrt(2 / (9C)) = 0.0589 for C = 64 (the reference does not divide by its 9 groups)
    assert block0.attn.value.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)
    # patch embedding: sqrt(2 / (7*7*64)) = 0.0253
    assert model.stages[0].embed.proj.weight.std().item() == pytest.approx(math.sqrt(2 / (49 * 64)), rel=0.1)
    assert block0.attn.affinity.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block0.attn.affinity.bias.abs().max().item() == 0.0 and block0.ffn.fc1.bias.abs().max().item() == 0.0
    atrous = block1.attn.atrous.weight
    assert atrous.abs().max().item() <= math.sqrt(6 / 9) and atrous.std().item() > 0.3  # kaiming_uniform_, fan_in 9
    # Mix-FFN keeps PyTorch's default (a 1x1 conv's): bias U(+-1/sqrt(64)), weight std 1/sqrt(3 * 64)
    assert 0 < block1.ffn.fc1.bias.abs().max().item() <= 1 / 8
    assert block1.ffn.fc1.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 64), rel=0.05)
    assert model.stages[2].blocks[0].attn.sr.bias.abs().max().item() == 0.0


# Attention MACs at 512 x 1024, batch 1 (stage grids 128x256, 64x128, 32x64, 16x32; 2 blocks per stage):
#   stage 1 (CSA, C = 64): L = 64 * 128 = 8192 windows; unfold + attn@v + fold = 3 * 81 * 64 * 8192
#                          = 127,401,984 per block                                      -> 254,803,968
#   stage 2 (RASA, C = 64, R = 4): N = 8192, N' = 16 * 32 = 512; per pass Q K^T + A V = 2 * 8192 * 512 * 64
#                          = 536,870,912, atrous 27 * 8192 * 64 = 14,155,776; 2 passes = 1,102,053,376
#                          per block                                                    -> 2,204,106,752
#   stage 3 (C = 160, R = 2): N = 2048, N' = 512: 2 * (2 * 2048 * 512 * 160 + 27 * 2048 * 160) per block
#                          = 2 * (335,544,320 + 8,847,360) = 688,783,360                -> 1,377,566,720
#   stage 4 (C = 256, R = 1): N = N' = 512: 2 * (2 * 512 * 512 * 256 + 27 * 512 * 256) = 2 * (134,217,728
#                          + 3,538,944) = 275,513,344                                   -> 551,026,688
#   total                                                                               4,387,504,128
ATTENTION_MACS_512x1024 = 254_803_968 + 2_204_106_752 + 1_377_566_720 + 551_026_688


def test_attention_macs_at_512x1024():
    model = make_lvt()
    per_stage = [0, 0, 0, 0]
    handles = []
    for s, stage in enumerate(model.stages):
        for m in stage.modules():
            if hasattr(m, "attention_macs"):
                def hook(module, args, output, s=s):
                    per_stage[s] += module.attention_macs(*args)
                handles.append(m.register_forward_hook(hook))
    with torch.inference_mode():
        model(torch.zeros(1, 3, 512, 1024))
    for h in handles:
        h.remove()
    assert len(handles) == 8
    assert per_stage == [254_803_968, 2_204_106_752, 1_377_566_720, 551_026_688]
    assert sum(per_stage) == ATTENTION_MACS_512x1024 == 4_387_504_128


def test_rasa_macs_scale_with_the_recursions():
    attn = RecursiveAtrousSelfAttention(64, 2, 4, 1e-5)
    x = torch.zeros(1, 64 * 128, 64)
    assert attn.attention_macs(x, 64, 128) == 2 * (2 * 8192 * 512 * 64 + 27 * 8192 * 64)


class MapsOnly(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor):
        return tuple(m.contiguous() for m in self.encoder(x)[0])


def test_onnx_export_opset17_dynamic_size_runs_in_onnxruntime(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = make_lvt()
    randomise(model)
    wrapped = MapsOnly(model).eval()
    path = tmp_path / "lvt.onnx"
    names = [f"map{i}" for i in range(1, 5)]
    axes = {"image": {0: "batch", 2: "height", 3: "width"}, **{n: {0: "batch", 2: f"h{n}", 3: f"w{n}"} for n in names}}
    with torch.no_grad():
        torch.onnx.export(wrapped, (torch.zeros(1, 3, 64, 96),), str(path), opset_version=17, dynamo=False,
                          input_names=["image"], output_names=names, dynamic_axes=axes, do_constant_folding=True)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    ops = {(n.domain, n.op_type) for n in graph.graph.node}
    assert all(domain in ("", "ai.onnx") for domain, _ in ops), ops
    assert "Col2Im" not in {op for _, op in ops} and ("", "ConvTranspose") in ops
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [17]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, size in ((1, (70, 90)), (2, (128, 160))):
        x = torch.randn(batch, 3, *size)
        got = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            want = wrapped(x)
        for g, w in zip(got, want):
            assert max_diff(torch.from_numpy(g), w) <= 1e-4
