"""Load and save model weights: our safetensors + JSON sidecar, and imports from Hugging Face (SegFormer, PvtV2),
NVlabs/whai362, mmseg and the TransKD reference code (SegFormer, PVTv2 + Semantic FPN, LVT)."""

from __future__ import annotations

import json
import pickle
import re
import warnings
import zipfile
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline import artifacts
from pipeline.errors import CheckpointError, CheckpointWarning, InputError
from pipeline.models.registry import NORM_EPS, VARIANTS, SegFormerConfig, variant_of
from pipeline.models.segformer import ModelMeta, SegFormer

SAFETENSORS_FORMAT = "transkd-deploy/segformer"  # the safetensors header's own `format` metadata
# Detection order matters on ties (_detect): a format listed earlier wins when two find the same head.
FORMATS = ("ours", "nvlabs", "hf", "mmseg", "transkd", "transkd_pvt", "hf_pvt", "lvt")
COLUMNS = ("ours", "nvlabs", "hf", "mmseg", "hf_pvt", "lvt")  # the name columns of MAPPING, in order
# A format whose tensor names are another's, only under other scope prefixes, reads that format's MAPPING column.
SAME_NAMES = {"transkd": "nvlabs", "transkd_pvt": "nvlabs"}


class Cat:
    """Our tensor is the row-wise concatenation of several foreign tensors (Hugging Face key + value -> kv)."""

    def __init__(self, *names: str) -> None:
        self.names = names


class Rows:
    """Our tensor is rows [i/n, j/n) of one foreign tensor (mmseg's packed q|k|v in_proj -> q and kv)."""

    def __init__(self, name: str, i: int, j: int, n: int) -> None:
        self.names, self.i, self.j, self.n = (name,), i, j, n


class Conv1x1:
    """The foreign layer is a 1x1 Conv2d where ours is a Linear: weight O x I x 1 x 1 -> O x I (a 2-D foreign
    weight, LVT's stage-1 Linear MLP under the same name, passes as it is)."""

    def __init__(self, name: str) -> None:
        self.names = (name,)


# Where each of our tensors lives in the foreign formats. {s}: stage (0-based), {s1}: stage (1-based),
# {b}: block (or conv of an FPN scale head), {b2}: 2 * {b}, {p}: parameter or buffer name, {bb}: the backbone
# prefix found in the file ("backbone.", "segformer.", "pvt_v2." or "" for encoder-only files).
# None: the format has no such tensor (a None prefix: none of the scope).
#   nvlabs:      NVlabs/SegFormer (mmseg 0.x based): MixVisionTransformer under `backbone.`, SegFormerHead under
#                `decode_head.`. Also whai362/PVT's PVTv2 (the same encoder names; its ImageNet files hold the bare
#                encoder plus a classifier `head.*`) and mmseg 0.x Semantic FPN on it (`neck.`, `decode_head.`).
#   hf:          Hugging Face SegformerForSemanticSegmentation as save_pretrained writes it
#   mmseg:       mmsegmentation >= 0.20 and 1.x MixVisionTransformer + SegformerHead
#   transkd:     the TransKD reference code (RuipingL/TransKD, train/models/Segformer.py, `mit_b0`..`mit_b5`): one
#                module holds NVlabs' encoder and head side by side, so the head's `linear_c1..4`, `linear_fuse`
#                and `linear_pred` sit at the top level next to `patch_embed1`; names as NVlabs' (SAME_NAMES).
#                Its scripts save model.state_dict() (keys `module.`-prefixed under nn.DataParallel) or a dict
#                with it under `state_dict`.
#   transkd_pvt: the TransKD reference's PVTv2 (train/models/pvtv2): whai362's encoder under `backbone.`, mmseg's
#                FPN under `neck.` and its FPNHead under `head.` (not `decode_head.`); names as NVlabs'.
#   hf_pvt:      Hugging Face PvtV2Model / PvtV2Backbone (`encoder.layers.*`) and PvtV2ForImageClassification
#                (`pvt_v2.encoder.layers.*` + `classifier.*`): encoder only.
#   lvt:         the TransKD reference's LVT (train/models/lvt/backbone.py): stage s is `backbone.{s}`, an
#                nn.Sequential of the patch embedding (`.0`) and the blocks (`.1`); the all-MLP head at the top
#                level with TransKD SegFormer's names. LVT's ImageNet files: the same `backbone.` plus `norm.*`
#                and a classifier `head.*`.
SCOPES = {  # scope: prefix per format, in FORMATS order (ours, nvlabs, hf, mmseg, transkd, transkd_pvt, hf_pvt, lvt)
    "embed": ("encoder.stages.{s}.embed.", "{bb}patch_embed{s1}.", "{bb}encoder.patch_embeddings.{s}.",
              "{bb}layers.{s}.0.", "{bb}patch_embed{s1}.", "{bb}patch_embed{s1}.",
              "{bb}encoder.layers.{s}.patch_embedding.", "{bb}backbone.{s}.0."),
    "block": ("encoder.stages.{s}.blocks.{b}.", "{bb}block{s1}.{b}.", "{bb}encoder.block.{s}.{b}.",
              "{bb}layers.{s}.1.{b}.", "{bb}block{s1}.{b}.", "{bb}block{s1}.{b}.",
              "{bb}encoder.layers.{s}.blocks.{b}.", "{bb}backbone.{s}.1.{b}."),
    "stage": ("encoder.stages.{s}.", "{bb}", "{bb}encoder.", "{bb}layers.{s}.", "{bb}", "{bb}",
              "{bb}encoder.layers.{s}.", None),
    # the all-MLP (and mmseg) decode head
    "stage_head": ("head.", "decode_head.", "decode_head.", "decode_head.", "{bb}", None, None, "{bb}"),
    "head": ("head.", "decode_head.", "decode_head.", "decode_head.", "{bb}", None, None, "{bb}"),
    # the Semantic FPN: neck, scale heads, classifier
    "neck": ("head.", "neck.", None, None, None, "neck.", None, None),
    "scale": ("head.", "decode_head.", None, None, None, "head.", None, None),
    "fpn_head": ("head.", "decode_head.", None, None, None, "head.", None, None),
}
ENCODER_SCOPES = ("embed", "block", "stage")
HEAD_SCOPES = {"mlp": ("stage_head", "head"), "mmseg": ("stage_head", "head"), "fpn": ("neck", "scale", "fpn_head")}
MAPPING = [  # (scope, ours, nvlabs, hf, mmseg, hf_pvt, lvt); transkd and transkd_pvt read nvlabs' column
    ("embed", "proj.{p}", "proj.{p}", "proj.{p}", "projection.{p}", "proj.{p}", "proj.{p}"),
    ("embed", "norm.{p}", "norm.{p}", "layer_norm.{p}", "norm.{p}", "layer_norm.{p}", "norm.{p}"),
    ("block", "norm1.{p}", "norm1.{p}", "layer_norm_1.{p}", "norm1.{p}", "layer_norm_1.{p}", "norm1.{p}"),
    ("block", "attn.q.{p}", "attn.q.{p}", "attention.self.query.{p}", Rows("attn.attn.in_proj_{p}", 0, 1, 3),
     "attention.query.{p}", "attn.q.{p}"),
    ("block", "attn.kv.{p}", "attn.kv.{p}", Cat("attention.self.key.{p}", "attention.self.value.{p}"),
     Rows("attn.attn.in_proj_{p}", 1, 3, 3), Cat("attention.key.{p}", "attention.value.{p}"), "attn.kv.{p}"),
    ("block", "attn.sr.{p}", "attn.sr.{p}", "attention.self.sr.{p}", "attn.sr.{p}",
     "attention.spatial_reduction.{p}", "attn.sr.{p}"),
    ("block", "attn.sr_norm.{p}", "attn.norm.{p}", "attention.self.layer_norm.{p}", "attn.norm.{p}",
     "attention.layer_norm.{p}", "attn.norm.{p}"),
    ("block", "attn.proj.{p}", "attn.proj.{p}", "attention.output.dense.{p}", "attn.attn.out_proj.{p}",
     "attention.proj.{p}", "attn.proj.{p}"),
    # LVT only: stage 1's convolutional self-attention (CSA), stages 2-4's atrous query conv (RASA)
    ("block", "attn.affinity.{p}", None, None, None, None, "attn.attn.{p}"),
    ("block", "attn.value.{p}", None, None, None, None, "attn.weight.{p}"),
    ("block", "attn.atrous.{p}", None, None, None, None, "attn.ds.{p}"),
    ("block", "norm2.{p}", "norm2.{p}", "layer_norm_2.{p}", "norm2.{p}", "layer_norm_2.{p}", "norm2.{p}"),
    ("block", "ffn.fc1.{p}", "mlp.fc1.{p}", "mlp.dense1.{p}", Conv1x1("ffn.layers.0.{p}"), "mlp.dense1.{p}",
     Conv1x1("mlp.fc1.{p}")),
    ("block", "ffn.dwconv.{p}", "mlp.dwconv.dwconv.{p}", "mlp.dwconv.dwconv.{p}", "ffn.layers.1.{p}",
     "mlp.dwconv.dwconv.{p}", "mlp.depconv.{p}"),
    ("block", "ffn.fc2.{p}", "mlp.fc2.{p}", "mlp.dense2.{p}", Conv1x1("ffn.layers.4.{p}"), "mlp.dense2.{p}",
     Conv1x1("mlp.fc2.{p}")),
    ("stage", "norm.{p}", "norm{s1}.{p}", "layer_norm.{s}.{p}", "2.{p}", "layer_norm.{p}", None),
    ("stage_head", "proj.{s}.{p}", "linear_c{s1}.proj.{p}", "linear_c.{s}.proj.{p}", Conv1x1("convs.{s}.conv.{p}"),
     None, "linear_c{s1}.proj.{p}"),
    ("stage_head", "proj_bn.{s}.{p}", None, None, "convs.{s}.bn.{p}", None, None),
    ("head", "fuse.{p}", "linear_fuse.conv.{p}", "linear_fuse.{p}", "fusion_conv.conv.{p}", None,
     "linear_fuse.conv.{p}"),
    ("head", "bn.{p}", "linear_fuse.bn.{p}", "batch_norm.{p}", "fusion_conv.bn.{p}", None, "linear_fuse.bn.{p}"),
    ("head", "classifier.{p}", "linear_pred.{p}", "classifier.{p}", "conv_seg.{p}", None, "linear_pred.{p}"),
    # Semantic FPN (mmcv ConvModules without norm: `.conv` holds weight and bias); a scale head's nn.Upsample
    # modules sit between its convs, so conv k is Sequential index 2k
    ("neck", "lateral.{s}.{p}", "lateral_convs.{s}.conv.{p}", None, None, None, None),
    ("neck", "smooth.{s}.{p}", "fpn_convs.{s}.conv.{p}", None, None, None, None),
    ("scale", "scale.{s}.{b}.{p}", "scale_heads.{s}.{b2}.conv.{p}", None, None, None, None),
    ("fpn_head", "classifier.{p}", "conv_seg.{p}", None, None, None, None),
]
PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# Tensors a format carries that no model here uses: NVlabs' head inherits mmseg 0.x BaseDecodeHead, which
# always builds a `conv_seg` classifier; SegFormerHead predicts with `linear_pred` and leaves it untrained.
# (ImageNet classifiers, `head.*`, `classifier.*`, LVT's `norm.*`, are listed as unexpected keys instead: loading
# such a file needs strict=False anyway, and the warning says what was left out.)
UNUSED = {"nvlabs": re.compile(r"^decode_head\.conv_seg\.")}

# transformers >= 5 renamed SegFormer's modules in memory (save_pretrained still writes the names above);
# a state dict taken from such a model is renamed back first.
HF5_RENAMES = [
    (r"(^|\.)stages\.(\d+)\.patch_embeddings\.", r"\1encoder.patch_embeddings.\2."),
    (r"(^|\.)stages\.(\d+)\.blocks\.", r"\1encoder.block.\2."),
    (r"(^|\.)stages\.(\d+)\.layer_norm\.", r"\1encoder.layer_norm.\2."),
    (r"attention\.q_proj\.", "attention.self.query."),
    (r"attention\.k_proj\.", "attention.self.key."),
    (r"attention\.v_proj\.", "attention.self.value."),
    (r"attention\.sequence_reduction\.sequence_reduction\.", "attention.self.sr."),
    (r"attention\.sequence_reduction\.layer_norm\.", "attention.self.layer_norm."),
    (r"attention\.o_proj\.", "attention.output.dense."),
    (r"mlp\.fc1\.", "mlp.dense1."),
    (r"mlp\.fc2\.", "mlp.dense2."),
    (r"layernorm_before\.", "layer_norm_1."),
    (r"layernorm_after\.", "layer_norm_2."),
    (r"decode_head\.linear_projections\.", "decode_head.linear_c."),
]
FORMAT_NAMES = {"ours": "transkd-deploy", "nvlabs": "NVlabs/mmseg-0.x SegFormer", "hf": "Hugging Face SegFormer",
                "mmseg": "mmsegmentation MiT/SegFormer", "transkd": "TransKD reference SegFormer",
                "transkd_pvt": "TransKD reference PVTv2 + Semantic FPN", "hf_pvt": "Hugging Face PvtV2",
                "lvt": "TransKD reference LVT"}
HF_MODEL_TYPES = {"segformer": "hf", "pvt_v2": "hf_pvt"}  # config.json model_type -> format
# Stage 1 of LVT attends by CSA, which has no key/value reduction; its sr ratio is the config's default.
DEFAULT_SR = SegFormerConfig.__dataclass_fields__["sr_ratios"].default


def _cell(row: tuple, fmt: str):
    """The foreign-name cell of one MAPPING row for `fmt`."""
    return row[1 + COLUMNS.index(SAME_NAMES.get(fmt, fmt))]


def _foreign_names(scope: str, template, fmt: str, **idx) -> list[str] | None:
    """The foreign tensor names behind one table cell (several for Cat); None where the format has none."""
    prefix = SCOPES[scope][FORMATS.index(fmt)]
    if template is None or prefix is None:
        return None
    names = [template] if isinstance(template, str) else list(template.names)
    idx.setdefault("b2", 2 * idx.get("b", 0))
    return [(prefix + n).format(**idx) for n in names]


def _indices(scope: str, cfg: SegFormerConfig):
    """(stage, block) pairs a scope's rows run over."""
    if scope in ("head", "fpn_head"):
        return [(0, 0)]
    stages = range(len(cfg.dims))
    if scope == "block":
        return [(s, b) for s in stages for b in range(cfg.depths[s])]
    if scope == "scale":  # conv k of the level-s scale head; the ones the model lacks are dropped by name
        return [(s, k) for s in stages for k in range(len(cfg.dims))]
    return [(s, 0) for s in stages]


def mapping_for(model: SegFormer, fmt: str, bb: str) -> dict[str, tuple[object, list[str]]]:
    """Our state-dict key -> (transform, foreign names) for every tensor of `model` that `fmt` can hold, read off
    the table (the rows of the model's head style only: "classifier" is a row of each head)."""
    cfg = model.config
    ours = set(model.state_dict())
    scopes = ENCODER_SCOPES + HEAD_SCOPES[cfg.head_style]
    out: dict[str, tuple[object, list[str]]] = {}
    for row in MAPPING:
        scope, ours_t, foreign_t = row[0], row[1], _cell(row, fmt)
        if scope not in scopes:
            continue
        for s, b in _indices(scope, cfg):
            for p in PARAMS:
                idx = dict(s=s, s1=s + 1, b=b, p=p, bb=bb)
                key = (SCOPES[scope][0] + ours_t).format(**idx)
                names = _foreign_names(scope, foreign_t, fmt, **idx)
                if key in ours and names is not None:
                    out[key] = (foreign_t, names)
    return out


def _convert(template, tensors: list[torch.Tensor]) -> torch.Tensor:
    if isinstance(template, Cat):
        return torch.cat(tensors, dim=0)
    t = tensors[0]
    if isinstance(template, Rows):
        n = t.shape[0]
        return t[n * template.i // template.n : n * template.j // template.n]
    if isinstance(template, Conv1x1) and t.dim() == 4:
        return t.reshape(t.shape[0], t.shape[1])
    return t


# ---------------------------------------------------------------------------------------------- reading files


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"the global {m.group(1)}" if m else "a non-tensor object"
        raise CheckpointError(
            f"{path}: refused to unpickle {what} (foreign checkpoints load with weights_only=True); "
            "re-save its state dict alone, e.g. torch.save(ckpt['state_dict'], 'weights.pth')"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {first}") from None


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {first}") from None


def _read_hf_dir(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: a directory must be a Hugging Face save_pretrained folder with config.json")
    hf_config = _read_json(config_file)
    if hf_config.get("model_type") not in HF_MODEL_TYPES:
        raise CheckpointError(f"{config_file}: model_type is {hf_config.get('model_type')!r}, expected "
                              f"{' or '.join(repr(t) for t in HF_MODEL_TYPES)}")
    if hf_config.get("linear_attention"):  # PVTv2-Li: pooled keys/values and an extra ReLU, not our encoder
        raise CheckpointError(f"{config_file}: linear_attention is true (PVTv2-Li), which is not supported")
    for index_name, loader in (("model.safetensors.index.json", _safetensors_load),
                               ("pytorch_model.bin.index.json", _torch_load)):
        if (path / index_name).is_file():
            shards = sorted(set(_read_json(path / index_name).get("weight_map", {}).values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(loader(path / shard))
            return state, {"hf_config": hf_config}
    for name, loader in (("model.safetensors", _safetensors_load), ("pytorch_model.bin", _torch_load)):
        if (path / name).is_file():
            return loader(path / name), {"hf_config": hf_config}
    raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin beside config.json")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _legacy_sidecar(path: Path) -> bool:
    """`student.json` as save_model wrote it before the one artifact record (`student.safetensors.json`)."""
    old = path.with_suffix(".json")
    try:
        return old.is_file() and json.loads(old.read_text()).get("format") == SAFETENSORS_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The raw state dict of a file or folder, and what it says about itself (config, sidecar, meta)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        return _read_hf_dir(path)
    if path.suffix == ".safetensors":
        state, extra = _safetensors_load(path), {}
        if artifacts.sidecar_path(path).is_file():
            try:
                extra["sidecar"] = artifacts.read_sidecar(path, verify=True)
            except InputError as e:
                raise CheckpointError(str(e)) from None
        elif _legacy_sidecar(path):
            raise CheckpointError(f"{path.with_suffix('.json')}: a sidecar of an older version of this pipeline (field "
                                  f"'schema' missing; this version reads {artifacts.sidecar_path(path).name}); "
                                  "re-save the model with save_model, or move the old file away to load the "
                                  "weights alone")
        return state, extra
    obj = _torch_load(path)
    extra = {}
    if isinstance(obj, dict):
        if isinstance(obj.get("meta"), dict):
            extra["meta"] = obj["meta"]
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    return dict(obj), extra


# ----------------------------------------------------------------------------------- recognising the layout


def _detect(state: dict[str, torch.Tensor], path: Path) -> tuple[str, str]:
    """Which key scheme the file uses and the backbone prefix in front of its encoder keys: among the formats whose
    first encoder tensor is in the file, the one that finds the most head weights there, the first on a tie
    (NVlabs and the TransKD reference share encoder names and differ only in where the head sits)."""

    def head_weights(fmt: str, bb: str) -> int:
        names = set()
        for row in MAPPING:
            if row[0] not in ENCODER_SCOPES:
                for s in range(4):
                    for b in range(4):
                        names.update(_foreign_names(row[0], _cell(row, fmt), fmt, s=s, s1=s + 1, b=b, p="weight",
                                                    bb=bb) or ())
        return sum(n in state for n in names)

    found = []
    for fmt in FORMATS:
        (anchor,) = _foreign_names("embed", _cell(MAPPING[0], fmt), fmt, s=0, s1=1, p="weight", bb="")
        for key in state:
            if key.endswith(anchor):
                bb = key[: -len(anchor)]
                if bb == "" or bb.endswith("."):
                    found.append((fmt, bb))
                    break
    if found:
        return max(found, key=lambda f: head_weights(*f))  # max keeps the first of equals
    shown = ", ".join(list(state)[:4])
    raise CheckpointError(
        f"{path}: not a SegFormer/MiT checkpoint (nor PVTv2 or LVT); no key scheme of "
        f"{', '.join(FORMAT_NAMES.values())} matches (first keys: {shown})"
    )


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(re.search(r"(^|\.)stages\.0\.patch_embeddings\.proj\.weight$", k) for k in state):
        renamed = {}
        for k, v in state.items():
            for pattern, repl in HF5_RENAMES:
                k = re.sub(pattern, repl, k)
            renamed[k] = v
        state = renamed
    return state


def _tensor_getter(state: dict[str, torch.Tensor], fmt: str, bb: str):
    """get(scope, ours template, s, b): the file's weight behind one MAPPING cell, or None."""
    rows = {(r[0], r[1]): r for r in MAPPING}

    def get(scope: str, ours_t: str, s: int = 0, b: int = 0) -> torch.Tensor | None:
        names = _foreign_names(scope, _cell(rows[scope, ours_t], fmt), fmt, s=s, s1=s + 1, b=b, p="weight", bb=bb)
        return state.get(names[0]) if names else None

    return get


def _size(t: torch.Tensor | None, dim: int) -> int | None:
    return None if t is None else t.shape[dim]


def _encoder_layout(get, fmt: str, path: Path) -> dict:
    """The encoder's numbers from tensor shapes: widths, depths, kernel sizes, reduction and MLP ratios (fc1 rows
    per width, per stage: PVTv2 and LVT differ from MiT there) and the backbone (a CSA attention is LVT's)."""
    dims: list[int] = []
    depths, sr, patch, ratios = [], [], [], []
    while (proj := get("embed", "proj.{p}", len(dims))) is not None:
        s = len(dims)
        dims.append(proj.shape[0])
        patch.append(proj.shape[-1])
        depth = 0
        while get("block", "norm1.{p}", s, depth) is not None:
            depth += 1
        fc1 = get("block", "ffn.fc1.{p}", s)
        if fc1 is None or depth == 0:
            raise CheckpointError(f"{path}: {FORMAT_NAMES[fmt]} keys found, but stage blocks are missing")
        depths.append(depth)
        ratios.append(fc1.shape[0] // dims[s])
        csa = get("block", "attn.affinity.{p}", s) is not None
        reduction = _size(get("block", "attn.sr.{p}", s), -1)
        if reduction == 1:  # PVTv2-Li pools keys/values to 7 x 7, then a 1x1 conv: not the encoder built here
            raise CheckpointError(f"{path}: stage {s + 1} reduces keys/values with a 1x1 conv (PVTv2-Li linear "
                                  "attention), which is not supported")
        sr.append(reduction or (DEFAULT_SR[s] if csa else 1))
    return dict(dims=tuple(dims), depths=tuple(depths), sr_ratios=tuple(sr), mlp_ratios=tuple(ratios),
                patch_sizes=tuple(patch), strides=tuple((k + 1) // 2 for k in patch),
                backbone="lvt" if get("block", "attn.affinity.{p}", 0) is not None else "mit")


def _head_layout(get, fmt: str) -> dict | None:
    """The head the file holds (style, widths and classes where its tensors show them), None for an encoder-only
    file. One of a head's tensors missing leaves a damaged head, not an encoder-only file. The FPN is told by its
    neck and scale heads: its classifier's name, `decode_head.conv_seg`, is also in every NVlabs SegFormer file."""
    lateral, smooth = get("neck", "lateral.{s}.{p}"), get("neck", "smooth.{s}.{p}")
    scale = get("scale", "scale.{s}.{b}.{p}")
    if lateral is not None or smooth is not None or scale is not None:
        fpn_classifier = get("fpn_head", "classifier.{p}")
        return dict(head_style="fpn", decoder_dim=_size(lateral, 0) or _size(smooth, 0) or _size(scale, 1),
                    fpn_channels=_size(fpn_classifier, 1) or _size(scale, 0), classes=_size(fpn_classifier, 0))
    fuse, classifier = get("head", "fuse.{p}"), get("head", "classifier.{p}")
    if fuse is not None or classifier is not None:
        mmseg = fmt == "mmseg" or get("stage_head", "proj_bn.{s}.{p}") is not None
        return dict(head_style="mmseg" if mmseg else "mlp", decoder_dim=_size(fuse, 0), fpn_channels=None,
                    classes=_size(classifier, 0))
    return None


def _infer_config(state, fmt: str, bb: str, extra: dict, num_classes: int | None, path: Path):
    """Architecture from tensor shapes (widths, depths, ratios, backbone, head), attention heads from the file's
    config or the registry; an encoder-only file gets the head of its registry variant (the MiT name where MiT
    and PVTv2 encoders coincide, B5)."""
    get = _tensor_getter(state, fmt, bb)
    enc = _encoder_layout(get, fmt, path)
    found = _head_layout(get, fmt)
    dims, depths = list(enc["dims"]), list(enc["depths"])

    hf = extra.get("hf_config", {})
    side_config = extra["sidecar"].details["config"] if "sidecar" in extra else None
    if side_config is not None and not isinstance(side_config, dict):
        raise CheckpointError(f"{artifacts.sidecar_path(path)}: field 'details.config': expected an object")
    table = variant_of(dims, depths, mlp_ratios=enc["mlp_ratios"], backbone=enc["backbone"],
                       head_style=found and found["head_style"])
    row = VARIANTS[table] if table else None
    heads = _heads(side_config or hf, table, dims, depths, path)
    if side_config:
        cfg = _sidecar_config(side_config, path)
    else:
        head = found or {"head_style": row.head_style if row else "mlp", "decoder_dim": None, "fpn_channels": None,
                         "classes": None}
        decoder_dim = head["decoder_dim"] or hf.get("decoder_hidden_size") or (row.decoder_dim if row else 256)
        fpn_channels = head["fpn_channels"] or (row.fpn_channels if row else SegFormerConfig.fpn_channels)
        name = variant_of(dims, depths, heads, decoder_dim, enc["mlp_ratios"], enc["backbone"], head["head_style"],
                          fpn_channels)
        base = VARIANTS[name] if name else None  # its training defaults: stochastic depth, dropout
        cfg = SegFormerConfig(
            variant=name or "custom", heads=heads, decoder_dim=decoder_dim, num_classes=head["classes"] or 19,
            head_style=head["head_style"], fpn_channels=fpn_channels, norm_eps=_norm_eps(fmt, hf, base, path),
            **({"drop_path": base.drop_path, "dropout": base.dropout} if base else {}), **enc,
        )
    if num_classes is not None and num_classes != cfg.num_classes:
        cfg = SegFormerConfig(**{**asdict(cfg), "num_classes": num_classes})
    return cfg, found is not None


def _norm_eps(fmt: str, hf: dict, base, path: Path) -> tuple[float, float, float]:
    """The LayerNorm epsilons of the implementation that wrote the file (NORM_EPS); Hugging Face PvtV2 uses its
    config's layer_norm_eps for every LayerNorm."""
    if fmt == "hf_pvt" and "layer_norm_eps" in hf:
        eps = hf["layer_norm_eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise CheckpointError(f"{path / 'config.json'}: layer_norm_eps {eps!r}: expected a number in (0, 1)")
        return (float(eps),) * 3
    if fmt == "ours":  # our file without its sidecar: the registry's value
        return base.norm_eps if base else NORM_EPS["nvlabs"]
    return NORM_EPS.get(SAME_NAMES.get(fmt, fmt), NORM_EPS["nvlabs"])


def _sidecar_config(config: dict, path: Path) -> SegFormerConfig:
    """The architecture our sidecar records in details.config; a field missing or of the wrong kind is named."""
    where = artifacts.sidecar_path(path)
    missing = [f.name for f in fields(SegFormerConfig) if f.name not in config
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise CheckpointError(f"{where}: field 'details.config.{missing[0]}' missing (re-save the model with "
                              "save_model)")
    try:
        return SegFormerConfig.from_dict(config)
    except (InputError, TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: details.config: {e}") from None


def _heads(config: dict, table: str | None, dims: list[int], depths: list[int], path: Path) -> tuple[int, ...]:
    """Attention heads per stage: weights do not show them, so from the file's own config (our sidecar's `heads`,
    Hugging Face's `num_attention_heads`) or the registry row of the layout."""
    heads = config.get("heads") or config.get("num_attention_heads")
    if heads:
        if not (isinstance(heads, list) and all(isinstance(h, int) and not isinstance(h, bool) for h in heads)):
            raise CheckpointError(f"{path}: its config's attention heads {heads!r}: expected a list of integers")
        return tuple(heads)
    if table:
        return VARIANTS[table].heads
    raise CheckpointError(f"{path}: widths {dims} / depths {depths} are not a layout of the model registry and the "
                          "file does not say its attention heads; convert it with a config that names them")


def _infer_meta(cfg: SegFormerConfig, extra: dict, source: str) -> ModelMeta:
    meta = ModelMeta.default(cfg.num_classes)
    meta.source = source
    side: artifacts.Metadata | None = extra.get("sidecar")
    if side:
        meta = ModelMeta(
            classes=list(side.classes), palette=[list(c) for c in side.palette],
            mean=tuple(side.normalization.mean), std=tuple(side.normalization.std),
            input_size=tuple(side.contract.size or meta.input_size), source=side.source or source,
        )
    classes, palette = None, None
    if "hf_config" in extra:
        labels = extra["hf_config"].get("id2label") or {}
        names = [labels.get(str(i)) for i in range(cfg.num_classes)]
        if all(names) and not all(re.fullmatch(r"LABEL_\d+", n) for n in names):
            classes = names
    if "meta" in extra:  # mmseg 0.x: meta.CLASSES / PALETTE; mmseg 1.x: meta.dataset_meta.classes / palette
        m = extra["meta"]
        dm = m.get("dataset_meta") if isinstance(m.get("dataset_meta"), dict) else {}
        classes = m.get("CLASSES") or dm.get("classes")
        palette = m.get("PALETTE") or dm.get("palette")
    if classes is not None and len(classes) == cfg.num_classes:
        meta.classes = [str(c) for c in classes]
    if palette is not None and len(palette) == cfg.num_classes:
        meta.palette = [[int(v) for v in c] for c in palette]
    return meta


def _listing(keys: list[str], limit: int = 12) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _refuse_non_finite(loaded: dict[str, torch.Tensor], mapping: dict, order: list[str], where: str) -> None:
    """A NaN or inf weight makes every prediction meaningless (a diverged training saved as is): refused, naming the
    first such tensor in the model's order as the file names it."""
    for key in order:
        tensor = loaded.get(key)
        if tensor is not None and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            nan, inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
            raise CheckpointError(f"{where}: tensor {'+'.join(mapping[key][1])!r} holds {nan} NaN and {inf} inf of "
                                  f"{tensor.numel()} values; the weights are broken (a diverged training?): use an "
                                  "earlier checkpoint")


def load_model(path: str | Path, *, strict: bool = True, num_classes: int | None = None) -> SegFormer:
    """Build and fill a SegFormer from any supported checkpoint; the format and variant come from the keys.

    strict=True (default): every tensor of the model must come from the file and every tensor of the file
    must be used, else CheckpointError lists the differences. strict=False loads what fits (an encoder-only
    ImageNet MiT/PVTv2/LVT checkpoint, whose classifier is listed as unexpected, or a head with another class
    count given by `num_classes`) and warns with the lists of what was skipped or left at its initial value.
    """
    path = Path(path)
    from pipeline.quant import is_qad_file, load_qad

    if is_qad_file(path):  # the qad stage's fake-quantized student: rebuilt from its record
        return load_qad(path)
    state, extra = _read(path)
    state = _normalise_keys(state)
    fmt, bb = _detect(state, path)
    cfg, has_head = _infer_config(state, fmt, bb, extra, num_classes, path)
    model = SegFormer(cfg)
    model.meta = _infer_meta(cfg, extra, f"{FORMAT_NAMES[fmt]}: {path}")

    expected = model.state_dict()
    rows = mapping_for(model, "ours", "")  # the table's rows for this model, in table order
    unmapped = sorted(set(expected) - set(rows))
    if unmapped:  # the table lacks a row for one of our own tensors: a bug here, never the file's fault
        raise RuntimeError(f"checkpoint mapping table has no row for {_listing(unmapped)}")
    mapping = mapping_for(model, fmt, bb)
    loaded, missing, mismatched, used = {}, [], [], set()
    for key in rows:
        template, names = mapping.get(key, (None, None))  # None: a tensor the format cannot hold (a head)
        if names is None or not all(n in state for n in names):
            if not key.endswith("num_batches_tracked"):  # a BN step counter; absent from many exports
                missing.append(key)
            continue
        used.update(names)
        tensor = _convert(template, [state[n] for n in names])
        if tensor.shape != expected[key].shape:
            mismatched.append(f"{'+'.join(names)} {tuple(tensor.shape)} vs {key} {tuple(expected[key].shape)}")
            continue
        loaded[key] = tensor
    unused = UNUSED.get(fmt)
    unexpected = sorted(k for k in set(state) - used if not (unused and unused.match(k)))

    where = f"{path} ({FORMAT_NAMES[fmt]}, {cfg.variant})"
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_listing(mismatched, 4)}")
    if problems and strict:
        hint = ""
        if not has_head:
            hint = "encoder-only checkpoint (no decode head): load it with strict=False to initialise a backbone; "
        raise CheckpointError(f"{where}: {hint}{'; '.join(problems)}")
    if problems:
        warnings.warn(f"{where}: loaded non-strictly; {'; '.join(problems)}", CheckpointWarning, stacklevel=2)
    _refuse_non_finite(loaded, mapping, list(expected), where)
    model.load_state_dict(loaded, strict=False)
    return model.eval()


def checkpoint_metadata(model: SegFormer, source: str = "", training: dict | None = None) -> artifacts.Metadata:
    """The artifact record of a model as PyTorch runs it: float NCHW in, logits out, any size (the one it was
    trained at recorded as the preferred size)."""
    meta = model.meta
    details: dict = {"config": asdict(model.config), "parameters": sum(p.numel() for p in model.parameters())}
    if training:
        details["training"] = training
    return artifacts.Metadata(
        kind="checkpoint", variant=model.config.variant, num_classes=model.config.num_classes,
        classes=list(meta.classes), palette=[list(c) for c in meta.palette],
        normalization=artifacts.Normalization(list(meta.mean), list(meta.std)),
        contract=artifacts.Contract("float", "logits", list(meta.input_size), None, True),
        precision="fp32", source=source or meta.source, source_sha256="", versions={"torch": torch.__version__},
        measured={"val_miou": training["val_miou"]} if training and training.get("val_miou") is not None else {},
        details=details)


def save_model(model: SegFormer, path: str | Path, *, source: str | None = None, extra: dict | None = None) -> Path:
    """Write `path` (.safetensors) and its sidecar `<path>.json` (the artifact record); only the model's own tensors
    are saved. `extra` (training step, validation mIoU, dataset, method) goes into the record's details.training."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors file name")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    artifacts.save(path, lambda tmp: save_file(state, tmp, metadata={"format": SAFETENSORS_FORMAT}),
                   checkpoint_metadata(model, source or "", extra))
    return path
