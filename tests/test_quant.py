"""INT8 fake quantization (pipeline/quant.py): the placement, calibration, its Q/DQ export against the fake-quantized
model in ONNX Runtime, the graph's census pinned, and the QAD state's round trip."""

import json
from dataclasses import replace

import onnx
import pytest
import torch

from pipeline import artifacts, quant
from pipeline.config import ExportConfig
from pipeline.errors import CheckpointError, ExportError
from pipeline.export import export_student, graph_inputs
from pipeline.infer import ort_session
from pipeline.models import build_model, load_model
from pipeline.qdqinfo import census
from tests.conftest import splits, spread_student

SIZE = (64, 128)


@pytest.fixture(scope="module")
def data(fitted_student):
    return splits(fitted_student[1])


@pytest.fixture(scope="module")
def calibrated(data, fitted_student):
    """A fitted student and its fake-quantized copy calibrated on the training frames (entropy)."""
    train, _ = data
    student = fitted_student[0]
    qmodel = quant.quantize(student)
    frames = graph_inputs(train, 0, ExportConfig(size=SIZE), student.meta)
    quant.calibrate(qmodel, [torch.from_numpy(x) for x in frames], "entropy")
    return student, qmodel.eval()


def test_placement_keeps_the_stem_and_classifier_float_and_quantizes_every_other_layer():
    model = quant.quantize(build_model("mit_b0"))
    names = [u.name for u in quant.units(model)]
    # B0: 8 attentions, 8 Mix-FFNs (fc1, dwconv, fc2), 3 patch embeddings after the stem, 4 head projections
    assert sum(isinstance(u.module, quant.QuantAttention) for u in quant.units(model)) == 8
    assert len(names) == 8 + 8 * 3 + 3 + 4
    assert isinstance(model.encoder.stages[0].embed.proj, torch.nn.Conv2d)  # the stem reads the image: float
    assert isinstance(model.head.classifier, torch.nn.Conv2d)  # the classifier writes the logits: float
    assert isinstance(model.encoder.stages[1].embed.proj, quant.QuantConv2d)
    assert len(quant.groups(model)) == 16 + 3 + 4
    stress = quant.quantize(build_model("mit_b0"), float_ends=False)
    assert isinstance(stress.encoder.stages[0].embed.proj, quant.QuantConv2d)


@pytest.mark.parametrize("variant", ["pvt_v2_b0", "lvt"])
def test_every_family_quantizes_and_runs(variant):
    model = build_model(variant).eval()
    qmodel = quant.quantize(model)
    x = torch.randn(1, 3, 64, 64)
    quant.calibrate(qmodel, [x], "max")
    with torch.no_grad():
        a, b = model(x), qmodel.eval()(x)
    assert a.shape == b.shape and quant.units(qmodel)
    assert 0 < (a - b).abs().max() < a.abs().max()  # quantized, and still the same network


def test_calibration_ranges_entropy_clips_max_does_not(calibrated, data):
    student, _ = calibrated
    train, _ = data
    frames = [torch.from_numpy(x) for x in graph_inputs(train, 0, ExportConfig(size=SIZE), student.meta)]
    by = {m: quant.calibrate(quant.quantize(student), frames, m) for m in ("max", "entropy")}
    assert by["max"].keys() == by["entropy"].keys()
    assert all(by["entropy"][k] <= by["max"][k] * (1 + 1e-6) for k in by["max"])
    assert any(by["entropy"][k] < 0.9 * by["max"][k] for k in by["max"])
    probabilities = [k for k in by["max"] if k.endswith("p_quant")]
    assert probabilities and all(by["entropy"][k] == by["max"][k] <= 1.0 for k in probabilities)
    with pytest.raises(ExportError, match="calibration method 'kl'"):
        quant.calibrate(quant.quantize(student), frames, "kl")


def test_set_float_switches_groups_and_refuses_unknown_ones(calibrated):
    _, qmodel = calibrated
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        all_int8 = qmodel(x)
        quant.set_float(qmodel, quant.groups(qmodel))
        all_float = qmodel(x)
        quant.set_float(qmodel, [])
    with torch.no_grad():
        reference = deploy_reference(calibrated[0])(x)
    assert torch.allclose(all_float, reference, atol=1e-4) and not torch.allclose(all_int8, reference, atol=1e-3)
    with pytest.raises(ExportError, match="encoder.stages.9"):
        quant.set_float(qmodel, ["encoder.stages.9.embed"])


def deploy_reference(student):
    from pipeline.models.segformer import deploy_copy

    return deploy_copy(student)


def test_learned_ranges_get_gradients_only_when_asked(calibrated):
    _, qmodel = calibrated
    q = qmodel.encoder.stages[1].blocks[0].attn.input_quant
    x = torch.randn(1, 3, *SIZE)
    for learn in (False, True):
        quant.learn_ranges(qmodel, learn)
        qmodel.zero_grad()
        qmodel(x).square().mean().backward()
        assert (q.amax.grad is not None and q.amax.grad.abs() > 0) == learn
    quant.learn_ranges(qmodel, False)


def test_qdq_export_agrees_with_the_fake_quantized_model_and_pins_the_placement(tmp_path, data, calibrated):
    """The acceptance check: the Q/DQ ONNX (FP16 elsewhere) and the fake-quantized PyTorch model agree on real
    frames (argmax >= 99.5 %), and the graph has the placement the docs tabulate."""
    student, _ = calibrated
    train, val = data
    e = ExportConfig(size=SIZE, fp16=False, parity_frames=6, calibration_frames=8, eval_frames=2)
    report = export_student(student, tmp_path, e, val, train)
    q = report["artifacts"]["int8"]["quantization"]
    assert q["backend"] == "torch" and q["frames"] == 8 and q["float_groups"] == []
    assert q["fake_quant_parity"]["argmax_agreement"] >= 0.995 and q["fake_quant_parity"]["frames"] == 6
    # the same check by hand on other frames: the fake-quantized model rebuilt from the sidecar's ranges
    qmodel = quant.quantize(student)
    qmodel.load_state_dict({k: torch.tensor(v) for k, v in q["ranges"].items()}, strict=False)
    sess = ort_session(tmp_path / "student.int8.onnx")
    same = total = 0
    for x in graph_inputs(train, 0, e, student.meta):
        with torch.no_grad():
            ref = qmodel.eval()(torch.from_numpy(x)).numpy()
        out = sess.run(None, {"image": x})[0]
        same, total = same + int((out.argmax(1) == ref.argmax(1)).sum()), total + ref[:, 0].size
    assert same / total >= 0.995
    c = census(tmp_path / "student.int8.onnx")
    # B0: 61 quantized weights (per channel), 85 quantized activations, none of them rounding a tensor that only
    # float layers read; everything not INT8 in FP16 (Casts only at the graph's float32 input and output)
    assert (c["weight_pairs"], c["per_channel_weight_pairs"], c["activation_pairs"]) == (61, 61, 85)
    assert c["dangling_pairs"] == 0 and c["casts"] == 2 and c["cast_roundtrips"] == 0
    assert c["int8_mac_coverage"] > 0.93 and len(c["float_compute"]) == 2
    graph = onnx.load(str(tmp_path / "student.int8.onnx"))
    fp16 = {i.name for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert any(n.op_type == "DequantizeLinear" and n.input[1] in fp16 for n in graph.graph.node)
    side = artifacts.read_sidecar(tmp_path / "student.int8.onnx", verify=True)
    assert side.kind == "onnx-int8" and side.details["quantization"]["placement"][0][0].startswith("Conv")


def test_qad_state_round_trips_through_load_model(tmp_path, calibrated):
    _, qmodel = calibrated
    quant.set_float(qmodel, ["head.proj.0"])
    path = tmp_path / "student.qad.safetensors"
    quant.save_qad(qmodel, path, source="test", training={"step": 3})
    quant.set_float(qmodel, [])
    loaded = load_model(path)
    assert quant.is_quantized(loaded) and quant.float_groups(loaded) == ["head.proj.0"]
    x = torch.randn(1, 3, *SIZE)
    quant.set_float(qmodel, ["head.proj.0"])
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    quant.set_float(qmodel, [])
    side = json.loads(artifacts.sidecar_path(path).read_text())
    assert side["kind"] == "checkpoint-qad" and side["precision"] == "int8"
    assert side["details"]["quantization"]["ranges"] and side["details"]["training"]["step"] == 3
    path.write_bytes(path.read_bytes()[:-8] + b"\x00" * 8)  # the file changed after its record
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(path)


def test_a_dropped_agreement_fails_the_export_and_leaves_no_file(tmp_path, data):
    """Where the Q/DQ graph and the fake-quantized model part, nothing is published: a random student, whose
    near-ties flip with the rounding differences of two runtimes, held to full agreement."""
    train, val = data
    with pytest.raises(ExportError, match=r"disagrees with the fake-quantized PyTorch model .*export\.int8_min_agr"):
        export_student(spread_student(), tmp_path, ExportConfig(size=SIZE, fp16=False, parity_frames=2,
                                                                calibration_frames=2, eval_frames=2,
                                                                int8_min_agreement=1.0), val, train)
    assert not list(tmp_path.glob("student*"))


def test_a_qad_state_exports_as_its_own_artifact_and_mixed_precision_is_recorded(tmp_path, data, calibrated):
    """student.int8-qad.onnx from a QAD state (here the calibrated state itself), checked against it; with
    export.int8_max_drop the chooser's record goes into student.int8.onnx's sidecar."""
    student, qmodel = calibrated
    train, val = data
    state = tmp_path / "student.qad.safetensors"
    quant.save_qad(qmodel, state, source="test")
    e = ExportConfig(size=SIZE, fp16=False, parity_frames=4, calibration_frames=8, eval_frames=2, int8_max_drop=100.0)
    report = export_student(student, tmp_path, e, val, train, qad=state)
    qad = report["artifacts"]["int8-qad"]
    assert qad["file"] == "student.int8-qad.onnx" and qad["quantization"]["qad"] == str(state)
    assert qad["quantization"]["fake_quant_parity"]["argmax_agreement"] >= 0.995
    side = artifacts.read_sidecar(tmp_path / "student.int8-qad.onnx", verify=True)
    assert side.kind == "onnx-int8-qad" and side.precision == "int8" and side.measured["miou"] == qad["miou"]
    mixed = artifacts.read_sidecar(tmp_path / "student.int8.onnx").details["quantization"]["mixed_precision"]
    assert mixed["max_drop"] == 100.0 and mixed["float_groups"] == [] and mixed["trajectory"][0]["float"] == 0
    onnx_drop = report["artifacts"]["int8"]["quantization"]["mixed_precision"]["onnx_drop"]
    assert onnx_drop == pytest.approx(100 * (report["artifacts"]["fp32"]["miou"] - report["artifacts"]["int8"]["miou"]))
    # a stress state of fewer bits runs in PyTorch only: refused in one line, nothing published
    stress = quant.quantize(student, bits=5)
    quant.calibrate(stress, [torch.randn(1, 3, *SIZE)], "max")
    quant.save_qad(stress, state, source="test")
    out = tmp_path / "stress"
    with pytest.raises(ExportError, match="5-bit fake-quantized model: only 8 bits export"):
        export_student(student, out, replace(e, int8=False), val, train, qad=state)
    assert not list(out.glob("student*"))


def test_a_uint8_labels_graph_quantizes_with_its_final_upsample_and_argmax_in_fp32(tmp_path, data, calibrated):
    """The camera contract (uint8 BGR in, class ids out) through the same placement: calibrated through the graph's
    own preprocessing, the upsample and argmax that decide the labels kept FP32."""
    student, _ = calibrated
    train, val = data
    e = ExportConfig(size=SIZE, input="uint8", output="labels", fp16=False, parity_frames=4, calibration_frames=8,
                     eval_frames=2)
    report = export_student(student, tmp_path, e, val, train)
    assert report["artifacts"]["int8"]["quantization"]["fake_quant_parity"]["argmax_agreement"] >= 0.995
    graph = onnx.load(str(tmp_path / "student.int8.onnx"))
    assert [o.name for o in graph.graph.output] == ["labels"]
    typed = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(graph).graph.value_info}
    (argmax,) = [n for n in graph.graph.node if n.op_type == "ArgMax"]
    assert typed[argmax.input[0]] == onnx.TensorProto.FLOAT
    assert census(graph)["dangling_pairs"] == 0
