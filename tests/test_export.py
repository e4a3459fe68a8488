"""Export: the deploy graph's contract, ONNX Runtime parity with PyTorch on real frames, and clean failures."""

import fcntl
import json

import cv2
import numpy as np
import onnx
import pytest
import torch

from pipeline import artifacts
from pipeline.config import ExportConfig
from pipeline.data import EvalTransform, build_dataset, network_input
from pipeline.errors import ConfigError, ExportError
from pipeline.evaluate import evaluate, predict
from pipeline.export import export_student
from pipeline.infer import ort_session
from tests.conftest import run_cli, splits
from tests.test_artifacts import golden, shape

SIZE = (64, 128)


@pytest.fixture(scope="module")
def data(synthetic):
    return splits(synthetic(6, 4, SIZE))


def plain(**kw) -> ExportConfig:
    return ExportConfig(**{"size": SIZE, "fp16": False, "int8": False, "parity_frames": 4, **kw})


def graph_input(rgb: np.ndarray, mean, std) -> np.ndarray:
    """A float graph's batch of one, as the export prepares its parity frames."""
    return network_input(rgb, SIZE, mean, std)[None]


def test_float_logits_graph_matches_pytorch_and_carries_its_contract(tmp_path, data, student):
    train, val = data
    report = export_student(student, tmp_path, plain(), val, train)
    graph = onnx.load(str(tmp_path / "student.onnx"))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    ops = {n.op_type for n in graph.graph.node}
    assert "LayerNormalization" in ops and {"MatMul", "Softmax"} <= ops
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}  # no custom ops, no plugins
    (inp,), (out,) = graph.graph.input, graph.graph.output
    assert inp.name == "image" and [d.dim_value for d in inp.type.tensor_type.shape.dim] == [1, 3, *SIZE]
    assert out.name == "logits" and [d.dim_value for d in out.type.tensor_type.shape.dim] == [1, 19, 16, 32]
    meta = artifacts.read_onnx({p.key: p.value for p in graph.metadata_props}, "student.onnx")
    assert meta.classes[0] == "road" and meta.normalization.mean[0] == pytest.approx(123.675)
    assert (meta.kind, meta.precision, meta.contract.input, meta.contract.output) == ("onnx", "fp32", "float", "logits")
    assert meta.contract.size == list(SIZE) and meta.contract.batch == 1 and not meta.contract.dynamic

    par = report["artifacts"]["fp32"]["parity"]
    assert par["frames"] == 4 and par["max_abs_logit_diff"] <= 1e-3 and par["argmax_agreement"] >= 0.999
    # the same frames, run here by hand
    rgb, _ = val.read(1)
    x = graph_input(rgb, student.meta.mean, student.meta.std)
    ours = ort_session(tmp_path / "student.onnx").run(None, {"image": x})[0]
    with torch.no_grad():
        ref = student(torch.from_numpy(x)).numpy()
    assert np.abs(ours - ref).max() <= 1e-3

    side = json.loads((tmp_path / "student.onnx.json").read_text())
    assert side["sha256"] == report["artifacts"]["fp32"]["sha256"] and side["precision"] == "fp32"
    assert side["contract"]["input"] == "float" and side["measured"]["parity"]["argmax_agreement"] >= 0.999
    # one record: the sidecar is the graph's own record plus the file's hash and the measurements
    record = artifacts.read_sidecar(tmp_path / "student.onnx", verify=True)
    assert {**record.to_dict(), "measured": {}, "file": "", "sha256": "", "bytes": 0} == meta.to_dict()
    assert shape(side) == shape(golden("onnx"))  # the schema tests/golden/onnx.json pins
    # scored like the PyTorch evaluator: the val images are already 64x128, so the numbers agree
    torch_miou = evaluate(student, torch.utils.data.DataLoader(build_dataset(
        "synthetic", val.root, "val", EvalTransform(size=SIZE))), num_classes=19, progress=False).miou
    assert report["pytorch"]["miou"] == pytest.approx(torch_miou, abs=1e-9)
    assert side["measured"]["miou"] == pytest.approx(torch_miou, abs=0.005)


def test_uint8_labels_graph_normalises_inside_and_returns_class_ids(tmp_path, data, student):
    train, val = data
    export_student(student, tmp_path, plain(input="uint8", output="labels"), val, train)
    graph = onnx.load(str(tmp_path / "student.onnx"))
    assert [o.name for o in graph.graph.output] == ["labels"]  # the parity output is gone
    # TensorRT restricts UINT8 tensors to I/O and casts: the input's only consumer is a Cast to float, and nothing
    # else reads a uint8 tensor (the BGR flip and the NHWC -> NCHW transpose come after the Cast)
    typed = onnx.shape_inference.infer_shapes(graph).graph
    uint8 = {v.name for v in [*typed.input, *typed.value_info, *typed.output]
             if v.type.tensor_type.elem_type == onnx.TensorProto.UINT8}
    assert uint8 == {"image"}
    (first,) = [n for n in graph.graph.node if "image" in n.input]
    assert first.op_type == "Cast" and onnx.helper.get_attribute_value(first.attribute[0]) == onnx.TensorProto.FLOAT
    assert [n.op_type for n in graph.graph.node if uint8 & set(n.input)] == ["Cast"]
    sess = ort_session(tmp_path / "student.onnx")
    assert sess.get_inputs()[0].type == "tensor(uint8)" and sess.get_inputs()[0].shape == [1, *SIZE, 3]
    rgb, _ = val.read(2)
    labels = sess.run(None, {"image": np.ascontiguousarray(rgb[None, :, :, ::-1])})[0]  # BGR, as OpenCV gives
    assert labels.dtype == np.int32 and labels.shape == (1, *SIZE)
    x = graph_input(rgb, student.meta.mean, student.meta.std)
    with torch.no_grad():
        expected = predict(student, torch.from_numpy(x), SIZE).numpy()
    assert (labels == expected).mean() >= 0.999
    assert len(np.unique(labels)) >= 3


def test_labels_at_the_camera_size_come_from_the_graph(tmp_path, data, student):
    """export.labels_size: the upsample and argmax to the camera's size run in the graph (on the GPU under TensorRT),
    and give the ids the host path computes from the logits graph at that size."""
    train, val = data
    camera = (96, 200)
    export_student(student, tmp_path / "labels", plain(input="uint8", output="labels", labels_size=camera), val, train)
    export_student(student, tmp_path / "logits", plain(input="uint8"), val, train)
    record = artifacts.read_sidecar(tmp_path / "labels" / "student.onnx", verify=True)
    assert record.contract.output_size == list(camera) and record.contract.size == list(SIZE)
    sess = ort_session(tmp_path / "labels" / "student.onnx")
    assert sess.get_outputs()[0].shape == [1, *camera]
    from pipeline.infer import Segmenter

    rgb, _ = val.read(1)
    frame = np.ascontiguousarray(cv2.resize(rgb, camera[::-1])[:, :, ::-1])
    in_graph = Segmenter.open(tmp_path / "labels" / "student.onnx").predict(frame)
    on_host = Segmenter.open(tmp_path / "logits" / "student.onnx").predict(frame)
    assert in_graph.shape == on_host.shape == camera
    assert (in_graph == on_host).mean() >= 0.999
    with pytest.raises(ConfigError, match="export.labels_size"):
        from pipeline.config import load

        load(None, ["export.labels_size=96x200"])  # a logits graph has no labels to size


def test_dynamic_graph_takes_other_batches_and_sizes(tmp_path, data, student):
    train, val = data
    export_student(student, tmp_path, plain(dynamic=True), val, train)
    sess = ort_session(tmp_path / "student.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3, 96, 160)).astype(np.float32)
    out = sess.run(None, {"image": x})[0]
    with torch.no_grad():
        ref = student(torch.from_numpy(x)).numpy()
    assert out.shape == (2, 19, 24, 40) and np.abs(out - ref).max() <= 1e-3


def test_failed_parity_leaves_no_artifact(tmp_path, data, student):
    train, val = data
    with pytest.raises(ExportError, match="disagrees with PyTorch") as err:
        export_student(student, tmp_path, plain(parity_max_diff=1e-12), val, train)
    assert "\n" not in str(err.value) and "student.onnx" in str(err.value)
    assert not list(tmp_path.glob("student*")) and not list(tmp_path.glob(".*"))


def test_the_next_export_cleans_what_a_killed_one_left_and_a_failed_one_keeps_the_last(tmp_path, data, student):
    """What a killed export left: its staging folder (its lock free now), an older version's work folder beside the
    INT8 graph, a sidecar whose publish a kill cut short (complete, under its staging name). The next export
    removes the first two, puts the sidecar in place and leaves a running export's folder alone; a re-export that
    fails its checks leaves the last export as it was (it used to delete the student.onnx it had overwritten)."""
    from pipeline.export import remove_stale

    train, val = data
    export_student(student, tmp_path, plain(), val, train)
    final, side = tmp_path / "student.onnx", artifacts.sidecar_path(tmp_path / "student.onnx")
    side.rename(tmp_path / ".student.onnx.json.tmp4242")  # killed between the artifact's rename and its sidecar's
    dead = tmp_path / ".staging" / "export-dead"
    (dead / "tmp").mkdir(parents=True)
    (dead / "lock").write_text("4242\n")
    (dead / "tmp" / "tmpq1w2e3.onnx").touch()
    (tmp_path / ".student.int8.onnx.k2j3l4").mkdir()
    live = tmp_path / ".staging" / "export-live"
    live.mkdir()
    with open(live / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running export holds it
        remove_stale(tmp_path)
    assert [p.name for p in tmp_path.glob(".*")] == [".staging"] and list(live.parent.iterdir()) == [live]
    assert artifacts.read_sidecar(final, verify=True).file == "student.onnx"
    before = {p.name: p.read_bytes() for p in tmp_path.glob("student*")}
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        export_student(student, tmp_path, plain(parity_max_diff=1e-12), val, train)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("student*")} == before
    assert not list(tmp_path.rglob(".*"))  # the live folder's lock was free by then: removed as stale


def test_unwritable_output_and_bad_spec_are_one_line_errors(tmp_path, data, student):
    train, val = data
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="not writable"):
        export_student(student, blocker / "out", plain(), val, train)
    # the values config.py refuses are refused the same way when the library is called directly
    with pytest.raises(ConfigError, match="export.input='rgb'"):
        export_student(student, tmp_path, plain(input="rgb"), val, train)
    with pytest.raises(ConfigError, match="opset"):
        export_student(student, tmp_path, plain(opset=13), val, train)
    with pytest.raises(ExportError, match="0x0"):
        export_student(student, tmp_path, plain(size=(0, 0)), val, train)
    assert not list(tmp_path.glob("student*"))


def test_export_stage_writes_every_onnx_artifact_and_its_report(tmp_path, data, student):
    pytest.importorskip("modelopt.onnx.quantization")
    from pipeline.models import save_model

    _, val = data
    ckpt = save_model(student, tmp_path / "mine.safetensors")
    run = tmp_path / "run"
    keys = [f"data.root={val.root}", "data.synthetic_train=6", "data.synthetic_val=4", "data.synthetic_size=64x128",
            "data.size=64x128", "export.calibration_frames=4", "export.parity_frames=2",
            "export.int8_min_agreement=0.9"]  # a random student: near-ties flip between the two runtimes
    code, out, err = run_cli("export", "--run-dir", str(run), "--checkpoint", str(ckpt), *keys, cwd=tmp_path)
    assert code == 0, err
    for name in ("student.onnx", "student.fp16.onnx", "student.int8.onnx"):
        assert (run / name).is_file() and artifacts.read_sidecar(run / name, verify=True).file == name
    assert not list(run.glob("*.plan"))  # no TensorRT here: said in one line, the ONNX files still written
    assert sum("no TensorRT engines" in line for line in err.splitlines()) == 1
    report = json.loads((run / "export.json").read_text())
    assert set(report["artifacts"]) == {"fp32", "fp16", "int8"}
    assert "student.int8.onnx" in (run / "export.md").read_text() and "student.int8.onnx" in out
    # asked for explicitly, engines are an error without TensorRT
    code, _, err = run_cli("trt-build", "--run-dir", str(run), *keys, cwd=tmp_path)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: trt-build:")


def test_int8_through_onnx_runtime_backend(tmp_path, data, student):
    """export.int8_backend=ort: no Model Optimizer involved, the Q/DQ graph checked and scored like the others."""
    train, val = data
    e = plain(int8=True, parity_frames=2, calibration_frames=4, int8_backend="ort", eval_frames=2)
    report = export_student(student, tmp_path, e, val, train)
    int8 = report["artifacts"]["int8"]
    assert int8["quantization"]["backend"] == "ort" and int8["quantization"]["method"] == "entropy"
    assert int8["quantization"]["frames"] == 4 and int8["quantization"]["quantized_nodes"] > 0
    assert int8["parity"]["argmax_agreement"] >= 0.9
    graph = onnx.load(str(tmp_path / "student.int8.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.graph.node}
    # the converted graph carries the derived record, which its sidecar repeats with the measurements
    meta = artifacts.read_onnx({p.key: p.value for p in graph.metadata_props}, "student.int8.onnx")
    side = artifacts.read_sidecar(tmp_path / "student.int8.onnx", verify=True)
    assert (meta.kind, meta.precision, side.kind) == ("onnx-int8", "int8", "onnx-int8")
    assert side.details["quantization"]["backend"] == "ort" and side.measured["miou"] == int8["miou"]


def test_export_of_a_checkpoint_that_does_not_load_is_one_line(tmp_path, data):
    _, val = data
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    code, _, err = run_cli("export", "--run-dir", str(tmp_path / "run"), "--checkpoint", str(bad),
                           f"data.root={val.root}", "data.synthetic_train=6", "data.synthetic_val=4",
                           "data.synthetic_size=64x128", cwd=tmp_path)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error:") and "broken.safetensors" in last and "Traceback" not in err
    assert not list((tmp_path / "run").glob("student*"))


def test_export_of_a_hugging_face_folder(tmp_path, data):
    """`export --checkpoint` takes what load_model takes: here a transformers save_pretrained folder."""
    pytest.importorskip("transformers")
    from tests.test_checkpoints import hf_model

    _, val = data
    hf = hf_model("mit_b0").eval()
    hf.save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    code, _, err = run_cli("export", "--run-dir", str(run), "--checkpoint", str(tmp_path / "hf"),
                           f"data.root={val.root}", "data.synthetic_train=6", "data.synthetic_val=4",
                           "data.synthetic_size=64x128", "data.size=64x128", "export.fp16=false",
                           "export.int8=false", "export.parity_frames=2", cwd=tmp_path)
    assert code == 0, err
    side = json.loads((run / "student.onnx.json").read_text())
    parity = side["measured"]["parity"]
    assert parity["max_abs_logit_diff"] <= 1e-3 and parity["argmax_agreement"] >= 0.999
    # the exported graph computes what transformers' own model computes
    x = graph_input(val.read(0)[0], side["normalization"]["mean"], side["normalization"]["std"])
    ours = ort_session(run / "student.onnx").run(None, {"image": x})[0]
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(x)).logits.numpy()
    assert ours.shape == ref.shape == (1, 19, 16, 32) and np.abs(ours - ref).max() <= 1e-3


@pytest.mark.parametrize("variant", ["pvt_v2_b0", "lvt"])
def test_every_family_exports_with_parity_dynamic_shapes_and_int8(tmp_path, data, variant):
    """The new students go through the same export as MiT: standard opset >= 17 graph, parity with PyTorch, a
    dynamic graph at another batch and a size that is not a multiple of 32, and an INT8 Q/DQ graph."""
    from tests.conftest import spread_student

    train, val = data
    model = spread_student(variant=variant)
    report = export_student(model, tmp_path / "static", plain(int8=True, parity_frames=2, calibration_frames=4,
                                                              int8_backend="ort", eval_frames=2), val, train)
    par = report["artifacts"]["fp32"]["parity"]
    assert par["max_abs_logit_diff"] <= 1e-3 and par["argmax_agreement"] >= 0.999
    graph = onnx.load(str(tmp_path / "static" / "student.onnx"))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}
    assert artifacts.read_sidecar(tmp_path / "static" / "student.onnx").variant == variant
    assert report["artifacts"]["int8"]["quantization"]["quantized_nodes"] > 0
    assert report["artifacts"]["int8"]["parity"]["argmax_agreement"] >= 0.8

    export_student(model, tmp_path / "dynamic", plain(dynamic=True, parity_frames=2), val, train)
    x = np.random.default_rng(0).standard_normal((2, 3, 70, 90)).astype(np.float32)
    out = ort_session(tmp_path / "dynamic" / "student.onnx").run(None, {"image": x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert out.shape == ref.shape == (2, 19, 18, 23) and np.abs(out - ref).max() <= 1e-3
