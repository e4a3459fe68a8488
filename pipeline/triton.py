"""Triton model repository and DeepStream nvinfer configuration for a run's ONNX graphs and TensorRT plans.

`write_repository(run_dir, out)` makes, in one staging folder renamed onto `out` when complete:
  triton/<name>/config.pbtxt, labels.txt, 1/model.onnx|model.plan and 1/model.<ext>.json (the artifact's record)
  deepstream/<name>_nvinfer.txt and <name>_labels.txt
  repository.json (what was written, from what)
Every config.pbtxt is parsed with Triton's own ModelConfig protobuf schema (tritonclient) before the rename.
The DeepStream files come from pipeline/deepstream.py; the client and the PyTriton server from
pipeline/triton_serve.py, which imports this module in a venv without torch: keep it to numpy at load.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import deepstream
from pipeline.artifacts import ARTIFACTS, INPUTS, Metadata, read_sidecar, sidecar_path
from pipeline.errors import ConfigError, InputError
from pipeline.io import progress_interval, write_json, writing

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig


TRITON_DIR, DEEPSTREAM_DIR, SUMMARY, VERSION, LABELS = "triton", "deepstream", "repository.json", "1", "labels.txt"
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
TYPES = {"uint8": "TYPE_UINT8", "int32": "TYPE_INT32", "int64": "TYPE_INT64", "float16": "TYPE_FP16",
         "float32": "TYPE_FP32"}
NUMPY_TYPES = {v: k for k, v in TYPES.items()}
# what each side of the record's contract is as a tensor (artifacts.INPUTS, OUTPUTS): dtype and rank
CONTRACT_TENSORS = {"float": ("float32", 4), "uint8": ("uint8", 4), "logits": ("float32", 4), "labels": ("int32", 3)}
# the newest tritonclient pip resolves with protobuf 7 and ml-dtypes 0.6 held: 2.41.1-2.45 require protobuf < 5, later
# ones pin both lower (2.73: protobuf < 7, ml-dtypes <= 0.5.4); 2.41.0 has no protobuf bound and its schema loads
TRITONCLIENT = "tritonclient[grpc]==2.41.0"


@dataclass(frozen=True)
class Settings:
    """The triton.* config keys (pipeline.run export-triton)."""

    max_batch_size: int = 8  # of a dynamic-batch model; a static-batch graph's is 0 with the batch in its dims
    instances: int = 1
    instance_kind: str = "gpu"  # gpu | cpu (ONNX only: a plan runs on the GPU it was built for)
    max_queue_delay_us: int = 100  # how long the dynamic batcher waits for a fuller batch
    preferred_batch_sizes: tuple[int, ...] | None = None  # None: Triton takes [max_batch_size]

    def check(self) -> None:
        def whole(v: object, least: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= least

        for key, least in (("max_batch_size", 1), ("instances", 1), ("max_queue_delay_us", 0)):
            if not whole(getattr(self, key), least):
                raise ConfigError(f"triton.{key}={getattr(self, key)!r}: expected an integer >= {least}")
        if self.instance_kind not in KINDS:
            raise ConfigError(f"triton.instance_kind={self.instance_kind!r}: expected one of {', '.join(KINDS)}")
        sizes = self.preferred_batch_sizes
        if sizes is not None and not (sizes and all(whole(b, 1) and b <= self.max_batch_size for b in sizes)):
            raise ConfigError(f"triton.preferred_batch_sizes={list(sizes)!r}: expected batch sizes from 1 to "
                              f"triton.max_batch_size ({self.max_batch_size}), or null")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy's name
    shape: tuple[int, ...]  # every dim, batch first; -1 where dynamic


# ------------------------------------------------------------------------------------------------ the artifacts
def model_name(artifact: str | os.PathLike) -> str:
    """A Triton model name (a folder name PyTriton accepts) from the file: student.int8.onnx -> student_int8_onnx."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(artifact).name)


def find_artifacts(run_dir: Path) -> list[Path]:
    """The run's ONNX graphs and plans that carry a sidecar, in name order."""
    found = {p for pattern in ("student*.onnx", "student*.plan") for p in Path(run_dir).glob(pattern)}
    return sorted(p for p in found if sidecar_path(p).is_file())


def artifact_format(path: Path, meta: Metadata) -> str:
    fmt = ARTIFACTS[meta.kind].format
    if fmt not in PLATFORMS:
        raise InputError(f"{path}: a {meta.kind} artifact; a Triton model is an ONNX graph or a TensorRT plan")
    return fmt


def graph_tensors(artifact: Path, meta: Metadata) -> tuple[TensorSpec, TensorSpec]:
    """(input, output) as the file itself declares them, checked against its record so a config cannot drift from
    the graph: an ONNX graph's from the graph (onnx.load without external weights), a plan's from the record's
    details.inputs / outputs (what trt.build read from the built engine; TensorRT is not needed here)."""
    if artifact_format(artifact, meta) == "onnx":
        from pipeline.onnxinfo import inspect_onnx

        info = inspect_onnx(artifact)
        declared = [[(t.name, t.dtype, t.shape) for t in ts] for ts in (info.inputs, info.outputs)]
    else:
        try:
            declared = [[(t["name"], t["dtype"], tuple(t["shape"])) for t in meta.details[k]]
                        for k in ("inputs", "outputs")]
        except (KeyError, TypeError):
            raise InputError(f"{sidecar_path(artifact)}: fields 'details.inputs' / 'details.outputs': expected lists "
                             "of {name, dtype, shape}") from None
    ins, outs = declared
    if len(ins) != 1 or len(outs) != 1:
        raise InputError(f"{artifact}: expected one input and one output, found {len(ins)} and {len(outs)}")
    inp, out = (TensorSpec(str(n), str(dt), tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape))
                for n, dt, shape in (ins[0], outs[0]))
    problem = _contract_problem(meta, inp, out)
    if problem:
        raise InputError(f"{artifact}: the file declares {problem}, which its record ({sidecar_path(artifact).name}) "
                         "does not describe")
    return inp, out


def _contract_problem(meta: Metadata, inp: TensorSpec, out: TensorSpec) -> str | None:
    c = meta.contract
    for side, t in ((c.input, inp), (c.output, out)):
        dtype, rank = CONTRACT_TENSORS[side]
        if (t.dtype, len(t.shape)) != (dtype, rank):
            return f"{t.name!r} {t.dtype} of rank {len(t.shape)} (a {side} tensor is {dtype} of rank {rank})"
    if inp.name != c.input_name:
        return f"input {inp.name!r} (contract.input_name {c.input_name!r})"
    if inp.shape[3 if c.input == "uint8" else 1] != 3:
        return f"input {_fmt(inp.shape)} (contract.input {c.input}: {INPUTS[c.input]})"
    if inp.shape[0] != (c.batch or -1):
        return f"batch {inp.shape[0]} (contract.batch {c.batch})"
    if c.output == "logits" and out.shape[1] not in (meta.num_classes, -1):
        return f"{out.shape[1]} logit channels (num_classes {meta.num_classes})"
    return None


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(d) if d > 0 else "?" for d in shape)


def _plan_batch(meta: Metadata) -> tuple[int, int] | None:
    """(min, max) batch of a dynamic-batch plan's shape profile; None for a static batch or an ONNX graph."""
    profile = (meta.details.get("inputs") or [{}])[0].get("profile") if ARTIFACTS[meta.kind].format == "tensorrt" \
        else None
    return (int(profile["min"][0]), int(profile["max"][0])) if profile and meta.contract.batch is None else None


# ------------------------------------------------------------------------------------------------ preflight
def check_repository_args(run_dir: str | os.PathLike, out: str | os.PathLike, *,
                          artifacts: Sequence[str | os.PathLike] | None = None,
                          settings: Settings = Settings(), replace: bool = False) -> list[Path]:
    """Everything write_repository would refuse, before any work, as one line: the settings (ConfigError naming the
    triton.* key), the artifacts (given, or every student*.onnx / student*.plan with a sidecar in `run_dir`; each
    must have a readable record of an ONNX or engine kind), a plan asked to run on KIND_CPU or to batch beyond its
    profile, an existing `out` (with `replace`: one that is not a repository this module wrote), and tritonclient's
    schema missing. Returns the artifacts."""
    settings.check()
    run_dir, out = Path(run_dir), Path(out)
    found = [Path(a) for a in artifacts] if artifacts is not None else find_artifacts(run_dir)
    if not found:
        raise InputError(f"{run_dir}: no student*.onnx or student*.plan with its sidecar; export first "
                         "(python -m pipeline.run export)")
    names: dict[str, Path] = {}
    for path in found:
        if not path.is_file():
            raise InputError(f"{path}: no such artifact")
        meta = read_sidecar(path)
        if artifact_format(path, meta) == "tensorrt":
            _check_plan(path, meta, settings)
        if names.setdefault(model_name(path), path) != path:
            raise InputError(f"{path}: model name {model_name(path)!r} is also {names[model_name(path)]}'s")
    if out.exists() and not (replace and is_repository(out)):
        raise InputError(f"{out}: exists; the repository is written whole to a new folder (choose another, or "
                         "remove it)")
    parent = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
        raise InputError(f"{out}: {parent} is not a writable folder; choose another output folder")
    schema()
    return found


def _check_plan(path: Path, meta: Metadata, s: Settings) -> None:
    if s.instance_kind == "cpu":
        raise ConfigError(f"triton.instance_kind=cpu: {path.name} is a TensorRT plan, which runs on a GPU only "
                          "(instance_kind=gpu, or export-triton without the plans)")
    batch = _plan_batch(meta)
    if batch and batch[0] > 1:
        raise InputError(f"{path}: its profile starts at batch {batch[0]}; Triton sends batches from 1")
    if batch and s.max_batch_size > batch[1]:
        raise ConfigError(f"triton.max_batch_size={s.max_batch_size}: {path.name} was built for batches up to "
                          f"{batch[1]} (details.inputs[0].profile.max); set triton.max_batch_size={batch[1]}")


# ------------------------------------------------------------------------------------------------ config.pbtxt
def schema():
    """tritonclient's generated ModelConfig protobuf module (Triton's model_config.proto)."""
    try:
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError) as e:  # RuntimeError: tritonclient without its grpc extra
        raise InputError(f"Triton's model-config schema needs tritonclient ({str(e).splitlines()[0]}); pip install "
                         f"'{TRITONCLIENT}'") from None
    return model_config_pb2


def validate_config(text: str, where: str = "config.pbtxt") -> ModelConfig:
    """`text` parsed with Triton's ModelConfig schema (google.protobuf.text_format, as tritonserver reads it), then
    what the schema alone does not hold: the checks of Triton's ValidateModelConfig that apply here (a name, a
    platform or backend, preferred batch sizes from 1 to max_batch_size), and what would make a model fail to load
    or batch nothing (no inputs or outputs, a tensor without a data type, dims of 0, dynamic batching with
    max_batch_size 0, a CPU instance of a TensorRT plan). InputError naming `where` and the first problem."""
    from google.protobuf import text_format

    pb = schema()
    try:
        config = text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as e:
        raise InputError(f"{where}: not a Triton model configuration ({str(e).splitlines()[0]})") from None
    problem = _config_problem(config, pb)
    if problem:
        raise InputError(f"{where}: {problem}")
    return config


def _config_problem(c, pb) -> str | None:
    if not c.name or not (c.platform or c.backend):
        return "expected a name and a platform or backend"
    if c.max_batch_size < 0:
        return f"max_batch_size {c.max_batch_size}: expected >= 0"
    if not c.input or not c.output:
        return "expected at least one input and one output"
    for t in (*c.input, *c.output):
        if not t.name or t.data_type == pb.TYPE_INVALID or not t.dims or any(d == 0 or d < -1 for d in t.dims):
            return f"tensor {t.name!r}: expected a name, a data_type and dims of -1 or positive sizes"
    if c.HasField("dynamic_batching"):
        sizes = list(c.dynamic_batching.preferred_batch_size)
        if c.max_batch_size == 0:
            return "dynamic_batching needs max_batch_size > 0"
        if any(not 1 <= b <= c.max_batch_size for b in sizes):
            return f"preferred_batch_size {sizes}: expected sizes from 1 to max_batch_size {c.max_batch_size}"
    if c.platform == "tensorrt_plan" and any(g.kind == pb.ModelInstanceGroup.KIND_CPU for g in c.instance_group):
        return "a tensorrt_plan model cannot have a KIND_CPU instance group"
    return None


def model_config(name: str, artifact: Path, meta: Metadata, s: Settings) -> str:
    """config.pbtxt of one model: the platform from the artifact's format, input and output names, data types and
    dims from the file (graph_tensors), max_batch_size 0 with the batch dim in the dims for a static-batch graph,
    else `s.max_batch_size` and dynamic batching; the labels file on the output."""
    inp, out = graph_tensors(artifact, meta)
    platform = PLATFORMS[artifact_format(artifact, meta)][0]
    static = inp.shape[0] != -1
    lines = [f"# {meta.file or artifact.name}: {meta.kind} ({meta.precision}, {meta.variant}), {meta.num_classes} "
             "classes; written by pipeline.triton from the file and its record",
             f'name: "{name}"', f'platform: "{platform}"',
             f"max_batch_size: {0 if static else s.max_batch_size}"]
    if static:
        lines.append(f"# a static-batch graph: its batch of {inp.shape[0]} is the first of the dims")
    for key, t in (("input", inp), ("output", out)):
        dims = ", ".join(map(str, t.shape if static else t.shape[1:]))
        label = [f'    label_filename: "{LABELS}"'] if key == "output" else []
        lines += [f"{key} [", "  {", f'    name: "{t.name}"', f"    data_type: {TYPES[t.dtype]}",
                  f"    dims: [ {dims} ]", *label, "  }", "]"]
    if not static:
        preferred = ", ".join(map(str, s.preferred_batch_sizes or ()))
        lines += ["dynamic_batching {", *([f"  preferred_batch_size: [ {preferred} ]"] if preferred else []),
                  f"  max_queue_delay_microseconds: {s.max_queue_delay_us}", "}"]
    lines += ["instance_group [", "  {", f"    count: {s.instances}", f"    kind: {KINDS[s.instance_kind]}", "  }", "]"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ the repository
def is_repository(out: Path) -> bool:
    """`out` is a folder write_repository made (its repository.json is there)."""
    return out.is_dir() and not out.is_symlink() and (out / SUMMARY).is_file()


def write_repository(run_dir: str | os.PathLike, out: str | os.PathLike, *,
                     artifacts: Sequence[str | os.PathLike] | None = None, max_batch_size: int = 8,
                     instances: int = 1, instance_kind: str = "gpu", max_queue_delay_us: int = 100,
                     preferred_batch_sizes: Sequence[int] | None = None, replace: bool = False) -> dict:
    """The Triton model repository (out/triton) and DeepStream configurations (out/deepstream) for the run's ONNX
    graphs and plans (`artifacts`, or every student*.onnx / student*.plan with a sidecar in `run_dir`); written in a
    staging folder beside `out`, every config.pbtxt validated, then renamed onto `out`: a failure leaves nothing
    new, and with `replace` a repository written before at `out` is swapped for the new one only once it is complete
    (the run directory's `deploy/`, rewritten after each export). Returns the summary also written as
    out/repository.json."""
    from tqdm import tqdm

    s = Settings(max_batch_size, instances, instance_kind, max_queue_delay_us,
                 tuple(preferred_batch_sizes) if preferred_batch_sizes is not None else None)
    found = check_repository_args(run_dir, out, artifacts=artifacts, settings=s, replace=replace)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        with writing(out, stage):
            models = {}
            for path in tqdm(found, desc="triton repository", unit="model", leave=False,
                             mininterval=progress_interval()):
                models[model_name(path)] = _write_model(path, stage, s)
            files = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
            summary = {"run_dir": str(run_dir), "triton": TRITON_DIR, "deepstream": DEEPSTREAM_DIR,
                       "settings": asdict(s), "models": models, "files": sorted([*files, SUMMARY])}
            write_json(stage / SUMMARY, summary)
            old = _set_aside(out) if replace and is_repository(out) else None
            if out.exists():  # made while we wrote: os.rename would replace an empty folder silently
                raise InputError(f"{out}: appeared while the repository was written; nothing was replaced")
            os.rename(stage, out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary


def _set_aside(out: Path) -> Path:
    """The previous repository at `out` renamed to a hidden name beside it, so the new one can take its place."""
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old)  # onto the empty folder mkdtemp made
    return old


def _write_model(path: Path, stage: Path, s: Settings) -> dict:
    """One model folder (artifact hard-linked where the file system allows, else copied; its record beside it as
    1/model.<ext>.json; labels; config.pbtxt validated) and its DeepStream configuration."""
    meta = read_sidecar(path, verify=True)  # the file is the one its record describes
    name, fmt = model_name(path), artifact_format(path, meta)
    folder = stage / TRITON_DIR / name
    model = folder / VERSION / PLATFORMS[fmt][1]
    model.parent.mkdir(parents=True)
    try:
        os.link(path, model)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(path, model)
    shutil.copyfile(sidecar_path(path), sidecar_path(model))
    (folder / LABELS).write_text("\n".join(meta.classes) + "\n")
    text = model_config(name, model, meta, s)
    config = validate_config(text, f"{path.name} -> {name}/config.pbtxt")
    (folder / "config.pbtxt").write_text(text)
    entry = {"artifact": str(path), "kind": meta.kind, "platform": config.platform,
             "max_batch_size": config.max_batch_size, "input": config.input[0].name, "output": config.output[0].name}
    problem = deepstream.deepstream_problem(meta)
    if problem:
        return {**entry, "deepstream": f"skipped: {problem}"}
    ds = stage / DEEPSTREAM_DIR
    ds.mkdir(exist_ok=True)
    labels = ds / f"{name}_labels.txt"
    shutil.copyfile(folder / LABELS, labels)
    (ds / f"{name}_nvinfer.txt").write_text(deepstream.deepstream_config(
        model, meta, labels, graph_tensors(model, meta), batch_size=s.max_batch_size, relative_to=ds))
    return {**entry, "deepstream": f"{DEEPSTREAM_DIR}/{name}_nvinfer.txt"}


