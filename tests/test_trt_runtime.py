"""trt/runtime.py and trt/timing.py: the engine's record, TensorRT's compatibility rules, the lean runtime choice,
shape checks, dtypes and pinned views, a foreign engine's I/O and shapes (plain Python), the runners' refusal where
TensorRT is missing, and real engines end to end where TensorRT and a GPU are present."""

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
from trt.engine import (
    EngineRunner,
    IoTensor,
    describe_io,
    engine_precision,
    random_input,
    resolve_engine_shapes,
    tensor_bytes,
)
from trt.runtime import (
    LEAN_RUNTIME_ENV,
    TrtRunner,
    check_shape,
    cuda_check,
    current_device,
    lean_runtime_path,
    load_sidecar,
    numpy_dtype,
    other_gpu_note,
    pinned_array,
    sidecar_mismatch,
    version_problem,
)
from trt.timing import foreign_engine_step, time_compute, time_end_to_end

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


VC, EXCLUDED = {"version_compatible": True}, {"version_compatible": True, "exclude_lean_runtime": True}
A100, T4, RTX4080 = ("NVIDIA A100-SXM4-80GB", "8.0"), ("Tesla T4", "7.5"), ("NVIDIA GeForce RTX 4080", "8.9")
REFUSED_OLDER_OR_OTHER = (f"the engine was built version-compatible with TensorRT {TRT} (here {{}}); it runs on {TRT} "
                          "or a later 10.x or 11.x")
# (build options, TensorRT here, (GPU, compute capability) here) -> None where it may run, else what the line says;
# the plan was built by TensorRT 10.13.0.35 on an RTX 4090 (compute capability 8.9)
COMPATIBILITY = [
    ({}, TRT, (GPU, CC), None),
    ({}, "10.13.0.34", (GPU, CC), f"the engine was built with TensorRT {TRT} (here 10.13.0.34)"),  # the build differs
    ({}, "10.14.1.48", (GPU, CC), f"the engine was built with TensorRT {TRT} (here 10.14.1.48)"),
    ({}, "11.0.0.1", (GPU, CC), f"the engine was built with TensorRT {TRT} (here 11.0.0.1)"),
    (VC, "10.13.0.35", (GPU, CC), None),
    (VC, "10.13.3.9", (GPU, CC), None),  # a later patch
    (VC, "10.16.1.11", (GPU, CC), None),  # a later minor
    (VC, "11.0.0.1", (GPU, CC), None),  # the next major: TensorRT 10 version-compatible plans run on 11
    (VC, "11.4.1.5", (GPU, CC), None),
    (VC, "10.12.0.36", (GPU, CC), REFUSED_OLDER_OR_OTHER.format("10.12.0.36")),  # older
    (VC, "10.13.0.34", (GPU, CC), REFUSED_OLDER_OR_OTHER.format("10.13.0.34")),
    (VC, "12.0.0.1", (GPU, CC), REFUSED_OLDER_OR_OTHER.format("12.0.0.1")),  # no documented 10 -> 12
    (EXCLUDED, "11.4.1.5", (GPU, CC), None),  # no lean runtime inside: the same versions, the runner loads it
    (EXCLUDED, "10.12.0.36", (GPU, CC), REFUSED_OLDER_OR_OTHER.format("10.12.0.36")),
    ({}, TRT, RTX4080, None),  # another model of the same compute capability: TensorRT only warns (other_gpu_note)
    ({}, TRT, A100, f"the engine was built for {GPU} (GPUs of compute capability {CC}) (here {A100[0]}, 8.0)"),
    ({"hardware_compat": "ampere+"}, TRT, ("NVIDIA H100 80GB HBM3", "9.0"), None),
    ({"hardware_compat": "ampere+"}, TRT, ("NVIDIA A10", "8.6"), None),
    ({"hardware_compat": "ampere+"}, TRT, ("NVIDIA GeForce RTX 5090", "12.0"), None),
    ({"hardware_compat": "ampere+"}, TRT, T4,
     "the engine was built for Ampere or newer GPUs (compute capability 8.0 or more) (here Tesla T4, 7.5)"),
    ({"hardware_compat": "same"}, TRT, RTX4080, None),
    ({"hardware_compat": "same"}, TRT, ("NVIDIA GeForce RTX 3090", "8.6"),
     f"the engine was built for GPUs of compute capability {CC} (here NVIDIA GeForce RTX 3090, 8.6)"),
    ({**VC, "hardware_compat": "ampere+"}, "11.1.0.3", ("NVIDIA L4", "8.9"), None),
    ({}, "10.3.0", T4, f"the engine was built with TensorRT {TRT} (here 10.3.0); the engine was built for {GPU} "
                       f"(GPUs of compute capability {CC}) (here Tesla T4, 7.5)"),
]


@pytest.mark.parametrize("build, here, gpu, expected", COMPATIBILITY)
def test_sidecar_mismatch(build, here, gpu, expected):
    assert sidecar_mismatch(sidecar(**build), here, *gpu) == expected


@pytest.mark.parametrize("built, here, allowed", [
    ("8.6.1.6", "8.6.1.6", True), ("8.6.1.6", "9.3.0.1", True), ("8.6.1.6", "10.13.0.35", True),
    ("8.6.1.6", "11.0.0.1", False),  # "a TensorRT 8 engine cannot run with a TensorRT 11 runtime"
    ("10.3.0.26", "11.4.1.5", True), ("11.0.0.1", "11.1.0.3", True),
    ("11.1.0.3", "11.0.0.1", False), ("11.1.0.3", "10.16.1.11", False), ("11.0.0.1", "12.0.0.1", False),
])
def test_version_compatible_across_majors(built, here, allowed):
    """TensorRT's support matrix: across majors only 8 -> 9, 8 -> 10 and 10 -> 11; within a major, any later one."""
    problem = version_problem(built, here, version_compatible=True)
    assert (problem is None) == allowed, problem
    assert version_problem(built, built, version_compatible=False) is None
    if built != here:
        assert version_problem(built, here, version_compatible=False) == \
            f"the engine was built with TensorRT {built} (here {here})"


def test_other_gpu_note():
    assert other_gpu_note(sidecar(), GPU) is None
    note = other_gpu_note(sidecar(), RTX4080[0])
    assert note and GPU in note and RTX4080[0] in note and "rebuild it here" in note and "\n" not in note
    assert other_gpu_note(sidecar(hardware_compat="same"), RTX4080[0]) is None  # built for any GPU of its capability


def test_lean_runtime_path(tmp_path, monkeypatch):
    """A plan built without its lean runtime runs on another TensorRT only through the lean runtime library of the
    TensorRT that built it: given, else from $TRANSKD_TRT_LEAN_RUNTIME; the TensorRT that built it needs none."""
    monkeypatch.delenv(LEAN_RUNTIME_ENV, raising=False)
    library = tmp_path / "libnvinfer_lean.so.10"
    library.write_bytes(b"a lean runtime library")
    excluded = sidecar(**EXCLUDED)
    for meta in (sidecar(), sidecar(**VC)):  # no lean runtime to load: plain plans and plans carrying their own
        assert lean_runtime_path(meta, "11.0.0.1", library, "x.plan") is None
    assert lean_runtime_path(excluded, TRT, None, "x.plan") is None  # its own TensorRT
    assert lean_runtime_path(excluded, TRT, library, "x.plan") == str(library)  # given: used
    with pytest.raises(InputError) as e:
        lean_runtime_path(excluded, "11.0.0.1", None, "x.plan")
    one_line(e, "x.plan: built version-compatible without its lean runtime (--exclude-lean-runtime) by TensorRT "
                f"{TRT}, here 11.0.0.1: give libnvinfer_lean.so.10 of TensorRT {TRT} in {LEAN_RUNTIME_ENV}")
    monkeypatch.setenv(LEAN_RUNTIME_ENV, str(library))
    assert lean_runtime_path(excluded, "11.0.0.1", None, "x.plan") == str(library)
    other = tmp_path / "other.so"
    other.write_bytes(b"")
    assert lean_runtime_path(excluded, "11.0.0.1", other, "x.plan") == str(other)  # the argument wins
    with pytest.raises(InputError) as e:
        lean_runtime_path(excluded, "10.14.1.48", tmp_path / "missing.so", "x.plan")
    one_line(e, "x.plan: lean runtime", "missing.so: no such file (expected libnvinfer_lean.so.10 of TensorRT")


def test_current_device_restores_the_callers():
    class Runtime:  # the two cuda-python calls current_device makes, recording each device made current
        def __init__(self, current: int) -> None:
            self.current, self.made = current, []

        def cudaGetDevice(self):
            return 0, self.current

        def cudaSetDevice(self, device: int):
            self.made.append(device)
            self.current = device
            return (0,)

    rt = Runtime(0)
    with current_device(rt, 1):
        assert rt.current == 1
    assert (rt.current, rt.made) == (0, [1, 0])
    with pytest.raises(RuntimeError), current_device(rt, 1):
        raise RuntimeError("a failed capture")
    assert rt.current == 0
    rt = Runtime(1)
    with current_device(rt, 1):
        pass
    assert rt.made == []  # already current: no call


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


# ------------------------------------------------------------------------------------- engines without a record
def tensors() -> list[IoTensor]:
    """The I/O of a detector-like engine trtexec built from someone else's ONNX: a dynamic image input with its
    profile 0, a static uint8 input, an int32 input with a dynamic batch, two outputs (what engine_io reads)."""
    image = IoTensor("images", "input", "FLOAT", (-1, 3, -1, -1), ((1, 3, 256, 256), (4, 3, 512, 512),
                                                                    (8, 3, 1024, 1024)))
    return [image, IoTensor("lut", "input", "UINT8", (256,)),
            IoTensor("ids", "input", "INT32", (-1, 2), ((1, 2), (4, 2), (8, 2))),
            IoTensor("boxes", "output", "HALF", (-1, 100, 4)), IoTensor("scores", "output", "FLOAT", (-1, 100))]


def test_resolve_engine_shapes():
    got = resolve_engine_shapes(tensors(), {}, 2, (512, 640), "det.plan")
    assert got == {"images": (2, 3, 512, 640), "lut": (256,), "ids": (2, 2)}
    assert resolve_engine_shapes(tensors(), {"images": (1, 3, 300, 300)}, 4, None, "det.plan") == \
        {"images": (1, 3, 300, 300), "lut": (256,), "ids": (4, 2)}  # --shapes wins; the rest by --batch
    cases = [({}, 2, (2048, 640), "det.plan: input 'images' dim 2 is 2048, outside profile 0's 256..1024 "
                                  "(min 1x3x256x256, max 8x3x1024x1024)"),
             ({}, 16, (512, 512), "det.plan: input 'images' dim 0 is 16, outside profile 0's 1..8"),
             ({"ids": (9, 2)}, 1, (512, 512), "det.plan: input 'ids' dim 0 is 9, outside profile 0's 1..8 (min 1x2, "
                                              "max 8x2)"),
             ({}, 1, None, "has a dynamic dim 2: give --size HxW"),
             ({"image": (1, 3, 8, 8)}, 1, (8, 8), "det.plan: --shapes names 'image', but the inputs are 'images'"),
             ({"lut": (255,)}, 1, (512, 512), "det.plan: --shapes lut:255 does not fit the input's 256")]
    for shapes, batch, size, expected in cases:
        with pytest.raises(InputError) as e:
            resolve_engine_shapes(tensors(), shapes, batch, size, "det.plan")
        one_line(e, expected)
    shape_tensor = IoTensor("new_shape", "input", "INT64", (4,), host=True)
    with pytest.raises(InputError) as e:
        resolve_engine_shapes([*tensors(), shape_tensor], {}, 1, (512, 512), "det.plan")
    one_line(e, "det.plan: input 'new_shape' is a shape tensor (values read on the host): not supported")


def test_describe_io_and_precision():
    shapes = {"images": (2, 3, 512, 640), "lut": (256,), "ids": (2, 2), "boxes": (2, 100, 4), "scores": (2, 100)}
    assert describe_io(tensors(), shapes) == (
        {"images": "2x3x512x640 float32", "lut": "256 uint8", "ids": "2x2 int32"},
        {"boxes": "2x100x4 float16", "scores": "2x100 float32"})
    assert engine_precision(tensors()) == "fp16"  # a float16 output
    assert engine_precision(tensors()[:3] + tensors()[4:]) == "unknown"  # float32 and integer I/O: any precision
    assert engine_precision([IoTensor("x", "input", "INT8", (1, 3, 8, 8))]) == "int8"
    assert engine_precision([IoTensor("x", "input", "BF16", (1, 8)), IoTensor("y", "output", "FLOAT", (1,))]) == "bf16"


def test_tensor_bytes():
    assert tensor_bytes(IoTensor("x", "input", "FLOAT", (-1, 3, 4, 4)), (2, 3, 4, 4), "a.plan") == 2 * 3 * 4 * 4 * 4
    assert tensor_bytes(IoTensor("x", "input", "INT64", (5,)), (5,), "a.plan") == 40
    chw16 = IoTensor("x", "input", "HALF", (1, 3, 4, 4), vector=(1, 16))  # channels padded to whole vectors of 16
    assert tensor_bytes(chw16, (1, 3, 4, 4), "a.plan") == 16 * 4 * 4 * 2
    chw32 = IoTensor("x", "input", "INT8", (1, 64, 2, 2), vector=(1, 32))
    assert tensor_bytes(chw32, (1, 64, 2, 2), "a.plan") == 64 * 4
    with pytest.raises(InputError) as e:
        tensor_bytes(IoTensor("w", "input", "INT4", (8,)), (8,), "a.plan")
    one_line(e, "a.plan: tensor 'w' is TensorRT type INT4; supported: FLOAT, HALF, BF16")


def test_random_input():
    made = {dtype: random_input(IoTensor("x", "input", dtype, (1000,)), 1000, np.random.default_rng(0))
            for dtype in ("FLOAT", "HALF", "BF16", "INT8", "UINT8", "INT32", "INT64", "BOOL", "FP8")}
    assert {k: v.dtype.name for k, v in made.items()} == {
        "FLOAT": "float32", "HALF": "float16", "BF16": "uint16", "INT8": "int8", "UINT8": "uint8", "INT32": "int32",
        "INT64": "int64", "BOOL": "bool", "FP8": "uint8"}
    assert all(v.shape == (1000,) for v in made.values())
    assert 0.8 < made["FLOAT"].std() < 1.2 and np.isfinite(made["HALF"]).all()
    bf16 = (made["BF16"].astype(np.uint32) << 16).view(np.float32)  # bfloat16 is float32's upper half
    assert np.isfinite(bf16).all() and 0.8 < bf16.std() < 1.2
    assert made["INT8"].min() < -100 and made["INT8"].max() > 100 and made["UINT8"].max() > 200
    assert 0 <= made["INT32"].min() and made["INT64"].max() < 8  # small: an index input stays in range
    assert made["BOOL"].any() and not made["BOOL"].all() and made["FP8"].max() < 0x78  # finite E4M3 codes
    again = random_input(IoTensor("x", "input", "FLOAT", (1000,)), 1000, np.random.default_rng(0))
    np.testing.assert_array_equal(again, made["FLOAT"])  # seeded


def test_foreign_engine_without_tensorrt(tmp_path):
    reason = _no_tensorrt()
    plan = tmp_path / "foreign.plan"
    plan.write_bytes(b"an engine trtexec wrote")
    with pytest.raises(ExportError, match=re.escape(f"{plan}: cannot run the engine: {reason}")) as e:
        foreign_engine_step(plan, {}, 1, (512, 512), cuda_graph=False, e2e=True)
    one_line(e)
    with pytest.raises(InputError) as e:
        foreign_engine_step(tmp_path / "missing.plan", {}, 1, None, cuda_graph=False, e2e=False)
    one_line(e, "missing.plan: no such TensorRT engine file")
    with pytest.raises(ExportError, match=re.escape(reason)):
        EngineRunner(plan)


# ------------------------------------------------------------------------------------ where TensorRT and a GPU are
def tiny_engine(folder: Path, name: str = "tiny.fp16", **options) -> Path:
    """y = relu(x * 0.5) in float16 between float32 I/O (exact for float16 values of x), batch 1..4, built by
    trt/build.py with `options` (version_compatible ...)."""
    onnx_path = save(graph("fp16", shape=("batch", 3, 8, 8)), folder / f"{name}.onnx")
    meta = build_engine(onnx_path, folder / f"{name}.plan", min_shapes={"image": (1, 3, 8, 8)},
                        opt_shapes={"image": (2, 3, 8, 8)}, max_shapes={"image": (4, 3, 8, 8)}, workspace_gib=0.5,
                        **options)
    assert meta == read_sidecar(folder / f"{name}.plan", verify=True)
    return folder / f"{name}.plan"


@pytest.fixture
def engine(tmp_path) -> Path:
    if tensorrt_unavailable():
        pytest.skip(f"needs TensorRT and a CUDA GPU: {tensorrt_unavailable()}")
    pytest.importorskip("cuda.bindings", reason="needs cuda-python (the cu12 / cu13 extra)")
    return tiny_engine(tmp_path)


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
        # on the caller's own stream, no synchronisation by hand: the input written by the caller's work before the
        # call, the output read by its work after it, ordered by the runner's stream waiting and waited on
        caller = torch.cuda.Stream()
        with torch.cuda.stream(caller):
            big = torch.from_numpy(x).cuda().repeat(1, 1, 64, 64)[:, :, :8, :8] * 2  # queued work the engine must await
            twice = runner.infer_torch(big.contiguous()) * 2
            got = twice.cpu().numpy()  # copies on the caller's stream, which waited on the runner's
        np.testing.assert_allclose(got, np.maximum(x * 2 * 0.5, 0) * 2, rtol=1e-6)
    runner.close()  # twice is fine


def test_foreign_engine_step(engine):
    """A plan timed the way trtexec times one: no record needed, its I/O read from the engine."""
    sidecar_path(engine).unlink()
    info, step = foreign_engine_step(engine, {}, 3, None, cuda_graph=True, e2e=True, seed=1)
    assert info == {"backend": "tensorrt", "device": "cuda", "precision": "unknown", "batch": 3, "size": "-",
                    "inputs": {"image": "3x3x8x8 float32"}, "outputs": {"y": "3x3x8x8 float32"}}
    ms = step(4)
    assert sorted(ms) == ["compute", "d2h", "end_to_end", "h2d"] and all(len(v) == 4 for v in ms.values())
    assert min(ms["compute"]) > 0 and all(t + 1e-3 >= h + d for t, h, d in zip(ms["end_to_end"], ms["h2d"], ms["d2h"]))
    assert len(foreign_engine_step(engine, {"image": (2, 3, 8, 8)}, 1, None, False, False)[1](2)["compute"]) == 2
    with pytest.raises(InputError, match=r"input 'image' dim 0 is 5, outside profile 0's 1\.\.4"):
        foreign_engine_step(engine, {}, 5, None, cuda_graph=False, e2e=False)
    with EngineRunner(engine) as runner:  # the random input really goes through the engine
        runner.set_shapes({"image": (2, 3, 8, 8)})
        runner.fill_random(0)
        with runner.on_device():
            runner.copy_to_device()
            runner.execute()
            runner.copy_to_host()
            runner.synchronize()
        x = runner.host("image").astype(np.float16).astype(np.float32)
        np.testing.assert_allclose(runner.host("y"), np.maximum(x * 0.5, 0), rtol=1e-3, atol=1e-3)


def test_version_compatible_plan_without_its_lean_runtime(engine, monkeypatch):
    """Built with --exclude-lean-runtime: the TensorRT that built it runs it by itself, and through the lean runtime
    library it loads (IRuntime.load_runtime) where that library is installed (the tensorrt wheels ship it)."""
    import glob
    import sysconfig

    monkeypatch.delenv(LEAN_RUNTIME_ENV, raising=False)
    plan = tiny_engine(engine.parent, "vc.fp16", version_compatible=True, exclude_lean_runtime=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float16).astype(np.float32)
    with TrtRunner(plan) as runner:
        np.testing.assert_allclose(runner.infer(x), np.maximum(x * 0.5, 0), rtol=1e-6)
    with pytest.raises(InputError, match="missing.so: no such file"):
        TrtRunner(plan, lean_runtime=engine.parent / "missing.so")
    libraries = sorted(glob.glob(f"{sysconfig.get_paths()['purelib']}/tensorrt*/libnvinfer_lean.so.*"))
    if libraries:
        with TrtRunner(plan, lean_runtime=libraries[0]) as runner:
            np.testing.assert_allclose(runner.infer(x), np.maximum(x * 0.5, 0), rtol=1e-6)


def test_cuda_graph_on_the_second_gpu(engine):
    """A runner on cuda:1 captures and launches its graph on device 1, and leaves device 0 current."""
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2 or torch.cuda.get_device_name(0) != torch.cuda.get_device_name(1):
        pytest.skip("needs two GPUs of one model")
    from trt.runtime import cudart

    rt = cudart()
    cuda_check("cudaSetDevice", rt.cudaSetDevice(0))
    with TrtRunner(engine, device=1) as runner:
        cuda_check("cudaSetDevice", rt.cudaSetDevice(0))
        assert len(time_compute(runner, 3, 1, cuda_graph=True)) == 3
        assert cuda_check("cudaGetDevice", rt.cudaGetDevice()) == 0
        x = torch.ones((2, 3, 8, 8), device="cuda:1")
        assert float(runner.infer_torch(x).sum().cpu()) == 2 * 3 * 8 * 8 * 0.5


def test_runner_refuses_other_tensorrt(engine):
    side = load_sidecar(engine)
    write_sidecar(engine, replace(side, details={**side.details, "tensorrt": "9.0.0"}))
    with pytest.raises(InputError, match=r"built with TensorRT 9\.0\.0 \(here .*\); rebuild it here"):
        TrtRunner(engine)
