"""The segmentation models (SegFormer, PVTv2 + Semantic FPN, LVT): `build_model(variant)` and `load_model(path)` are
the two doors in."""

from pipeline.models.checkpoints import load_model, save_model
from pipeline.models.registry import VARIANTS, SegFormerConfig
from pipeline.models.segformer import ModelMeta, SegFormer, Taps, build_model, deploy_copy

__all__ = ["VARIANTS", "ModelMeta", "SegFormer", "SegFormerConfig", "Taps", "build_model", "deploy_copy", "load_model",
           "save_model"]
