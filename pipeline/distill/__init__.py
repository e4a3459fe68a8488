"""TransKD distillation methods and baselines (see docs/method.md): `build_method(name, teacher, student)`."""

from pipeline.distill.methods import METHODS, DistillMethod, MethodSpec, build_method

__all__ = ["METHODS", "DistillMethod", "MethodSpec", "build_method"]
