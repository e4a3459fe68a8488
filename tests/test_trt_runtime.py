"""trt/runtime.py: the engine's record, its compatibility and shape checks, dtypes and pinned views (plain Python),
the runner's refusal where TensorRT is missing, and a real engine end to end where TensorRT and a GPU are present."""

import ctypes
import enum
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts import Metadata, read_sidecar, sidecar_path, write_sidecar
from pipeline.errors import ExportError, InputError
from pipeline.io import sha256_file
from pipeline.onnxinfo import OnnxInfo, Tensor
from tests.test_trt_build import _no_tensorrt, exported, graph, save
from trt.build import BuildOptions, build_engine, engine_record, tensorrt_unavailable
from trt.runtime import (
    TrtRunner,
    check_shape,
    cuda_check,
    load_sidecar,
    numpy_dtype,
    pinned_array,
    sidecar_mismatch,
)
from trt.timing import time_compute, time_end_to_end

TRT, GPU, CC = "10.13.0.35", "NVIDIA GeForce RTX 4090", "8.9"
PROFILE = {"min": [1, 3, 256, 512], "opt": [2, 3, 512, 1024], "max": [4, 3, 1024, 2048]}


def sidecar(name: str = "student.int8.plan", dynamic: bool = True, **build) -> Metadata:
    """The record trt/build.py's build_engine writes beside a plan, made by the same function (`build`: the
    BuildOptions fields, such as hardware_compat or version_compatible)."""
    image = Tensor("image", "float32", ("batch", 3, "height", "width") if dynamic else (1, 3, 512, 1024))
    logits = Tensor("logits", "float32", ("batch", 19, "height/4", "width/4") if dynamic else (1, 19, 128, 256))
    ranges = tuple(tuple(PROFILE[k]) for k in ("min", "opt", "max")) if dynamic else ((1, 3, 512, 1024),) * 3
    meta = engine_record(exported("int8", image.shape), OnnxInfo([image], [logits], "int8", 17, {}),
                         {"image": ranges}, BuildOptions(**build), onnx_file=name.replace(".plan", ".onnx"),
                         onnx_sha256="0" * 64, tensorrt=TRT, gpu={"name": GPU, "compute_capability": CC},
                         timing_cache=None, seconds=41.2)
    return replace(meta, file=name, sha256="1" * 64, bytes=16)


def plan_files(tmp_path: Path, side: Metadata | None = None) -> Path:
    """A plan-like file (TensorRT is never asked to read it in these tests) and its sidecar."""
    plan = tmp_path / "student.int8.plan"
    plan.write_bytes(b"not a real engine")
    write_sidecar(plan, side or sidecar())
    return plan


def one_line(excinfo: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and all(p in message for p in parts), message
    return message


def test_load_sidecar(tmp_path):
    plan = plan_files(tmp_path)
    meta = load_sidecar(plan)
    assert meta == replace(sidecar(), sha256=sha256_file(plan), bytes=plan.stat().st_size)
    assert meta.kind == "plan-int8" and meta.details["inputs"][0]["profile"] == PROFILE


def test_load_sidecar_refuses_missing_and_broken_files(tmp_path):
    with pytest.raises(InputError) as e:
        load_sidecar(tmp_path / "missing.plan")
    one_line(e, "missing.plan", "no such TensorRT engine file")
    plan = plan_files(tmp_path)
    side = sidecar_path(plan)
    side.unlink()
    with pytest.raises(InputError) as e:
        load_sidecar(plan)
    one_line(e, str(side), "missing", "sidecar beside it")
    record = sidecar().to_dict()
    details = record["details"]
    no_version = {k: v for k, v in details.items() if k != "tensorrt"}
    old = {"file": "x", "tensorrt": "10.3", "gpu": {}, "inputs": [], "outputs": [], "build": {}}  # before the record
    for text, expected in (('{"file": "student.int8.plan", "tensorrt": ', "unreadable sidecar"),
                           ("\xff\xfe", "unreadable sidecar"),
                           ('["a list"]', "expected a JSON object"),
                           (json.dumps(old), "field 'schema' is None"),
                           (json.dumps({**record, "kind": "onnx-int8"}), "field 'kind' is 'onnx-int8'"),
                           (json.dumps({**record, "details": no_version}), "field 'details.tensorrt' missing"),
                           (json.dumps({**record, "details": {**details, "gpu": {}}}), "field 'details.gpu'"),
                           (json.dumps({**record, "details": {**details, "inputs": []}}), "field 'details.inputs[0]'")):
        side.write_bytes(text.encode("latin-1"))
        with pytest.raises(InputError) as e:
            load_sidecar(plan)
        one_line(e, str(side), expected)


def test_sidecar_mismatch_tensorrt_version():
    assert sidecar_mismatch(sidecar(), TRT, GPU, CC) is None
    message = sidecar_mismatch(sidecar(), "10.14.1.48", GPU, CC)
    assert message == f"the engine was built with TensorRT {TRT} (here 10.14.1.48)"
    assert TRT in sidecar_mismatch(sidecar(), "10.13.0.34", GPU, CC)
    compatible = sidecar(version_compatible=True)
    assert sidecar_mismatch(compatible, TRT, GPU, CC) is None
    assert sidecar_mismatch(compatible, "10.14.1.48", GPU, CC) is None  # later 10.x
    for here in ("10.12.0.36", "11.0.0.1"):  # older, or the next major
        message = sidecar_mismatch(compatible, here, GPU, CC)
        assert message and TRT in message and f"(here {here})" in message and "later 10.x" in message


def test_sidecar_mismatch_gpu():
    message = sidecar_mismatch(sidecar(), TRT, "NVIDIA A100-SXM4-80GB", "8.0")
    assert message == f"the engine was built for GPU {GPU} ({CC}) (here NVIDIA A100-SXM4-80GB, 8.0)"
    assert sidecar_mismatch(sidecar(), TRT, "NVIDIA GeForce RTX 4080", CC)  # same compute capability, other model
    ampere = sidecar(hardware_compat="ampere+")
    assert sidecar_mismatch(ampere, TRT, "NVIDIA H100 80GB HBM3", "9.0") is None
    assert sidecar_mismatch(ampere, TRT, "NVIDIA A10", "8.6") is None
    message = sidecar_mismatch(ampere, TRT, "Tesla T4", "7.5")
    assert message and "Ampere or newer" in message and "Tesla T4, 7.5" in message
    same = sidecar(hardware_compat="same")
    assert sidecar_mismatch(same, TRT, "NVIDIA GeForce RTX 4080", CC) is None
    message = sidecar_mismatch(same, TRT, "NVIDIA GeForce RTX 3090", "8.6")
    assert message and f"compute capability {CC}" in message and "RTX 3090, 8.6" in message
    both = sidecar_mismatch(sidecar(), "10.3.0", "Tesla T4", "7.5")
    assert both and "TensorRT" in both and "Tesla T4" in both and "; " in both and "\n" not in both


def test_check_shape_static():
    static = sidecar(dynamic=False)
    check_shape(static, (1, 3, 512, 1024))
    check_shape(static, np.array([1, 3, 512, 1024]))
    with pytest.raises(InputError) as e:
        check_shape(static, (2, 3, 512, 1024))
    one_line(e, "student.int8.plan", "'image'", "2x3x512x1024", "static, 1x3x512x1024")
    with pytest.raises(InputError) as e:
        check_shape(static, (3, 512, 1024))
    one_line(e, "3x512x1024", "expected 4 dims")


def test_check_shape_profile():
    dynamic = sidecar()
    for shape in ((1, 3, 256, 512), (3, 3, 600, 700), (4, 3, 1024, 2048)):
        check_shape(dynamic, shape)
    cases = [((8, 3, 512, 1024), "batch 8 is outside the engine's profile 1..4"),
             ((1, 3, 128, 1024), "height 128 is outside the engine's profile 256..1024"),
             ((1, 3, 512, 4096), "width 4096 is outside the engine's profile 512..2048"),
             ((1, 4, 512, 1024), "dim 1 4 is outside the engine's profile 3..3")]
    for shape, expected in cases:
        with pytest.raises(InputError) as e:
            check_shape(dynamic, shape)
        one_line(e, "student.int8.plan", "x".join(map(str, shape)), expected, "min 1x3x256x512, max 4x3x1024x2048")


def test_numpy_dtype():
    assert numpy_dtype("FLOAT") == np.float32 and numpy_dtype("HALF") == np.float16
    assert [numpy_dtype(t) for t in ("INT8", "UINT8", "INT32", "INT64", "BOOL")] == \
        [np.int8, np.uint8, np.int32, np.int64, np.bool_]
    with pytest.raises(ExportError, match="student.plan 'image': TensorRT type BF16 has no numpy equivalent"):
        numpy_dtype("BF16", "student.plan 'image'")


def test_pinned_array_is_a_view():
    memory = (ctypes.c_float * 6)(*range(6))
    view = pinned_array(ctypes.addressof(memory), np.dtype(np.float32), (2, 3))
    assert view.shape == (2, 3) and view.tolist() == [[0, 1, 2], [3, 4, 5]]
    view[1, 2] = 42
    assert memory[5] == 42  # writes land in the memory itself: the H2D copy reads what infer() put there


def test_check_cuda_results():
    class cudaError_t(enum.IntEnum):  # the shape of cuda-python's error enum
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    assert cuda_check("cudaMalloc", (cudaError_t.cudaSuccess, 1234)) == 1234
    assert cuda_check("cudaFree", (cudaError_t.cudaSuccess,)) is None
    assert cuda_check("cudaStreamGetPriority", (cudaError_t.cudaSuccess, 1, 2)) == (1, 2)
    with pytest.raises(ExportError, match=r"^cudaMalloc failed: cudaErrorMemoryAllocation \(error 2\)$"):
        cuda_check("cudaMalloc", (cudaError_t.cudaErrorMemoryAllocation, 0))


def test_runner_without_tensorrt(tmp_path):
    reason = _no_tensorrt()
    plan = plan_files(tmp_path)
    with pytest.raises(ExportError, match=re.escape(f"{plan}: cannot run the engine: {reason}")) as e:
        TrtRunner(plan)
    one_line(e)
    sidecar_path(plan).unlink()  # the sidecar is read first: a missing one is the user's input, on any machine
    with pytest.raises(InputError, match="missing"):
        TrtRunner(plan)


# ------------------------------------------------------------------------------------ where TensorRT and a GPU are
@pytest.fixture
def engine(tmp_path) -> Path:
    if tensorrt_unavailable():
        pytest.skip(f"needs TensorRT and a CUDA GPU: {tensorrt_unavailable()}")
    pytest.importorskip("cuda.bindings", reason="needs cuda-python (requirements-gpu.txt)")
    # y = relu(x * 0.5) in float16 between float32 I/O: exact for float16 values of x
    onnx_path = save(graph("fp16", shape=("batch", 3, 8, 8)), tmp_path / "tiny.fp16.onnx")
    meta = build_engine(onnx_path, tmp_path / "tiny.fp16.plan", min_shapes={"image": (1, 3, 8, 8)},
                        opt_shapes={"image": (2, 3, 8, 8)}, max_shapes={"image": (4, 3, 8, 8)}, workspace_gib=0.5)
    assert meta == read_sidecar(tmp_path / "tiny.fp16.plan", verify=True)
    return tmp_path / "tiny.fp16.plan"


def test_build_engine_writes_the_plan_record(engine):
    import tensorrt as trt

    meta = load_sidecar(engine)
    onnx_path = engine.with_suffix(".onnx")
    assert (meta.kind, meta.precision, meta.source, meta.details["source_file"]) == \
        ("plan-fp16", "fp16", onnx_path.name, onnx_path.name)
    assert meta.source_sha256 == sha256_file(onnx_path) and meta.sha256 == sha256_file(engine)
    assert meta.versions["tensorrt"] == meta.details["tensorrt"] == trt.__version__
    assert meta.details["inputs"][0]["profile"] == {"min": [1, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [4, 3, 8, 8]}


def test_runner_end_to_end(engine):
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float16).astype(np.float32)
    with TrtRunner(engine) as runner:
        assert (runner.input_name, runner.output_name, runner.input_shape) == ("image", "y", (2, 3, 8, 8))
        assert runner.input_dtype == runner.output_dtype == np.float32
        y = runner.infer(x)
        np.testing.assert_allclose(y, np.maximum(x * 0.5, 0), rtol=1e-6)
        assert runner.input_shape == (3, 3, 8, 8) and runner.infer(x[:1]).shape == (1, 3, 8, 8)
        np.testing.assert_allclose(y, np.maximum(x * 0.5, 0), rtol=1e-6)  # a copy: the next call left it alone
        with pytest.raises(InputError, match="batch 5 is outside the engine's profile 1..4"):
            runner.set_input_shape((5, 3, 8, 8))
        with pytest.raises(InputError, match="takes float32, got float64"):
            runner.infer(x.astype(np.float64))
        for graph_mode in (False, True):
            times = time_compute(runner, 5, 2, cuda_graph=graph_mode)
            assert len(times) == 5 and all(t > 0 for t in times)
        e2e = time_end_to_end(runner, x, 4, 1)
        assert list(e2e) == ["h2d", "compute", "d2h", "total"] and all(len(v) == 4 for v in e2e.values())
        assert all(t >= h for t, h in zip(e2e["total"], e2e["h2d"]))
        torch = pytest.importorskip("torch")
        out = runner.infer_torch(torch.from_numpy(x).cuda())
        torch.cuda.synchronize()
        np.testing.assert_allclose(out.cpu().numpy(), np.maximum(x * 0.5, 0), rtol=1e-6)
    runner.close()  # twice is fine


def test_runner_refuses_other_tensorrt(engine):
    side = load_sidecar(engine)
    write_sidecar(engine, replace(side, details={**side.details, "tensorrt": "9.0.0"}))
    with pytest.raises(InputError, match=r"built with TensorRT 9\.0\.0 \(here .*\); rebuild it here"):
        TrtRunner(engine)
