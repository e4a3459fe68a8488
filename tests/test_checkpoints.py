"""Checkpoint import and export: our safetensors + sidecar, Hugging Face, NVlabs, mmseg, the TransKD reference's
layout, encoder-only, bad files."""

import argparse
import json
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import SegformerConfig as HFConfig
from transformers import SegformerForImageClassification, SegformerForSemanticSegmentation

from pipeline.errors import CheckpointError, CheckpointWarning
from pipeline.models import VARIANTS, build_model, load_model, save_model
from pipeline.models.checkpoints import mapping_for
from tests.conftest import max_diff
from tests.reference_segformer import MmSegFormer, NvSegFormer, TkSegFormer, randomize_


def hf_model(variant: str, num_labels: int = 19, cls=SegformerForSemanticSegmentation):
    v = VARIANTS[variant]
    dims, depths, heads, dec = v.dims, v.depths, v.heads, v.decoder_dim
    cfg = HFConfig(hidden_sizes=list(dims), depths=list(depths), num_attention_heads=list(heads),
                   decoder_hidden_size=dec, num_labels=num_labels)
    return randomize_(cls(cfg))


def logits(model, x):
    with torch.inference_mode():
        out = model(x) if not hasattr(model, "segformer") else model(pixel_values=x).logits
    return out


# ------------------------------------------------------------------------------------------------ Hugging Face


@pytest.mark.parametrize("variant", ["mit_b0", "mit_b2"])
def test_hugging_face_save_pretrained_matches_transformers(tmp_path, variant):
    hf = hf_model(variant)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.config.variant == variant
    for size in [(128, 128), (200, 328)]:
        x = torch.randn(2, 3, *size)
        assert max_diff(logits(ours, x), logits(hf, x)) <= 1e-4


def test_hugging_face_bin_folder_and_state_dicts(tmp_path):
    hf = hf_model("mit_b0")
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randn(1, 3, 96, 160)
    ref = logits(hf, x)
    # an older transformers' folder: pytorch_model.bin with the same (save_pretrained) names
    legacy = load_file(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(legacy, tmp_path / "hf" / "pytorch_model.bin")
    assert max_diff(logits(load_model(tmp_path / "hf"), x), ref) <= 1e-4
    # a bare state dict from model.state_dict() of transformers >= 5 (renamed modules), as .pth and .safetensors
    torch.save(hf.state_dict(), tmp_path / "hf5.pth")
    assert max_diff(logits(load_model(tmp_path / "hf5.pth"), x), ref) <= 1e-4
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "hf5.safetensors")
    assert max_diff(logits(load_model(tmp_path / "hf5.safetensors"), x), ref) <= 1e-4
    # the legacy names without a config file, wrapped the way DDP saves them
    torch.save({"module." + k: v for k, v in legacy.items()}, tmp_path / "ddp.pth")
    assert max_diff(logits(load_model(tmp_path / "ddp.pth"), x), ref) <= 1e-4


def test_hugging_face_label_names_become_the_class_list(tmp_path):
    hf = hf_model("mit_b0", num_labels=3)
    hf.config.id2label = {0: "road", 1: "car", 2: "sky"}
    hf.config.label2id = {v: k for k, v in hf.config.id2label.items()}
    hf.save_pretrained(tmp_path / "hf")
    assert load_model(tmp_path / "hf").meta.classes == ["road", "car", "sky"]


def test_hugging_face_encoder_only_initialises_a_backbone(tmp_path):
    hf = hf_model("mit_b0", num_labels=1000, cls=SegformerForImageClassification)
    hf.save_pretrained(tmp_path / "imagenet")
    with pytest.raises(CheckpointError, match="encoder-only.*strict=False.*missing keys: head"):
        load_model(tmp_path / "imagenet")
    with pytest.warns(CheckpointWarning, match="unexpected keys: classifier.bias, classifier.weight"):
        ours = load_model(tmp_path / "imagenet", strict=False, num_classes=19)
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        hidden = hf.segformer(x, output_hidden_states=True).hidden_states
        maps = ours.features(x).maps
    for a, b in zip(maps, hidden):
        assert max_diff(a, b) <= 1e-4
    assert ours.config.num_classes == 19


# ------------------------------------------------------------------------------- NVlabs and mmseg key schemes


def _reference(kind: str, variant: str, classes: int = 19):
    v = VARIANTS[variant]
    dims, depths, heads, dec = v.dims, v.depths, v.heads, v.decoder_dim
    cls = NvSegFormer if kind == "nvlabs" else MmSegFormer
    return randomize_(cls(dims, depths, heads, dec, classes), seed=zlib.crc32(f"{kind}/{variant}".encode()))


@pytest.mark.parametrize("kind", ["nvlabs", "mmseg"])
@pytest.mark.parametrize("variant", ["mit_b0", "mit_b1"])
def test_foreign_full_checkpoints_reproduce_the_reference_logits(tmp_path, kind, variant):
    ref = _reference(kind, variant)
    classes = [f"c{i}" for i in range(19)]
    meta = {"CLASSES": classes} if kind == "nvlabs" else {"dataset_meta": {"classes": classes}}
    torch.save({"meta": meta, "state_dict": ref.state_dict()}, tmp_path / "segformer.pth")
    ours = load_model(tmp_path / "segformer.pth")
    assert ours.config.variant == variant
    assert ours.config.head_style == ("mmseg" if kind == "mmseg" else "mlp")
    assert ours.meta.classes == classes
    for size in [(128, 128), (200, 328)]:
        x = torch.randn(1, 3, *size)
        assert max_diff(logits(ours, x), logits(ref, x)) <= 1e-4


@pytest.mark.parametrize("kind", ["nvlabs", "mmseg"])
def test_a_swapped_pair_of_tensors_is_visible(tmp_path, kind):
    # the guard behind the test above: two same-shaped tensors exchanged change the logits well past 1e-4
    ref = _reference(kind, "mit_b0")
    sd = ref.state_dict()
    a, b = ("backbone.block1.0.norm1.weight", "backbone.block1.0.norm2.weight") if kind == "nvlabs" else (
        "backbone.layers.0.1.0.norm1.weight", "backbone.layers.0.1.0.norm2.weight")
    sd[a], sd[b] = sd[b].clone(), sd[a].clone()
    torch.save(sd, tmp_path / "swapped.pth")
    x = torch.randn(1, 3, 64, 96)
    assert max_diff(logits(load_model(tmp_path / "swapped.pth"), x), logits(ref, x)) > 1e-3


@pytest.mark.parametrize("kind", ["nvlabs", "mmseg"])
def test_encoder_only_imagenet_checkpoints(tmp_path, kind):
    ref = _reference(kind, "mit_b0")
    # ImageNet MiT files hold the bare encoder (no "backbone." prefix); NVlabs' also carries its classifier
    backbone = {k[len("backbone."):]: v for k, v in ref.state_dict().items() if k.startswith("backbone.")}
    if kind == "nvlabs":
        backbone.update({"head.weight": torch.randn(1000, 256), "head.bias": torch.randn(1000)})
    torch.save(backbone, tmp_path / "mit_b0.pth")
    with pytest.raises(CheckpointError, match=r"encoder-only checkpoint.*strict=False.*missing keys: head\.proj"):
        load_model(tmp_path / "mit_b0.pth")
    with pytest.warns(CheckpointWarning) as record:
        ours = load_model(tmp_path / "mit_b0.pth", strict=False, num_classes=21)
    message = str(record[0].message)
    assert "missing keys: head.proj.0.weight" in message
    assert ("unexpected keys: head.bias, head.weight" in message) == (kind == "nvlabs")
    assert ours.config.num_classes == 21 and ours.config.head_style == "mlp"
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        for a, b in zip(ours.features(x).maps, ref.backbone(x)):
            assert max_diff(a, b) <= 1e-4


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = _reference("nvlabs", "mit_b0").state_dict()
    del sd["backbone.block2.1.attn.kv.weight"]
    sd["backbone.block9.0.extra.weight"] = torch.zeros(3)
    torch.save({"state_dict": sd}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "broken.pth")
    text = str(err.value)
    assert "\n" not in text
    assert "missing keys: encoder.stages.1.blocks.1.attn.kv.weight" in text
    assert "unexpected keys: backbone.block9.0.extra.weight" in text


def test_new_class_count_replaces_the_classifier_non_strictly(tmp_path):
    ref = _reference("nvlabs", "mit_b0")
    torch.save(ref.state_dict(), tmp_path / "city.pth")
    with pytest.raises(CheckpointError, match="shape mismatch: decode_head.linear_pred.weight"):
        load_model(tmp_path / "city.pth", num_classes=21)
    with pytest.warns(CheckpointWarning, match="shape mismatch"):
        voc = load_model(tmp_path / "city.pth", strict=False, num_classes=21)
    assert voc.head.classifier.out_channels == 21
    assert torch.equal(voc.head.fuse.weight, ref.decode_head.linear_fuse.conv.weight)


# ----------------------------------------------------------------------- the TransKD reference code's own layout
# RuipingL/TransKD train/models/Segformer.py: `mit_b0`..`mit_b5` are one MixVisionTransformer module that also
# holds the all-MLP head, so its state dict has `patch_embed1.proj.weight`, `block1.0.attn.kv.weight`, `norm1.*`
# next to `linear_c1..4.proj.*`, `linear_fuse.conv.weight`, `linear_fuse.bn.*` and `linear_pred.*`. Its training
# scripts torch.save model.state_dict() (`module.`-prefixed under nn.DataParallel) or a resume dict holding it under
# `state_dict` beside the epoch, the model's repr and the best score.


def _transkd_reference(variant: str, classes: int = 19):
    v = VARIANTS[variant]
    dims, depths, heads, dec = v.dims, v.depths, v.heads, v.decoder_dim
    return randomize_(TkSegFormer(dims, depths, heads, dec, classes), seed=zlib.crc32(f"transkd/{variant}".encode()))


def _save_transkd(ref, path, wrapping: str):
    sd = ref.state_dict()
    if wrapping == "data_parallel":
        sd = {f"module.{k}": v for k, v in sd.items()}
    if wrapping == "resume_dict":
        sd = {"epoch": 7, "arch": repr(ref), "state_dict": sd, "best_acc": 0.5}
    torch.save(sd, path)


@pytest.mark.parametrize("wrapping", ["state_dict", "data_parallel", "resume_dict"])
@pytest.mark.parametrize("variant", ["mit_b0", "mit_b1"])
def test_transkd_reference_checkpoints_load_with_their_head(tmp_path, variant, wrapping):
    ref = _transkd_reference(variant)
    assert any(k.startswith("linear_pred.") for k in ref.state_dict())  # the head really is at the top level
    _save_transkd(ref, tmp_path / "model_best.pth", wrapping)
    ours = load_model(tmp_path / "model_best.pth")  # strict: every tensor of the file used, every one of ours filled
    assert ours.config.variant == variant and ours.config.head_style == "mlp" and ours.config.num_classes == 19
    assert ours.meta.source.startswith("TransKD reference SegFormer")
    ours, ref = ours.double(), ref.double()
    for size in [(128, 128), (72, 104)]:  # the second is no multiple of 32
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        assert max_diff(logits(ours, x), logits(ref, x)) <= 1e-5


def test_transkd_reference_swapped_head_tensors_are_visible(tmp_path):
    # the guard behind the test above: two same-shaped head tensors exchanged change the logits well past 1e-5
    ref = _transkd_reference("mit_b0")
    sd = ref.state_dict()
    sd["linear_c1.proj.bias"], sd["linear_c2.proj.bias"] = sd["linear_c2.proj.bias"], sd["linear_c1.proj.bias"]
    torch.save(sd, tmp_path / "swapped.pth")
    x = torch.randn(1, 3, 64, 96)
    assert max_diff(logits(load_model(tmp_path / "swapped.pth"), x), logits(ref, x)) > 1e-3


@pytest.mark.parametrize("dropped, ours_name", [("linear_pred.weight", "head.classifier.weight"),
                                                ("linear_fuse.conv.weight", "head.fuse.weight"),
                                                ("linear_c3.proj.bias", "head.proj.2.bias"),
                                                ("linear_fuse.bn.running_var", "head.bn.running_var")])
def test_transkd_reference_missing_head_tensor_is_named(tmp_path, dropped, ours_name):
    sd = _transkd_reference("mit_b0").state_dict()
    del sd[dropped]
    torch.save(sd, tmp_path / "damaged.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "damaged.pth")
    text = str(err.value)
    assert "\n" not in text
    assert "TransKD reference SegFormer" in text and "encoder-only" not in text
    assert f"missing keys: {ours_name}" in text and "unexpected keys" not in text


def test_mapping_table_covers_every_tensor_once():
    for head_style, formats in (("mlp", ("ours", "nvlabs", "hf", "transkd")), ("mmseg", ("ours", "mmseg"))):
        model = build_model("mit_b2", head_style=head_style)
        for fmt in formats:
            mapping = mapping_for(model, fmt, "backbone." if fmt != "hf" else "segformer.")
            assert set(mapping) == set(model.state_dict()), fmt
            foreign = [n for _, names in mapping.values() for n in names]
            if fmt != "mmseg":  # mmseg's packed in_proj feeds both q and kv
                assert len(foreign) == len(set(foreign)), fmt


# ------------------------------------------------------------------------------------------ our own format


def test_save_and_load_round_trip(tmp_path):
    model = randomize_(build_model("mit_b0"))
    model.meta.input_size = (256, 512)
    path = save_model(model, tmp_path / "student.safetensors", source="unit test")
    sidecar = json.loads((tmp_path / "student.safetensors.json").read_text())
    assert sidecar["schema"] == "transkd-deploy/artifact" and sidecar["kind"] == "checkpoint"
    assert sidecar["variant"] == "mit_b0" and sidecar["num_classes"] == 19
    assert sidecar["classes"][0] == "road" and len(sidecar["palette"]) == 19
    assert sidecar["normalization"]["mean"] == [123.675, 116.28, 103.53]
    assert sidecar["contract"]["size"] == [256, 512] and sidecar["source"] == "unit test"
    assert len(sidecar["sha256"]) == 64
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    loaded = load_model(path)
    assert loaded.meta.input_size == (256, 512)
    x = torch.randn(1, 3, 96, 128)
    assert torch.equal(logits(loaded, x), logits(model, x))
    # the file is a plain state dict of the deployable model: it loads strictly into build_model
    build_model("mit_b0").load_state_dict(load_file(path), strict=True)


def test_custom_architecture_round_trips_through_the_sidecar(tmp_path):
    model = randomize_(build_model("mit_b0", num_classes=4, heads=(1, 1, 1, 1), norm_eps=(1e-5, 1e-5, 1e-5)))
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.config == model.config
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_a_sidecar_config_with_unknown_fields_is_refused(tmp_path):
    save_model(build_model("mit_b0"), tmp_path / "student.safetensors")
    side = tmp_path / "student.safetensors.json"
    info = json.loads(side.read_text())
    info["details"]["config"]["window"] = 7
    side.write_text(json.dumps(info))
    with pytest.raises(CheckpointError,
                       match=r"student\.safetensors\.json: details\.config: .*unknown field\(s\) window"):
        load_model(tmp_path / "student.safetensors")


def test_a_sidecar_missing_a_field_or_of_an_older_version_is_one_line(tmp_path):
    save_model(build_model("mit_b0"), tmp_path / "student.safetensors")
    side = tmp_path / "student.safetensors.json"
    info = json.loads(side.read_text())
    for field, change in (("classes", lambda d: d.pop("classes")),
                          ("details.config", lambda d: d["details"].pop("config")),
                          ("normalization.std", lambda d: d["normalization"].update(std="x"))):
        broken = json.loads(json.dumps(info))
        change(broken)
        side.write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=rf"student\.safetensors\.json: field '{field}'") as e:
            load_model(tmp_path / "student.safetensors")
        assert "\n" not in str(e.value)
    side.unlink()
    (tmp_path / "student.json").write_text(json.dumps({"format": "transkd-deploy/segformer", "classes": ["a"]}))
    with pytest.raises(CheckpointError, match=r"student\.json: a sidecar of an older version .*'schema' missing"):
        load_model(tmp_path / "student.safetensors")


def test_weights_changed_after_the_sidecar_are_refused(tmp_path):
    model = build_model("mit_b0")
    save_model(model, tmp_path / "student.safetensors")
    state = load_file(tmp_path / "student.safetensors")
    state["head.classifier.bias"] += 1
    save_file(state, tmp_path / "student.safetensors")
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_model(tmp_path / "student.safetensors")


# ------------------------------------------------------------------------------------------------- bad files


def test_bad_files_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "absent.pth")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, tmp_path / "r.pth")
    with pytest.raises(CheckpointError, match=r"r\.pth: not a SegFormer/MiT checkpoint.*first keys: conv1.weight"):
        load_model(tmp_path / "r.pth")
    torch.save(_reference("nvlabs", "mit_b0").state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: not a readable PyTorch checkpoint"):
        load_model(tmp_path / "cut.pth")
    save_model(build_model("mit_b0"), tmp_path / "s.safetensors")
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:1000])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a readable safetensors file"):
        load_model(tmp_path / "cut.safetensors")
    torch.save({"args": argparse.Namespace(lr=1), "state_dict": {}}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match=r"refused to unpickle the global argparse.Namespace.*weights_only"):
        load_model(tmp_path / "pickled.pth")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "folder")
    for bad in ("absent.pth", "r.pth", "cut.pth", "cut.safetensors", "pickled.pth", "folder"):
        with pytest.raises(CheckpointError) as e:
            load_model(tmp_path / bad)
        assert "\n" not in str(e.value) and bad in str(e.value)
