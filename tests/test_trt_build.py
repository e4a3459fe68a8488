"""trt/build.py where there is no TensorRT: shapes and profiles, precision detection, file naming, the engine's
artifact record, the CLI's checks (all made before TensorRT is imported) and mypy over trt/ against the TensorRT
stubs."""

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.artifacts import Metadata, read_sidecar, sidecar_path, write_sidecar
from pipeline.errors import ExportError, InputError
from pipeline.onnxinfo import OnnxInfo, Tensor, inspect_onnx, onnx_precision, parse_shapes
from tests.conftest import ROOT, run_cli
from tests.test_artifacts import golden
from tests.test_artifacts import shape as key_tree
from trt.build import (
    BuildOptions,
    build_engine,
    engine_record,
    resolve_profile,
    tensorrt_unavailable,
    timing_cache_path,
)

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
PRECISION = {"fp32": "fp32", "fp16": "fp16", "fp16-io": "fp16", "int8": "int8"}  # graph kind -> ONNX precision


def exported(precision: str = "int8", shape=(1, 3, 8, 8)) -> Metadata:
    """The record the export stage writes into a graph of `precision` and input `shape` (the golden ONNX record)."""
    record = Metadata.from_dict(golden("onnx"), "tests/golden/onnx.json")
    dynamic = any(isinstance(d, str) for d in shape)
    size = [d if isinstance(d, int) else 8 for d in shape[2:]]
    contract = replace(record.contract, size=size, batch=None if dynamic else shape[0], dynamic=dynamic)
    kind = {"fp32": "onnx", "fp16": "onnx-fp16", "int8": "onnx-int8"}[precision]
    return replace(record, kind=kind, precision=precision, contract=contract, measured={})


def graph(kind: str = "fp32", shape=(1, 3, 8, 8), meta: dict | None = None) -> onnx.ModelProto:
    """A tiny real graph y = relu(x * w) in one of the ways our exporter writes precision into the ONNX, carrying
    the record the export stage writes (`meta`, when given, replaces the metadata: {} for a foreign graph)."""
    io_type = F16 if kind == "fp16-io" else F32
    x, y = (helper.make_tensor_value_info(name, io_type, list(shape)) for name in ("image", "y"))
    if kind == "fp32":
        inits = [numpy_helper.from_array(np.float32([0.5]), "w")]
        nodes = [helper.make_node("Mul", ["image", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])]
    elif kind == "fp16-io":  # float16 inputs and outputs, nothing else
        inits, nodes = [], [helper.make_node("Relu", ["image"], ["y"])]
    elif kind == "fp16":  # float32 I/O kept, float16 inside (onnxconverter's keep_io_types)
        inits = [numpy_helper.from_array(np.float16([0.5]), "w")]
        nodes = [helper.make_node("Cast", ["image"], ["h"], to=F16), helper.make_node("Mul", ["h", "w"], ["m"]),
                 helper.make_node("Cast", ["m"], ["r"], to=F32), helper.make_node("Relu", ["r"], ["y"])]
    else:  # int8: explicit Q/DQ
        inits = [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.int8(0), "z")]
        nodes = [helper.make_node("QuantizeLinear", ["image", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]), helper.make_node("Relu", ["d"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    props = exported(PRECISION[kind], shape).onnx_props() if meta is None else meta
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_parse_shapes():
    assert parse_shapes("image:1x3x512x1024") == {"image": (1, 3, 512, 1024)}
    assert parse_shapes("a:1x2, b:7") == {"a": (1, 2), "b": (7,)}
    assert parse_shapes("input:0:1x3") == {"input:0": (1, 3)}  # TensorFlow-style names keep their colon
    assert parse_shapes("") == parse_shapes(None) == {}
    for bad in ("image", "image:", "image:1x3x", "image:1xAx3", ":1x2", "image:1,3", "image:0x3", "a:1,a:2"):
        with pytest.raises(InputError, match="shape"):
            parse_shapes(bad)


def test_resolve_profile_dynamic_and_static():
    dyn = [Tensor("image", "float32", ("batch", 3, "height", "width"))]
    s, big = (1, 3, 256, 512), (4, 3, 512, 1024)
    assert resolve_profile(dyn, opt_shapes={"image": s}) == {"image": (s, s, s)}  # trtexec's --shapes
    assert resolve_profile(dyn, {"image": s}, {"image": s}, {"image": big}) == {"image": (s, s, big)}
    assert resolve_profile(dyn, max_shapes={"image": big})["image"] == (big, big, big)
    cases = [({}, "--opt image:<batch>x3x<height>x<width>"), ({"opt": {"nope": s}}, "no such input"),
             ({"opt": {"image": (1, 4, 8, 8)}}, "opt shape image:1x4x8x8 does not fit"),
             ({"opt": {"image": (1, 3, 8)}}, "does not fit"),
             ({"min": {"image": big}, "opt": {"image": s}}, "min <= opt <= max"),
             ({"opt": {"image": big}, "max": {"image": s}}, "min <= opt <= max")]
    for given, match in cases:
        with pytest.raises(InputError, match=match):
            resolve_profile(dyn, given.get("min"), given.get("opt"), given.get("max"))
    static = [Tensor("image", "float32", (1, 3, 8, 8))]
    assert resolve_profile(static) == {"image": ((1, 3, 8, 8),) * 3}
    assert resolve_profile(static, (m := {"image": (1, 3, 8, 8)}), m, m) == {"image": ((1, 3, 8, 8),) * 3}
    with pytest.raises(InputError, match="does not fit the input's shape 1x3x8x8"):
        resolve_profile(static, opt_shapes={"image": (2, 3, 8, 8)})


@pytest.mark.parametrize("kind, expected", [("fp32", "fp32"), ("fp16", "fp16"), ("fp16-io", "fp16"), ("int8", "int8")])
def test_onnx_precision(kind, expected):
    assert onnx_precision(graph(kind)) == expected


def test_onnx_precision_qdq_over_fp16_is_int8():
    model = graph("int8")
    model.graph.initializer.append(numpy_helper.from_array(np.float16([1.0]), "unused_half"))
    assert onnx_precision(model) == "int8"


def test_inspect_onnx(tmp_path):
    model = graph("fp16", shape=("batch", 3, 8, "width"), meta={"classes": '["road", "car"]', "input": "float"})
    model.graph.input.append(helper.make_tensor_value_info("w", F16, [1]))  # initializers listed as inputs
    info = inspect_onnx(save(model, tmp_path / "m.onnx"))
    assert info.inputs == [Tensor("image", "float32", ("batch", 3, 8, "width"))]
    assert [t.name for t in info.outputs] == ["y"] and info.outputs[0].dtype == "float32"
    assert (info.precision, info.opset, info.metadata) == ("fp16", 17, {"classes": '["road", "car"]', "input": "float"})
    with pytest.raises(InputError, match="no such ONNX file"):
        inspect_onnx(tmp_path / "missing.onnx")
    (tmp_path / "text.onnx").write_text("not a model\n")
    with pytest.raises(InputError, match="text.onnx: not an ONNX model"):
        inspect_onnx(tmp_path / "text.onnx")


def test_file_names(tmp_path):
    path = timing_cache_path(tmp_path, "10.13.0.35", "NVIDIA GeForce RTX 4090", "8.9")
    assert path == tmp_path / "timing-10.13.0.35-nvidia-geforce-rtx-4090-sm89.cache"
    assert timing_cache_path(tmp_path, "10.3.0", "NVIDIA H100 80GB HBM3", "9.0").name == \
        "timing-10.3.0-nvidia-h100-80gb-hbm3-sm90.cache"
    assert sidecar_path(tmp_path / "student.int8.plan") == tmp_path / "student.int8.plan.json"


def test_engine_record_is_the_golden_plan_record(tmp_path):
    """What build_engine writes beside a plan: the source graph's record with the engine kind and the build."""
    info = OnnxInfo([Tensor("image", "float32", (1, 3, 128, 256))], [Tensor("logits", "float32", (1, 19, 32, 64))],
                    "int8", 17, {})
    source = replace(Metadata.from_dict(golden("onnx"), "onnx"), kind="onnx-int8", precision="int8", measured={})
    meta = engine_record(source, info, {"image": ((1, 3, 128, 256),) * 3}, BuildOptions(),
                         onnx_file="student.int8.onnx", onnx_sha256="2" * 64, tensorrt="10.13.3.9",
                         gpu={"name": "NVIDIA H200", "compute_capability": "9.0"},
                         timing_cache="timing-10.13.3.9-nvidia-h200-sm90.cache", seconds=41.23)
    expected = golden("plan-int8")
    written = {"file": expected["file"], "sha256": expected["sha256"], "bytes": expected["bytes"]}
    assert replace(meta, **written).to_dict() == expected
    plan = tmp_path / "student.int8.plan"
    plan.write_bytes(b"plan")
    assert write_sidecar(plan, meta) == read_sidecar(plan, verify=True)
    assert key_tree(read_sidecar(plan).to_dict()) == key_tree(expected)


def test_engine_record_of_a_dynamic_graph_keeps_its_profile():
    info = OnnxInfo([Tensor("image", "float32", ("batch", 3, "height", "width"))],
                    [Tensor("logits", "float32", ("batch", 19, "height/4", "width/4"))], "fp16", 17, {})
    ranges = ((1, 3, 64, 64), (1, 3, 128, 256), (2, 3, 256, 512))
    meta = engine_record(exported("fp16", info.inputs[0].shape), info, {"image": ranges},
                         BuildOptions(2.0, 4, "ampere+", True), onnx_file="student.fp16.onnx", onnx_sha256="2" * 64,
                         tensorrt="10.13.3.9", gpu={"name": "NVIDIA H200", "compute_capability": "9.0"},
                         timing_cache=None, seconds=3.0)
    assert (meta.kind, meta.precision, meta.contract.dynamic) == ("plan-fp16", "fp16", True)
    (image,), (logits,) = meta.details["inputs"], meta.details["outputs"]
    assert image == {"name": "image", "dtype": "float32", "shape": ["batch", 3, "height", "width"],
                     "profile": {"min": [1, 3, 64, 64], "opt": [1, 3, 128, 256], "max": [2, 3, 256, 512]}}
    assert "profile" not in logits and logits["shape"] == ["batch", 19, "height/4", "width/4"]
    assert meta.details["build"] == {"strongly_typed": True, "workspace_gib": 2.0, "opt_level": 4,
                                     "hardware_compat": "ampere+", "version_compatible": True,
                                     "exclude_lean_runtime": False, "timing_cache": None, "seconds": 3.0}
    assert Metadata.from_dict(meta.to_dict(), "plan") == meta  # the validator takes it as written


def _no_tensorrt() -> str:
    reason = tensorrt_unavailable()
    if reason is None:
        pytest.skip("TensorRT and a CUDA GPU are usable here")
    return reason


def test_build_engine_without_tensorrt(tmp_path):
    reason = _no_tensorrt()
    assert "\n" not in reason and ("TensorRT" in reason or "GPU" in reason)
    onnx_path = save(graph("int8"), tmp_path / "student.int8.onnx")
    with pytest.raises(ExportError, match=re.escape(reason)):
        build_engine(onnx_path, tmp_path / "student.int8.plan", timing_cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.int8.onnx"]


def test_build_engine_refuses_foreign_and_fp32_graphs_before_tensorrt(tmp_path):
    """Checked on any machine: a graph without the export stage's record, and an FP32 graph, which no engine kind
    of the artifact table is built from."""
    foreign = save(graph("int8", meta={}), tmp_path / "foreign.onnx")
    with pytest.raises(InputError, match=r"foreign\.onnx: no 'transkd\.metadata' metadata; not a graph exported by "
                                         r"this pipeline") as e:
        build_engine(foreign)
    assert "\n" not in str(e.value)
    fp32 = save(graph("fp32"), tmp_path / "student.onnx")
    with pytest.raises(InputError, match=r"student\.onnx: an FP32 graph makes no engine kind \(plan-fp16, "
                                         r"plan-int8, plan-int8-qad\); build from the FP16 or INT8 ONNX "
                                         r"\(student\.fp16\.onnx, student\.int8\.onnx, student\.int8-qad\.onnx\)$"):
        build_engine(fp32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.onnx", "student.onnx"]


def cli(*args, cwd: Path) -> tuple[int, list[str]]:
    code, _, err = run_cli(*args, cwd=cwd, module="trt.build", timeout=120)
    return code, err.strip().splitlines()


@pytest.mark.parametrize("args, message", [
    (["missing.onnx"], "missing.onnx: no such ONNX file"),
    (["text.onnx"], "text.onnx: not an ONNX model"),
    (["m.onnx", "--opt", "image:1x3x"], "expected name:DxDx"),
    (["m.onnx", "--opt", "nope:1x3x64x64"], "no such input"),
    (["m.onnx"], "dynamic dims"),
    (["m.onnx", "--min", "image:2x3x64x64", "--opt", "image:1x3x64x64"], "min <= opt <= max"),
    (["m.onnx", "--opt-level", "7"], "invalid choice"),
    (["m.onnx", "--opt", "image:1x3x64x64", "--exclude-lean-runtime"], "version-compatible"),
    (["foreign.onnx"], "foreign.onnx: no 'transkd.metadata' metadata; not a graph exported by this pipeline"),
    (["fp32.onnx"], "fp32.onnx: an FP32 graph makes no engine kind"),
])
def test_cli_rejects_bad_input(tmp_path, args, message):
    dynamic = ("batch", 3, "height", "width")
    save(graph("fp16", shape=dynamic), tmp_path / "m.onnx")
    save(graph("fp16", shape=dynamic, meta={}), tmp_path / "foreign.onnx")
    save(graph("fp32", shape=dynamic), tmp_path / "fp32.onnx")
    (tmp_path / "text.onnx").write_text("not a model\n")
    rc, err = cli(*args, "-o", str(tmp_path / "m.plan"), cwd=tmp_path)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.onnx", "fp32.onnx", "m.onnx", "text.onnx"]


def test_cli_valid_call_without_tensorrt(tmp_path):
    reason = _no_tensorrt()
    save(graph("fp16", shape=("batch", 3, "height", "width")), tmp_path / "student.fp16.onnx")
    rc, err = cli("student.fp16.onnx", "--min", "image:1x3x64x64", "--opt", "image:1x3x128x256", "--max",
                  "image:2x3x256x512", "--workspace", "2", "--opt-level", "4", "--timing-cache", "cache",
                  "--hardware-compat", "ampere+", "--version-compatible", cwd=tmp_path)
    assert rc == 2 and err == [f"error: student.fp16.plan: cannot build the engine: {reason}"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.fp16.onnx"]


def repaired_tensorrt_stubs(dst: Path) -> str | None:
    """Copy the installed tensorrt-stubs into `dst`, repairing what keeps it from parsing (10.8 to 10.13:
    parameters named `in`, a required parameter after defaults); its version, or None when not installed."""
    try:
        dist = importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.suffix == ".pyi":
            text = re.sub(r"([(,] ?)in: ", r"\1in_: ", f.read_text())
            text = text.replace("channel_axis: int) -> IScaleLayer", "channel_axis: int = ...) -> IScaleLayer")
            try:
                ast.parse(text)
            except SyntaxError as e:
                pytest.fail(f"tensorrt-stubs {dist.version}: {f} line {e.lineno} does not parse after the repairs "
                            f"({e.msg}); extend repaired_tensorrt_stubs")
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            (dst / f).write_text(text)
    if not (dst / "tensorrt" / "__init__.pyi").is_file():
        pytest.fail(f"tensorrt-stubs {dist.version} is installed but has no tensorrt/__init__.pyi")
    return dist.version


def test_mypy_trt(tmp_path):
    """The TensorRT calls in trt/ cannot run here, so mypy checks them against the stubs. Without the stubs mypy
    takes TensorRT as untyped and checks no call: the test is skipped then, saying so, never green. A probe with a
    wrong TensorRT call, checked in the same run, proves the stubs are in use."""
    pytest.importorskip("mypy")
    stubs = repaired_tensorrt_stubs(tmp_path / "stubs")
    if stubs is None:
        pytest.skip("tensorrt-stubs is not installed (pip install tensorrt-stubs): mypy would check no TensorRT call")
    probe = tmp_path / "tensorrt_probe.py"
    probe.write_text("import tensorrt\n\ntensorrt.Runtime(tensorrt.Logger()).load_runtime(3)\n")
    r = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "trt", str(probe)],
                       cwd=ROOT, env={**os.environ, "MYPYPATH": str(tmp_path / "stubs")}, capture_output=True,
                       text=True, timeout=300)
    errors = [line for line in r.stdout.splitlines() if ": error: " in line]
    ours = [line for line in errors if probe.name not in line]
    assert not ours and not r.stderr, f"mypy (tensorrt-stubs {stubs}):\n{r.stdout}{r.stderr}"
    assert any(f"{probe.name}:3: error: " in line and "load_runtime" in line for line in errors), \
        f"mypy did not check the probe's TensorRT call against tensorrt-stubs {stubs}:\n{r.stdout}"
