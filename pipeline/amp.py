"""The one choice of autocast precision: what `train.amp` (and the PyTorch backend's `auto` dtype) means on a device.

`auto` takes bf16 only where the hardware computes it natively and float32 or fp16 elsewhere:
- CUDA: bf16 from compute capability 8.0 (Ampere) on; older GPUs (T4 is 7.5, V100 7.0) get fp16 with a GradScaler.
  `torch.cuda.is_bf16_supported()` is not the test: it also answers True where bf16 is emulated (slower than fp32).
- CPU: bf16 where the CPU has bf16 instructions (x86: AVX512-BF16 or AMX; Arm: the BF16 extension, Graviton3 or
  Neoverse V1 and newer); float32 elsewhere, where bf16 would be converted in software.
An explicit `bf16` or `fp16` is taken as asked on CUDA; on a CPU `bf16` is taken as asked (emulated where not native)
and `fp16` runs float32, since CPU fp16 autocast has no fast kernels for these models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SETTINGS = ("auto", "off", "bf16", "fp16")
NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
BF16_CC = (8, 0)  # the first compute capability with bf16 tensor cores (Ampere)


@dataclass(frozen=True)
class Choice:
    """The autocast dtype (None: float32), whether a GradScaler is needed, and why, for the run's record."""

    dtype: torch.dtype | None
    reason: str

    @property
    def name(self) -> str:
        return NAMES[self.dtype]

    @property
    def scaler(self) -> bool:
        return self.dtype == torch.float16

    def record(self, setting: str, device: torch.device | str) -> dict:
        return {"setting": setting, "device": str(device), "dtype": self.name, "grad_scaler": self.scaler,
                "reason": self.reason}


def cuda_bf16_native(capability: tuple[int, int]) -> bool:
    """bf16 tensor-core math exists from compute capability 8.0 on."""
    return tuple(capability) >= BF16_CC


def cpu_flags(text: str) -> set[str]:
    """The feature flags of /proc/cpuinfo's text (x86 `flags`, Arm `Features`)."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def cpu_bf16_from_flags(flags: set[str]) -> bool:
    """Native bf16 from CPU feature flags: AVX512-BF16 or AMX-BF16 (x86), the BF16 extension (Arm, `bf16`)."""
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


@cache
def cpu_bf16_native() -> bool:
    """True where this CPU computes bf16 natively: PyTorch's own CPU probes where it has them (x86), else the
    kernel's feature flags."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(p) for p in probes) and any(p() for p in probes):  # type: ignore[misc]
        return True
    try:
        return cpu_bf16_from_flags(cpu_flags(Path("/proc/cpuinfo").read_text(errors="replace")))
    except OSError:
        return False


def choose(setting: str, device: torch.device | str, capability: tuple[int, int] | None = None,
           cpu_native: bool | None = None) -> Choice:
    """The autocast precision for `setting` (auto | off | bf16 | fp16) on `device`. `capability` (CUDA) and
    `cpu_native` (CPU) default to the machine's own; tests pass them to check every case."""
    if setting not in SETTINGS:
        raise ValueError(f"amp setting {setting!r}: expected one of {', '.join(SETTINGS)}")
    device = torch.device(device)
    if setting == "off":
        return Choice(None, "amp off")
    if device.type == "cuda":
        if capability is None:
            capability = torch.cuda.get_device_capability(device)
        cc = f"compute capability {capability[0]}.{capability[1]}"
        if setting == "auto":
            if cuda_bf16_native(capability):
                return Choice(torch.bfloat16, f"auto: native bf16 on {cc}")
            return Choice(torch.float16, f"auto: {cc} has no native bf16, fp16 with a GradScaler")
        return Choice(torch.bfloat16 if setting == "bf16" else torch.float16, f"{setting} as asked ({cc})")
    if device.type != "cpu":
        return Choice(None, f"{setting}: float32 on {device.type}")
    native = cpu_bf16_native() if cpu_native is None else cpu_native
    if setting == "auto":
        if native:
            return Choice(torch.bfloat16, "auto: the CPU has native bf16 (AVX512-BF16, AMX or Arm BF16)")
        return Choice(None, "auto: the CPU has no native bf16, float32")
    if setting == "bf16":
        return Choice(torch.bfloat16, "bf16 as asked" + ("" if native else " (emulated: this CPU has no native bf16)"))
    return Choice(None, "fp16 applies on CUDA only; float32 on the CPU")


def autocast(choice: Choice | torch.dtype | None, device: torch.device | str):
    """The autocast context of a choice (a no-op for float32)."""
    dtype = choice.dtype if isinstance(choice, Choice) else choice
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


__all__ = ["BF16_CC", "Choice", "SETTINGS", "autocast", "choose", "cpu_bf16_from_flags", "cpu_bf16_native", "cpu_flags",
           "cuda_bf16_native"]
