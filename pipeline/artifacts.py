"""The artifact table and the one metadata record (schema `transkd-deploy/artifact`, version 1) that every artifact
carries in its sidecar `<artifact>.json`: every writer builds a `Metadata`, every reader gets one through `read`.

A new format or precision is one row of ARTIFACTS plus the function that makes it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from pipeline.errors import InputError
from pipeline.io import atomic_path, sha256_file, write_json, writing

SCHEMA = "transkd-deploy/artifact"
SCHEMA_VERSION = 1
ONNX_KEY = "transkd.metadata"  # the metadata_props key of an exported graph: the record without file hashes
INPUT_NAME = "image"

# The deployed graph contract: (input kind) -> what the graph takes; (output kind) -> what it returns.
INPUTS = {"float": "N x 3 x H x W float32 RGB, normalised outside ((x - mean) / std, 0..255 scale)",
          "uint8": "N x H x W x 3 uint8 BGR, as cameras and OpenCV deliver it; normalised inside"}
OUTPUTS = {"logits": "N x classes x H/4 x W/4 float32 logits",
           "labels": "N x H x W int32 class ids (bilinear upsample to the input size, or to contract.output_size, and "
                     "argmax inside)"}
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class ArtifactKind:
    """One row of the artifact table."""

    name: str
    file: str  # the student's file in a run directory ({role} for checkpoints: teacher or student)
    format: str  # safetensors | onnx | tensorrt
    precision: str
    made_by: str  # the function that makes it
    needs: str  # what must be installed to make it
    runs_on: str  # the Segmenter backends that run it
    source: str = ""  # the kind it is made from
    details: tuple[str, ...] = ()  # kind-specific fields its record must hold in `details`


ARTIFACTS: dict[str, ArtifactKind] = {k.name: k for k in (
    ArtifactKind("checkpoint", "{role}.safetensors", "safetensors", "fp32", "train.Trainer (save_model)",
                 "torch, safetensors", "PyTorch: CPU, CUDA", details=("config",)),
    ArtifactKind("onnx", "student.onnx", "onnx", "fp32", "export.export_onnx, kept after its parity check",
                 "onnx, onnxruntime, onnxslim", "ONNX Runtime: CPU, CUDA, TensorRT provider", "checkpoint"),
    ArtifactKind("onnx-fp16", "student.fp16.onnx", "onnx", "fp16", "precision.to_fp16 (Model Optimizer AutoCast)",
                 "nvidia-modelopt", "ONNX Runtime: CPU, CUDA, TensorRT provider", "onnx"),
    ArtifactKind("onnx-int8", "student.int8.onnx", "onnx", "int8", "precision.to_int8 (Q/DQ, calibrated)",
                 "nvidia-modelopt, or onnxruntime (export.int8_backend=ort)",
                 "ONNX Runtime: CPU, CUDA, TensorRT provider", "onnx"),
    ArtifactKind("checkpoint-qad", "{role}.qad.safetensors", "safetensors", "int8",
                 "quant.save_qad (the qad stage: the fake-quantized deploy student, fine-tuned against the teacher)",
                 "torch, safetensors", "PyTorch (fake quantization): CPU, CUDA", "checkpoint",
                 ("config", "quantization")),
    ArtifactKind("onnx-int8-qad", "student.int8-qad.onnx", "onnx", "int8",
                 "export.export_student from the QAD state (Q/DQ with its learned ranges)", "onnx, nvidia-modelopt",
                 "ONNX Runtime: CPU, CUDA, TensorRT provider", "checkpoint-qad"),
    ArtifactKind("plan-fp16", "student.fp16.plan", "tensorrt", "fp16", "trt.build.build_engine",
                 "tensorrt, cuda-bindings, a CUDA GPU", "TensorRT: the GPU model and version it was built with",
                 "onnx-fp16", ("tensorrt", "gpu", "build", "inputs", "outputs")),
    ArtifactKind("plan-int8", "student.int8.plan", "tensorrt", "int8", "trt.build.build_engine",
                 "tensorrt, cuda-bindings, a CUDA GPU", "TensorRT: the GPU model and version it was built with",
                 "onnx-int8", ("tensorrt", "gpu", "build", "inputs", "outputs")),
    ArtifactKind("plan-int8-qad", "student.int8-qad.plan", "tensorrt", "int8", "trt.build.build_engine",
                 "tensorrt, cuda-bindings, a CUDA GPU", "TensorRT: the GPU model and version it was built with",
                 "onnx-int8-qad", ("tensorrt", "gpu", "build", "inputs", "outputs")),
)}
ENGINE_SUFFIXES = (".plan", ".engine")


def run_file(kind: str, role: str = "student") -> str:
    """The file name of an artifact kind in a run directory: run_file("onnx-int8") -> "student.int8.onnx"."""
    return ARTIFACTS[kind].file.format(role=role)


def kinds(format: str | None = None) -> list[str]:
    """Artifact kinds in table order, of one format (safetensors, onnx, tensorrt) when given."""
    return [k for k, a in ARTIFACTS.items() if format is None or a.format == format]


def plan_kind(onnx_kind: str) -> str | None:
    """The engine kind an ONNX of kind `onnx_kind` builds; None for the FP32 graph: the run directory's engines are
    built from its FP16 and INT8 graphs."""
    return next((k for k in kinds("tensorrt") if ARTIFACTS[k].source == onnx_kind), None)


def sidecar_path(artifact: str | os.PathLike) -> Path:
    """`student.int8.plan` -> `student.int8.plan.json`: the one naming rule for every artifact."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


@dataclass
class Normalization:
    mean: list[float]
    std: list[float]
    space: str = "RGB, 0..255"
    inside_graph: bool = False  # true for uint8 graphs: they take camera BGR bytes and normalise themselves


@dataclass
class Contract:
    """What the network takes and gives."""

    input: str  # float: N x 3 x H x W normalised RGB; uint8: N x H x W x 3 BGR as the camera gives it
    output: str  # logits: N x classes x H/4 x W/4; labels: N x H x W class ids
    size: list[int] | None  # [H, W] the network was made for; with `dynamic`, only its preferred size
    batch: int | None  # the fixed batch; None: any
    dynamic: bool  # true: any H, W (and batch) within the network's limits
    input_name: str = INPUT_NAME
    output_size: list[int] | None = None  # labels: [H, W] of the labels when not the input's (export.labels_size)

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        return None if self.dynamic or not self.size else (int(self.size[0]), int(self.size[1]))


@dataclass
class Metadata:
    """The record of one artifact. Fields from `file` on are filled when the artifact is written."""

    kind: str
    variant: str
    num_classes: int
    classes: list[str]
    palette: list[list[int]]
    normalization: Normalization
    contract: Contract
    precision: str
    source: str  # what it was made from, in words
    source_sha256: str  # the file it was made from ("" when unknown)
    versions: dict[str, str] = field(default_factory=dict)  # tools that made it
    measured: dict = field(default_factory=dict)  # parity, miou, pytorch_miou, eval: where known
    details: dict = field(default_factory=dict)  # kind-specific (ArtifactKind.details lists the required ones)
    file: str = ""
    sha256: str = ""
    bytes: int = 0
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    def onnx_props(self) -> dict[str, str]:
        """The record as an exported graph's metadata_props: everything but the file's own hash and size."""
        record = {k: v for k, v in self.to_dict().items() if k not in ("file", "sha256", "bytes", "measured")}
        return {ONNX_KEY: json.dumps(record)}

    @classmethod
    def from_dict(cls, data: object, where: str) -> Metadata:
        """Validate `data` against the schema; InputError naming `where` and the first missing or mistyped field."""
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a JSON object with the {SCHEMA} record")
        if data.get("schema") != SCHEMA:
            raise InputError(f"{where}: field 'schema' is {data.get('schema')!r}, expected {SCHEMA!r} (an old or "
                             "foreign sidecar: re-export the artifact with this version)")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise InputError(f"{where}: field 'schema_version' is {data.get('schema_version')!r}; this version reads "
                             f"{SCHEMA_VERSION} (re-export the artifact)")
        meta = _build(cls, data, where, "")
        if meta.kind not in ARTIFACTS:
            raise InputError(f"{where}: field 'kind' is {meta.kind!r}; expected one of {', '.join(ARTIFACTS)}")
        c = meta.contract
        checks = [("contract.input", c.input in INPUTS, f"one of {', '.join(INPUTS)}"),
                  ("contract.output", c.output in OUTPUTS, f"one of {', '.join(OUTPUTS)}"),
                  ("contract.size", c.size is None or (len(c.size) == 2 and min(c.size) > 0), "[H, W] or null"),
                  ("contract.output_size", c.output_size is None or (c.output == "labels" and len(c.output_size) == 2
                                                                     and min(c.output_size) > 0),
                   "[H, W] of a labels output, or null"),
                  ("precision", meta.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
                  ("classes", len(meta.classes) == meta.num_classes, f"{meta.num_classes} names (num_classes)"),
                  ("palette", len(meta.palette) == meta.num_classes and all(len(p) == 3 for p in meta.palette),
                   f"{meta.num_classes} [R, G, B] entries (num_classes)"),
                  ("normalization.mean", len(meta.normalization.mean) == 3, "3 numbers"),
                  ("normalization.std", len(meta.normalization.std) == 3 and min(meta.normalization.std) > 0,
                   "3 positive numbers")]
        for name, ok, expected in checks:
            if not ok:
                raise InputError(f"{where}: field {name!r}: expected {expected}")
        missing = [d for d in ARTIFACTS[meta.kind].details if d not in meta.details]
        if missing:
            raise InputError(f"{where}: field 'details.{missing[0]}' missing (a {meta.kind} record needs "
                             f"{', '.join(ARTIFACTS[meta.kind].details)})")
        return meta


_ORIGINS = {list: "a list", dict: "an object", str: "a string", int: "an integer", float: "a number",
            bool: "true/false"}


def _build(cls, data: dict, where: str, prefix: str):
    """A dataclass from a JSON object, every field present and of its annotated type (recursing into dataclasses);
    a field with a default may be absent."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if f.name in data:
            values[f.name] = _value(hints[f.name], data[f.name], where, prefix + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InputError(f"{where}: field {prefix + f.name!r} missing")
    return cls(**values)


def _value(hint, value, where: str, name: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__"):
        if not isinstance(value, dict):
            raise InputError(f"{where}: field {name!r}: expected an object, got {type(value).__name__}")
        return _build(hint, value, where, name + ".")
    base = origin or hint
    ok = isinstance(value, base) and not (base in (int, float) and isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise InputError(f"{where}: field {name!r}: expected {_ORIGINS.get(base, base.__name__)}, "
                         f"got {type(value).__name__}")
    if base is float and not math.isfinite(value):
        raise InputError(f"{where}: field {name!r}: expected a finite number, got {value}")
    if base is list and args:
        return [_value(args[0], v, where, f"{name}[{i}]") for i, v in enumerate(value)]
    return value


def _completed(meta: Metadata, final: Path, on_disk: Path) -> Metadata:
    """The record with the artifact's file name, and the sha256 and size of the file as it is on disk."""
    return replace(meta, file=final.name, sha256=sha256_file(on_disk), bytes=on_disk.stat().st_size)


def write_sidecar(artifact: str | os.PathLike, meta: Metadata) -> Metadata:
    """`<artifact>.json` with the record, its file name, sha256 and size taken from the artifact as it is on
    disk; written atomically. Returns the completed record."""
    artifact = Path(artifact)
    meta = _completed(meta, artifact, artifact)
    write_json(sidecar_path(artifact), meta.to_dict())
    return meta


def publish(staged: str | os.PathLike, final: str | os.PathLike, meta: Metadata) -> Metadata:
    """Move a finished artifact from its staging name onto `final` with its sidecar: the record (the staged file's
    hash) is written under a staging name first, then the artifact is renamed and the sidecar last. A full disk
    stops before either final name changes, and a reader never finds a sidecar that describes another file."""
    staged, final = Path(staged), Path(final)
    meta = _completed(meta, final, staged)
    with atomic_path(sidecar_path(final)) as side:
        side.write_text(json.dumps(meta.to_dict(), indent=2) + "\n")
        os.replace(staged, final)
    return meta


def save(final: str | os.PathLike, write: Callable[[Path], object], meta: Metadata) -> Metadata:
    """Write an artifact through `write(staged_path)` under a temporary name beside `final`, then `publish` it with
    its record; on any error nothing is left under either name, and an OS error (a full disk, a read-only folder,
    also one a library reports in its own words) is an OSError naming `final`."""
    final = Path(final)
    staged = final.with_name(f".{final.name}.tmp{os.getpid()}")
    try:
        with writing(final, staged):
            write(staged)
            return publish(staged, final, meta)
    finally:
        if staged.exists():
            staged.unlink()


def read_sidecar(artifact: str | os.PathLike, verify: bool = False) -> Metadata:
    """The validated record of `<artifact>.json`; `verify` also checks the artifact's sha256 against it."""
    artifact = Path(artifact)
    side = sidecar_path(artifact)
    try:
        data = json.loads(side.read_text())
    except FileNotFoundError:
        raise InputError(f"{side}: missing; every artifact this pipeline writes has its sidecar beside it") from None
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise InputError(f"{side}: unreadable sidecar ({(str(e) or type(e).__name__).splitlines()[0]})") from None
    meta = Metadata.from_dict(data, str(side))
    if verify and meta.sha256 != sha256_file(artifact):
        raise InputError(f"{artifact}: sha256 differs from the one recorded in {side.name}; the file changed after "
                         "its sidecar was written")
    return meta


def read_onnx(props: dict[str, str], where: str) -> Metadata:
    """The record an exported graph carries in its metadata_props (`Metadata.onnx_props`)."""
    if ONNX_KEY not in props:
        raise InputError(f"{where}: no {ONNX_KEY!r} metadata; not a graph exported by this pipeline (re-export it with "
                         "`python -m pipeline.run export`)")
    try:
        data = json.loads(props[ONNX_KEY])
    except ValueError as e:
        raise InputError(f"{where}: metadata {ONNX_KEY!r} is not JSON ({str(e).splitlines()[0]})") from None
    return Metadata.from_dict(data, f"{where} metadata {ONNX_KEY!r}")


__all__ = ["ARTIFACTS", "INPUTS", "INPUT_NAME", "OUTPUTS", "PRECISIONS", "ArtifactKind", "Contract", "Metadata",
           "Normalization", "kinds", "publish", "save", "read_onnx", "read_sidecar", "run_file", "sidecar_path",
           "write_sidecar"]
