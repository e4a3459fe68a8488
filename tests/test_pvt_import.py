"""Checkpoint import of the PVTv2 and LVT families: TransKD reference, mmseg 0.x, whai362 ImageNet, Hugging Face PvtV2
and LVT files, written here from our own models by writers independent of the mapping table."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file
from transformers import PvtV2Config, PvtV2ForImageClassification, PvtV2Model

from pipeline.errors import CheckpointError, CheckpointWarning
from pipeline.models import build_model, load_model, save_model
from pipeline.models.checkpoints import mapping_for
from tests.conftest import max_diff
from tests.reference_lvt import RefLVT
from tests.reference_segformer import randomize_

_STAGE = re.compile(r"encoder\.stages\.(\d+)\.(.*)")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.*)")


def _ours(variant: str, seed: int = 1):
    """One of our models with its own random value in every tensor, so any swap or misplacement shows."""
    return randomize_(build_model(variant), seed=seed)


# ------------------------------------------------------------------ writers: our names -> the foreign layouts


def _nvlabs_block(part: str) -> str:
    """Inside one block, our names -> NVlabs/whai362 PVTv2's (attention's reduction norm is `attn.norm`, the MLP is
    `mlp`, its depth-wise conv sits in a DWConv wrapper)."""
    for ours, theirs in (("attn.sr_norm.", "attn.norm."), ("ffn.dwconv.", "mlp.dwconv.dwconv."), ("ffn.", "mlp.")):
        if part.startswith(ours):
            return theirs + part[len(ours):]
    return part


def _pvt_encoder(key: str, tensor: torch.Tensor, prefix: str) -> dict:
    s, rest = _STAGE.fullmatch(key).groups()
    s1 = int(s) + 1
    if rest.startswith("embed."):
        return {f"{prefix}patch_embed{s1}.{rest[len('embed.'):]}": tensor}
    if rest.startswith("norm."):
        return {f"{prefix}norm{s1}.{rest[len('norm.'):]}": tensor}
    b, part = _BLOCK.fullmatch(rest).groups()
    return {f"{prefix}block{s1}.{b}.{_nvlabs_block(part)}": tensor}


def _fpn_head(key: str, tensor: torch.Tensor, head: str) -> dict:
    """Our Semantic FPN -> mmseg's FPN neck (`neck.`) and FPNHead (`head` prefix); ConvModules keep the conv in
    `.conv`, and a scale head's Upsample modules take the odd Sequential indices."""
    parts = key.split(".")
    if parts[1] == "lateral":
        return {f"neck.lateral_convs.{parts[2]}.conv.{parts[3]}": tensor}
    if parts[1] == "smooth":
        return {f"neck.fpn_convs.{parts[2]}.conv.{parts[3]}": tensor}
    if parts[1] == "scale":
        return {f"{head}scale_heads.{parts[2]}.{2 * int(parts[3])}.conv.{parts[4]}": tensor}
    assert parts[1] == "classifier", key
    return {f"{head}conv_seg.{parts[2]}": tensor}


def write_pvt(model, head: str | None = "head.", encoder_prefix: str = "backbone.") -> dict:
    """The TransKD reference's PVTv2 state dict (head "head."), mmseg 0.x Semantic FPN (head "decode_head.") or,
    with head None and no prefix, a whai362 ImageNet encoder (its 1000-class classifier added by the caller)."""
    out: dict = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("encoder."):
            out.update(_pvt_encoder(key, tensor, encoder_prefix))
        elif head is not None:
            out.update(_fpn_head(key, tensor, head))
    return out


_HF_BLOCK = {"norm1.": "layer_norm_1.", "norm2.": "layer_norm_2.", "attn.q.": "attention.query.",
             "attn.sr.": "attention.spatial_reduction.", "attn.sr_norm.": "attention.layer_norm.",
             "attn.proj.": "attention.proj.", "ffn.fc1.": "mlp.dense1.", "ffn.dwconv.": "mlp.dwconv.dwconv.",
             "ffn.fc2.": "mlp.dense2."}


def write_hf_pvt(model, prefix: str = "") -> dict:
    """Hugging Face PvtV2Model names (prefix "pvt_v2." for PvtV2ForImageClassification); the head is dropped."""
    out: dict = {}
    for key, tensor in model.state_dict().items():
        if not key.startswith("encoder."):
            continue
        s, rest = _STAGE.fullmatch(key).groups()
        layer = f"{prefix}encoder.layers.{s}."
        if rest.startswith("embed."):
            out[layer + "patch_embedding." + rest[len("embed."):].replace("norm.", "layer_norm.")] = tensor
        elif rest.startswith("norm."):
            out[layer + "layer_norm." + rest[len("norm."):]] = tensor
        else:
            b, part = _BLOCK.fullmatch(rest).groups()
            block = f"{layer}blocks.{b}."
            if part.startswith("attn.kv."):  # one packed key|value Linear -> separate key and value
                key_half, value_half = tensor.chunk(2, dim=0)
                out[block + "attention.key." + part[len("attn.kv."):]] = key_half
                out[block + "attention.value." + part[len("attn.kv."):]] = value_half
                continue
            ours = next(o for o in _HF_BLOCK if part.startswith(o))
            out[block + _HF_BLOCK[ours] + part[len(ours):]] = tensor
    return out


_LVT_BLOCK = {"attn.affinity.": "attn.attn.", "attn.value.": "attn.weight.", "attn.atrous.": "attn.ds.",
              "attn.sr_norm.": "attn.norm.", "ffn.dwconv.": "mlp.depconv.", "ffn.": "mlp."}


def write_lvt(model, with_head: bool = True) -> dict:
    """The TransKD reference's LVT: stage s is `backbone.{s}` = Sequential(patch embed, Sequential(blocks)); its
    stage 2-4 MLPs are 1x1 Conv2d (4-D weights), stage 1's Linear; the all-MLP head at the top level."""
    out: dict = {}
    head_names = {"proj": "linear_c{}.proj", "fuse": "linear_fuse.conv", "bn": "linear_fuse.bn",
                  "classifier": "linear_pred"}
    for key, tensor in model.state_dict().items():
        if key.startswith("head."):
            if with_head:
                parts = key.split(".")
                if parts[1] == "proj":
                    out[f"linear_c{int(parts[2]) + 1}.proj.{parts[3]}"] = tensor
                else:
                    out[f"{head_names[parts[1]]}.{parts[2]}"] = tensor
            continue
        s, rest = _STAGE.fullmatch(key).groups()
        if rest.startswith("embed."):
            out[f"backbone.{s}.0.{rest[len('embed.'):]}"] = tensor
            continue
        b, part = _BLOCK.fullmatch(rest).groups()
        ours = next((o for o in _LVT_BLOCK if part.startswith(o)), "")
        name = _LVT_BLOCK.get(ours, "") + part[len(ours):]
        if int(s) > 0 and re.fullmatch(r"mlp\.fc[12]\.weight", name):
            tensor = tensor[:, :, None, None]
        out[f"backbone.{s}.1.{b}.{name}"] = tensor
    return out


def assert_same_tensors(loaded, model, only=None):
    expected = model.state_dict()
    got = loaded.state_dict()
    keys = [k for k in expected if only is None or k.startswith(only)]
    assert keys
    for k in keys:
        assert got[k].shape == expected[k].shape and torch.equal(got[k], expected[k]), k


# ------------------------------------------------------------------------------------------------ PVTv2 + FPN


@pytest.mark.parametrize("head, fmt_name", [("head.", "TransKD reference PVTv2"), ("decode_head.", "NVlabs")])
@pytest.mark.parametrize("wrapping", ["state_dict", "data_parallel_resume"])
def test_pvt_fpn_checkpoints_round_trip(tmp_path, head, fmt_name, wrapping):
    model = _ours("pvt_v2_b0")
    state = write_pvt(model, head)
    assert "neck.lateral_convs.3.conv.weight" in state and f"{head}scale_heads.3.4.conv.bias" in state
    if wrapping == "data_parallel_resume":
        state = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(state, tmp_path / "pvt.pth")
    ours = load_model(tmp_path / "pvt.pth")  # strict: every tensor used, every one of ours filled
    cfg = ours.config
    assert (cfg.variant, cfg.backbone, cfg.head_style) == ("pvt_v2_b0", "mit", "fpn")
    assert cfg.mlp_ratios == (8, 8, 4, 4) and cfg.decoder_dim == 256 and cfg.fpn_channels == 128
    assert cfg.norm_eps == (1e-5, 1e-6, 1e-5)  # whai362's: default patch-embed / reduction norms, 1e-6 elsewhere
    assert ours.meta.source.startswith(fmt_name)
    assert_same_tensors(ours, model)
    x = torch.randn(1, 3, 72, 104)
    with torch.inference_mode():
        assert torch.equal(ours(x), model(x))


def test_pvt_b2_with_other_classes_round_trips(tmp_path):
    model = randomize_(build_model("pvt_v2_b2", num_classes=5), seed=2)
    torch.save(write_pvt(model), tmp_path / "b2.pth")
    ours = load_model(tmp_path / "b2.pth")
    assert ours.config.variant == "pvt_v2_b2" and ours.config.num_classes == 5
    assert ours.config.depths == (3, 4, 6, 3)
    assert_same_tensors(ours, model)


def test_pvt_damaged_head_is_named_not_called_encoder_only(tmp_path):
    state = write_pvt(_ours("pvt_v2_b0"))
    del state["neck.lateral_convs.2.conv.weight"], state["head.scale_heads.3.2.conv.bias"]
    torch.save(state, tmp_path / "damaged.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "damaged.pth")
    text = str(err.value)
    assert "\n" not in text and "damaged.pth" in text and "encoder-only" not in text
    assert "missing keys: head.lateral.2.weight, head.scale.3.1.bias" in text and "unexpected" not in text


def test_pvt_v2_li_is_refused_in_one_line(tmp_path):
    # pvt_v2_b2_li: keys/values average-pooled to 7 x 7 and reduced by a 1x1 conv, another encoder than ours
    state = write_pvt(_ours("pvt_v2_b0"), head=None, encoder_prefix="")
    for b in range(2):
        state[f"block1.{b}.attn.sr.weight"] = torch.randn(32, 32, 1, 1)
    torch.save(state, tmp_path / "pvt_v2_b0_li.pth")
    with pytest.raises(CheckpointError, match=r"pvt_v2_b0_li\.pth: stage 1 .*1x1 conv \(PVTv2-Li") as err:
        load_model(tmp_path / "pvt_v2_b0_li.pth", strict=False)
    assert "\n" not in str(err.value)


def test_pvt_swapped_head_tensors_are_visible(tmp_path):
    # the guard behind the round trips: two same-shaped FPN tensors exchanged are no longer equal
    model = _ours("pvt_v2_b0")
    state = write_pvt(model)
    a, b = "head.scale_heads.2.0.conv.weight", "head.scale_heads.3.0.conv.weight"
    state[a], state[b] = state[b], state[a]
    torch.save(state, tmp_path / "swapped.pth")
    loaded = load_model(tmp_path / "swapped.pth")
    assert not torch.equal(loaded.head.scale[2][0].weight, model.head.scale[2][0].weight)


@pytest.mark.parametrize("variant", ["pvt_v2_b0", "pvt_v2_b1"])
def test_whai362_imagenet_pvt_initialises_an_encoder(tmp_path, variant):
    model = _ours(variant)
    state = write_pvt(model, head=None, encoder_prefix="")
    state.update({"head.weight": torch.randn(1000, model.config.dims[-1]), "head.bias": torch.randn(1000)})
    torch.save(state, tmp_path / f"{variant}.pth")
    with pytest.raises(CheckpointError, match=rf"{variant}\.pth .*encoder-only checkpoint.*strict=False.*"
                                              r"missing keys: head\.lateral\.0\.weight"):
        load_model(tmp_path / f"{variant}.pth")
    with pytest.warns(CheckpointWarning) as record:
        ours = load_model(tmp_path / f"{variant}.pth", strict=False, num_classes=7)
    message = str(record[0].message)
    assert "unexpected keys: head.bias, head.weight" in message  # the ImageNet classifier, skipped and listed
    assert ours.config.variant == variant and ours.config.head_style == "fpn" and ours.config.num_classes == 7
    assert_same_tensors(ours, model, only="encoder.")


def test_b5_encoder_alone_is_named_mit_and_with_fpn_pvt(tmp_path):
    # MiT-B5 and PVTv2-B5 encoders are the same numbers (MLP ratio 4 everywhere): the head decides the name
    model = build_model("pvt_v2_b5")
    torch.save(write_pvt(model), tmp_path / "fpn.pth")
    assert load_model(tmp_path / "fpn.pth").config.variant == "pvt_v2_b5"
    torch.save(write_pvt(model, head=None, encoder_prefix=""), tmp_path / "encoder.pth")
    with pytest.warns(CheckpointWarning, match="missing keys: head.proj.0.weight"):
        alone = load_model(tmp_path / "encoder.pth", strict=False)
    assert alone.config.variant == "mit_b5" and alone.config.head_style == "mlp"


# ------------------------------------------------------------------------------------------ Hugging Face PvtV2


def test_hf_pvt_writer_matches_transformers_names_and_round_trips(tmp_path):
    model = _ours("pvt_v2_b0")
    state = write_hf_pvt(model, prefix="pvt_v2.")
    hf = PvtV2ForImageClassification(PvtV2Config(num_labels=10))
    state.update({k: v for k, v in hf.state_dict().items() if k.startswith("classifier.")})
    hf.load_state_dict(state, strict=True)  # the writer's names are transformers' own
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "hf.safetensors")
    with pytest.warns(CheckpointWarning) as record:
        ours = load_model(tmp_path / "hf.safetensors", strict=False)
    message = str(record[0].message)
    assert "missing keys: head.lateral.0.weight" in message
    assert "unexpected keys: classifier.bias, classifier.weight" in message
    assert ours.config.variant == "pvt_v2_b0" and ours.config.mlp_ratios == (8, 8, 4, 4)
    assert ours.config.norm_eps == (1e-6, 1e-6, 1e-6)
    assert_same_tensors(ours, model, only="encoder.")


def _hf_pvt(**overrides):
    cfg = PvtV2Config(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], mlp_ratios=[8, 8, 4, 4],
                      num_attention_heads=[1, 2, 5, 8], sr_ratios=[8, 4, 2, 1], **overrides)
    return randomize_(PvtV2Model(cfg), seed=5)


@pytest.mark.parametrize("saved_as", ["state_dict", "save_pretrained"])
def test_hf_pvt_stage_outputs_equal_transformers(tmp_path, saved_as):
    hf = _hf_pvt()
    if saved_as == "state_dict":
        torch.save(hf.state_dict(), tmp_path / "pvt.pth")
        path = tmp_path / "pvt.pth"
    else:
        hf.save_pretrained(tmp_path / "pvt")
        path = tmp_path / "pvt"
    with pytest.warns(CheckpointWarning, match="missing keys: head"):
        ours = load_model(path, strict=False)
    assert ours.config.variant == "pvt_v2_b0" and ours.meta.source.startswith("Hugging Face PvtV2")
    for size in [(200, 296), (128, 160)]:  # the first is no multiple of 32
        x = torch.randn(2, 3, *size)
        with torch.inference_mode():
            maps = ours.features(x).maps
            hidden = hf(x, output_hidden_states=True).hidden_states
        assert len(maps) == len(hidden) == 4
        for a, b in zip(maps, hidden):
            assert max_diff(a, b) <= 1e-4


def test_hf_pvt_folder_layer_norm_eps_is_used(tmp_path):
    # a large epsilon makes a wrong one visible in the stage outputs
    hf = _hf_pvt(layer_norm_eps=1e-2)
    hf.save_pretrained(tmp_path / "pvt")
    with pytest.warns(CheckpointWarning):
        ours = load_model(tmp_path / "pvt", strict=False)
    assert ours.config.norm_eps == (1e-2, 1e-2, 1e-2)
    x = torch.randn(1, 3, 96, 128)
    with torch.inference_mode():
        for a, b in zip(ours.features(x).maps, hf(x, output_hidden_states=True).hidden_states):
            assert max_diff(a, b) <= 1e-4


@pytest.mark.parametrize("change, message", [
    ({"linear_attention": True}, r"config\.json: linear_attention is true \(PVTv2-Li\)"),
    ({"layer_norm_eps": "small"}, r"config\.json: layer_norm_eps 'small': expected a number"),
    ({"model_type": "pvt"}, r"config\.json: model_type is 'pvt', expected 'segformer' or 'pvt_v2'"),
])
def test_hf_pvt_folders_refused_in_one_line(tmp_path, change, message):
    _hf_pvt().save_pretrained(tmp_path / "pvt")
    config = json.loads((tmp_path / "pvt" / "config.json").read_text())
    (tmp_path / "pvt" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(tmp_path / "pvt", strict=False)
    assert "\n" not in str(err.value) and "pvt" in str(err.value)


# ---------------------------------------------------------------------------------------------------------- LVT


@pytest.mark.parametrize("wrapping", ["state_dict", "data_parallel"])
def test_lvt_reference_checkpoint_round_trips(tmp_path, wrapping):
    model = _ours("lvt")
    state = write_lvt(model)
    assert state["backbone.1.1.0.mlp.fc1.weight"].dim() == 4 and state["backbone.0.1.0.mlp.fc1.weight"].dim() == 2
    assert "backbone.0.1.1.attn.weight.weight" in state and "backbone.3.1.1.attn.ds.weight" in state
    if wrapping == "data_parallel":
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save(state, tmp_path / "lvt.pth")
    ours = load_model(tmp_path / "lvt.pth")
    cfg = ours.config
    assert (cfg.variant, cfg.backbone, cfg.head_style) == ("lvt", "lvt", "mlp")
    assert cfg == model.config  # reduction ratios, epsilons, dropout and stochastic depth as the registry's
    assert ours.meta.source.startswith("TransKD reference LVT")
    assert_same_tensors(ours, model)
    x = torch.randn(1, 3, 72, 104)
    with torch.inference_mode():
        assert torch.equal(ours(x), model(x))


def test_lvt_writer_names_are_the_reference_layout_and_import_exactly(tmp_path):
    # tests/reference_lvt.py is an independent LVT with the reference's module tree: the writer's names load into
    # it strictly, and its own random weights, imported, give its stage maps
    ref = randomize_(RefLVT(), seed=7)
    ref_names = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in write_lvt(_ours("lvt"), with_head=False).items()} == ref_names
    torch.save(ref.state_dict(), tmp_path / "ref_lvt.pth")
    with pytest.warns(CheckpointWarning, match="missing keys: head.proj.0.weight"):
        ours = load_model(tmp_path / "ref_lvt.pth", strict=False)
    assert ours.config.variant == "lvt" and ours.config.norm_eps == (1e-5, 1e-5, 1e-5)
    for size in [(128, 160), (200, 296)]:
        x = torch.randn(1, 3, *size)
        with torch.inference_mode():
            for a, b in zip(ours.features(x).maps, ref(x)[0]):
                assert max_diff(a, b) <= 1e-4


def test_lvt_imagenet_backbone_initialises_an_encoder(tmp_path):
    model = _ours("lvt")
    state = write_lvt(model, with_head=False)
    state.update({"norm.weight": torch.ones(256), "norm.bias": torch.zeros(256),
                  "head.weight": torch.randn(1000, 256), "head.bias": torch.randn(1000)})
    torch.save(state, tmp_path / "lvt_imagenet.pth")
    with pytest.raises(CheckpointError, match=r"lvt_imagenet\.pth .*encoder-only checkpoint.*strict=False"):
        load_model(tmp_path / "lvt_imagenet.pth")
    with pytest.warns(CheckpointWarning) as record:
        ours = load_model(tmp_path / "lvt_imagenet.pth", strict=False, num_classes=20)
    message = str(record[0].message)
    assert "missing keys: head.proj.0.weight" in message
    assert "unexpected keys: head.bias, head.weight, norm.bias, norm.weight" in message
    assert ours.config.variant == "lvt" and ours.config.num_classes == 20
    assert_same_tensors(ours, model, only="encoder.")


# ------------------------------------------------------------------------------------------- ours, and the table


@pytest.mark.parametrize("variant", ["pvt_v2_b0", "lvt"])
def test_save_and_load_round_trip(tmp_path, variant):
    model = _ours(variant)
    path = save_model(model, tmp_path / "student.safetensors")
    loaded = load_model(path)
    assert loaded.config == model.config
    assert_same_tensors(loaded, model)
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    # the bare weights without the sidecar: the architecture read off the tensors alone
    (tmp_path / "student.safetensors.json").unlink()
    bare = load_model(path)
    assert bare.config == model.config


def test_mapping_table_covers_every_tensor_once():
    for variant, formats in (("pvt_v2_b2", ("ours", "nvlabs", "transkd_pvt")), ("lvt", ("ours", "lvt"))):
        model = build_model(variant)
        for fmt in formats:
            mapping = mapping_for(model, fmt, "" if fmt == "lvt" else "backbone.")
            assert set(mapping) == set(model.state_dict()), (variant, fmt)
            foreign = [n for _, names in mapping.values() for n in names]
            assert len(foreign) == len(set(foreign)), (variant, fmt)
    encoder = {k for k in build_model("pvt_v2_b0").state_dict() if k.startswith("encoder.")}
    assert set(mapping_for(build_model("pvt_v2_b0"), "hf_pvt", "")) == encoder  # HF PvtV2 holds no head
