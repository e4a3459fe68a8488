"""SegFormer / MiT models: parameter anchors, taps, odd input sizes, clear errors."""

import pytest
import torch

from pipeline.errors import InputError
from pipeline.models import VARIANTS, SegFormerConfig, build_model
from tests.conftest import max_diff, n_params


def test_parameter_anchors_of_the_reference_pair():
    # docs/method.md: B0 3,719,027 and B2 27.36 M parameters with 19 classes
    assert n_params(build_model("mit_b0", num_classes=19)) == 3_719_027
    assert round(n_params(build_model("mit_b2", num_classes=19)) / 1e6, 2) == 27.36


def test_parameter_anchors_of_the_other_families():
    # counted by building the TransKD reference code's own models with 19 outputs (docs/method.md section 8)
    pvt_b0, pvt_b2 = build_model("pvt_v2_b0"), build_model("pvt_v2_b2")
    assert (n_params(pvt_b0), n_params(pvt_b0.encoder)) == (7_527_539, 3_409_760)
    assert (n_params(pvt_b2), n_params(pvt_b2.encoder)) == (29_098_707, 24_849_856)
    lvt = build_model("lvt")
    assert (n_params(lvt), n_params(lvt.encoder)) == (3_836_919, 3_429_092)
    assert n_params(build_model("lvt", num_classes=20)) == 3_837_176  # the reference's 19 classes + void


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_builds_from_the_table_and_runs(variant):
    row = VARIANTS[variant]
    model = build_model(variant, num_classes=7).eval()
    assert model.config.variant == variant and model.config.mlp_ratios == row.mlp_ratios
    assert [len(s.blocks) for s in model.encoder.stages] == list(row.depths)
    assert [s.embed.proj.out_channels for s in model.encoder.stages] == list(row.dims)
    assert [s.blocks[0].attn.heads for s in model.encoder.stages] == list(row.heads)
    assert [s.blocks[0].ffn.fc1.out_features for s in model.encoder.stages] == [
        c * r for c, r in zip(row.dims, row.mlp_ratios)]
    if row.head_style == "fpn":
        assert [c.out_channels for c in model.head.lateral] == [row.decoder_dim] * 4
        assert model.head.classifier.in_channels == row.fpn_channels
    else:
        assert model.head.fuse.out_channels == row.decoder_dim
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7, 16, 16)
        taps = model.features(torch.randn(2, 3, 64, 96))
    assert taps.sizes == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [e.shape for e in taps.embeddings] == [(2, h * w, c) for (h, w), c in zip(taps.sizes, row.dims)]
    assert [m.shape for m in taps.maps] == [(2, c, h, w) for (h, w), c in zip(taps.sizes, row.dims)]


def test_features_return_the_distillation_taps():
    model = build_model("mit_b0").eval()
    x = torch.randn(2, 3, 128, 256)
    with torch.inference_mode():
        taps = model.features(x)
        logits = model(x)
    assert taps.sizes == [(32, 64), (16, 32), (8, 16), (4, 8)]
    for emb, (h, w), fmap, c in zip(taps.embeddings, taps.sizes, taps.maps, (32, 64, 160, 256)):
        assert emb.shape == (2, h * w, c)
        assert fmap.shape == (2, c, h, w)
    # the embedding is the LayerNormed patch tokens: zero mean, unit variance per token before the affine
    stage = model.encoder.stages[0]
    raw = stage.embed.proj(x).flatten(2).transpose(1, 2)
    expected = torch.nn.functional.layer_norm(raw, (32,), stage.embed.norm.weight, stage.embed.norm.bias, 1e-5)
    assert torch.allclose(taps.embeddings[0], expected, atol=1e-5)
    assert torch.equal(taps.logits, logits)
    assert logits.shape == (2, 19, 32, 64)


@pytest.mark.parametrize("size", [(200, 328), (97, 131), (33, 45)])
def test_sizes_that_are_not_multiples_of_32(size):
    h, w = size
    model = build_model("mit_b0").eval()
    with torch.inference_mode():
        out = model(torch.randn(1, 3, h, w))
    assert out.shape == (1, 19, -(-h // 4), -(-w // 4))
    assert torch.isfinite(out).all()


def test_gradients_reach_every_parameter():
    model = build_model("mit_b0", num_classes=5).train()
    model(torch.randn(2, 3, 64, 96)).logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_mmseg_style_head_differs_only_in_the_head():
    mlp = build_model("mit_b0")
    mmseg = build_model("mit_b0", head_style="mmseg")
    d = 256
    # per stage: no linear bias (-d), a BatchNorm with weight and bias (+2d)
    assert n_params(mmseg) - n_params(mlp) == 4 * d


def test_unknown_variant_names_the_close_matches():
    with pytest.raises(InputError, match=r"unknown model variant 'mit_b9'.*mit_b"):
        build_model("mit_b9")
    with pytest.raises(InputError, match="num_classes"):
        build_model("mit_b0", num_classes=0)
    with pytest.raises(InputError, match="unknown field.*depth"):
        build_model("mit_b0", depth=(1, 1, 1, 1))
    with pytest.raises(InputError, match="head_style 'unet', expected one of 'mlp', 'mmseg', 'fpn'"):
        SegFormerConfig.from_variant("mit_b0", head_style="unet")
    with pytest.raises(InputError, match="backbone 'resnet'"):
        SegFormerConfig.from_variant("mit_b0", backbone="resnet")
    with pytest.raises(InputError, match="mlp_ratios has 3 entries, expected 4"):
        build_model("pvt_v2_b0", mlp_ratios=(8, 8, 4))


def test_a_table_architecture_keeps_its_name_and_a_changed_one_is_custom():
    assert build_model("mit_b0", head_style="mmseg").config.variant == "mit_b0"
    assert build_model("mit_b0", mlp_ratios=(8, 8, 4, 4)).config.variant == "custom"
    # PVTv2-B0's encoder is MiT-B0's with MLP ratios 8/8/4/4; with the all-MLP head it is neither table row
    assert build_model("pvt_v2_b0", head_style="mlp").config.variant == "custom"
    assert build_model("mit_b5", mlp_ratios=(4, 4, 4, 4), head_style="fpn").config.variant == "custom"


def test_a_sidecar_config_from_before_the_registry_reads_its_single_mlp_ratio():
    old = {"variant": "mit_b0", "dims": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "heads": [1, 2, 5, 8],
           "decoder_dim": 256, "mlp_ratio": 4}
    cfg = SegFormerConfig.from_dict(old)
    assert cfg.mlp_ratios == (4, 4, 4, 4) and cfg.backbone == "mit" and cfg.head_style == "mlp"


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 1, 64, 64), (1, 4, 64, 64), (1, 3, 64, 64, 1)])
def test_wrong_input_rank_or_channels(shape):
    model = build_model("mit_b0").eval()
    with pytest.raises(InputError, match=r"expected a B x 3 x H x W"):
        model(torch.randn(*shape))


def test_too_small_input_is_refused():
    with pytest.raises(InputError, match=">= 32"):
        build_model("mit_b0").eval()(torch.randn(1, 3, 16, 64))


def _random_bn_stats(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    return model.eval()


@pytest.mark.parametrize("variant", ["mit_b0", "mit_b1"])
def test_deploy_copy_gives_the_same_logits_with_far_fewer_macs(variant):
    from pipeline.flops import count_model
    from pipeline.models import deploy_copy
    from pipeline.models.segformer import ConvMixFFN, FoldedHead

    model = _random_bn_stats(build_model(variant))
    folded = deploy_copy(model)
    assert isinstance(folded.head, FoldedHead) and not isinstance(model.head, FoldedHead)  # the original is kept
    assert all(isinstance(b.ffn, ConvMixFFN) for b in folded.encoder.modules() if hasattr(b, "ffn"))
    again = deploy_copy(folded)  # a deploy copy is a fixed point
    assert type(again.head) is FoldedHead and all(torch.equal(a, b) for a, b in zip(again.parameters(),
                                                                                  folded.parameters()))
    x = torch.randn(2, 3, 96, 160)
    with torch.inference_mode():
        ref, out = model(x), folded(x)
    assert max_diff(ref, out) <= 1e-4 * ref.abs().max().item()
    # what goes is the fusion conv on 4 x D channels at 1/4 scale; all the rest costs what it did
    fuse = model.head.fuse.in_channels * model.head.fuse.out_channels * (512 // 4) * (1024 // 4)
    saved = count_model(model, (512, 1024)).full - count_model(folded, (512, 1024)).full
    assert 0.9 * fuse < saved <= fuse


def test_mmseg_head_is_not_folded():
    from pipeline.models import deploy_copy
    from pipeline.models.segformer import FoldedHead

    model = _random_bn_stats(build_model("mit_b0", head_style="mmseg"))
    copy = deploy_copy(model)
    assert not isinstance(copy.head, FoldedHead) and copy is not model
    with pytest.raises(ValueError, match="only an eval-mode 'mlp' head folds"):
        FoldedHead(model.head)
