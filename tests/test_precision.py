"""FP16 and INT8 Q/DQ variants of a real B0 export, calibrated and checked on synthetic frames in ONNX Runtime CPU."""

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from pipeline import artifacts, precision
from pipeline.config import ExportConfig
from pipeline.data import EvalTransform, build_dataset
from pipeline.errors import ConfigError, ExportError
from pipeline.export import onnx_metadata
from pipeline.infer import ort_session
from pipeline.models import build_model

SIZE = (64, 128)
needs_modelopt = pytest.mark.skipif(importlib.util.find_spec("modelopt") is None,
                                    reason="nvidia-modelopt not installed (pip install -r requirements-quant.txt)")


class LabelsGraph(torch.nn.Module):
    """The exporter's uint8-in / labels-out contract: BGR NHWC uint8 -> normalise -> model -> upsample -> argmax."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        x = (x.flip(-1).permute(0, 3, 1, 2).float() - 120.0) / 58.0
        logits = F.interpolate(self.model(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(1).to(torch.int32)


def record(path) -> artifacts.Metadata:
    return artifacts.read_onnx({p.key: p.value for p in onnx.load(str(path)).metadata_props}, str(path))


@pytest.fixture(scope="module")
def art(tmp_path_factory, synthetic):
    """Two FP32 exports of one random-init B0 (float->logits with the export's record, uint8->labels with none) and
    real synthetic frames for each."""
    tmp = tmp_path_factory.mktemp("precision")
    torch.manual_seed(0)
    model = build_model("mit_b0", num_classes=19).eval()
    fp32, labels = tmp / "student.onnx", tmp / "labels.onnx"
    with torch.no_grad():
        torch.onnx.export(model, torch.randn(1, 3, *SIZE), str(fp32), opset_version=17, dynamo=False,
                          input_names=["image"], output_names=["logits"])
        torch.onnx.export(LabelsGraph(model), torch.zeros(1, *SIZE, 3, dtype=torch.uint8), str(labels),
                          opset_version=17, dynamo=False, input_names=["image"], output_names=["labels"])
    graph = onnx.load(str(fp32))
    for k, v in onnx_metadata(model, ExportConfig(size=SIZE)).onnx_props().items():
        graph.metadata_props.add(key=k, value=v)
    onnx.save(graph, str(fp32))
    root = synthetic(8, 8, SIZE)
    sets = {s: build_dataset("synthetic", root, s, EvalTransform(size=SIZE)) for s in ("train", "val")}
    floats = {s: np.stack([d[i]["image"].numpy() for i in range(len(d))]) for s, d in sets.items()}
    bgr = {s: np.stack([d.read(i)[0][:, :, ::-1] for i in range(len(d))]) for s, d in sets.items()}
    return {"dir": tmp, "fp32": fp32, "labels": labels, "float": floats, "uint8": bgr}


def run(path, frames) -> np.ndarray:
    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: frames[i:i + 1]})[0] for i in range(len(frames))])


def agreement(path, ref_path, frames) -> tuple[float, float]:
    """(argmax / label agreement, max |logit diff|) of `path` against `ref_path` on `frames`."""
    out, ref = run(path, frames), run(ref_path, frames)
    if out.dtype == np.int32:
        return float((out == ref).mean()), 0.0
    return float((out.argmax(1) == ref.argmax(1)).mean()), float(np.abs(out.astype(np.float32) - ref).max())


def types(model) -> dict[str, int]:
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    found = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    return found | {i.name: i.data_type for i in g.initializer}


def qdq_fed(model) -> set[str]:
    """Names of nodes that read a DequantizeLinear output, directly or through Casts."""
    producer = {o: n for n in model.graph.node for o in n.output}
    fed = set()
    for node in model.graph.node:
        for name in node.input:
            src = producer.get(name)
            while src is not None and src.op_type == "Cast":
                src = producer.get(src.input[0])
            if src is not None and src.op_type == "DequantizeLinear":
                fed.add(node.name)
    return fed


def check_int8(model, source, info) -> None:
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    tail = precision.output_tail(source)
    assert tail and tail[-1] in info["excluded_nodes"]
    kept = {n.name for n in model.graph.node if n.op_type in ("Softmax", "LayerNormalization")} | set(tail)
    assert not kept & qdq_fed(model)
    assert info["quantized_nodes"] > 0 and info["frames"] == 8


@needs_modelopt
def test_fp16_keeps_sensitive_ops_and_io_in_fp32(art):
    dst = art["dir"] / "student.fp16.onnx"
    info = precision.to_fp16(art["fp32"], dst)
    model = onnx.load(str(dst))
    t = types(model)
    assert info["tool"].startswith("nvidia-modelopt") and info["fp16_initializers"] > 0
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    kept = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert kept and all(t[n.input[0]] == onnx.TensorProto.FLOAT for n in kept)
    assert all(t[n.input[0]] == onnx.TensorProto.FLOAT16 for n in model.graph.node if n.op_type == "MatMul")
    assert [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]] == [1, 1]
    meta = record(dst)  # the source's record, as the derived kind's
    assert (meta.variant, meta.kind, meta.precision) == ("mit_b0", "onnx-fp16", "fp16")
    assert meta.details["conversion"] == info and meta.details["source_file"] == "student.onnx"
    assert meta.contract == record(art["fp32"]).contract
    agree, diff = agreement(dst, art["fp32"], art["float"]["val"])
    assert agree >= 0.99 and diff < 5e-3, (agree, diff)


@needs_modelopt
def test_int8_modelopt_float_logits(art):
    dst = art["dir"] / "student.int8.onnx"
    info = precision.to_int8(art["fp32"], dst, art["float"]["train"], method="entropy")
    model = onnx.load(str(dst))
    assert info["backend"] == "modelopt" and info["method"] == "entropy" and info["high_precision"] == "fp16"
    check_int8(model, onnx.load(str(art["fp32"])), info)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    meta = record(dst)
    assert (meta.variant, meta.kind, meta.precision) == ("mit_b0", "onnx-int8", "int8")
    assert meta.details["quantization"] == info and "nvidia-modelopt" in meta.versions
    agree, diff = agreement(dst, art["fp32"], art["float"]["val"])
    assert agree >= 0.9, (agree, diff)


@needs_modelopt
def test_int8_modelopt_uint8_labels(art):
    dst = art["dir"] / "labels.int8.onnx"
    info = precision.to_int8(art["labels"], dst, art["uint8"]["train"], method="max")
    model = onnx.load(str(dst))
    check_int8(model, onnx.load(str(art["labels"])), info)
    assert {"ArgMax", "Resize", "Conv"} <= {n.op_type for n in onnx.load(str(art["labels"])).graph.node
                                            if n.name in info["excluded_nodes"]}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    agree, _ = agreement(dst, art["labels"], art["uint8"]["val"])
    assert agree >= 0.9, agree


def sqnr_db(path, ref_path, frames) -> float:
    """Signal-to-quantization-noise ratio of `path`'s logits against `ref_path`'s, in dB."""
    out, ref = run(path, frames).astype(np.float64), run(ref_path, frames).astype(np.float64)
    return float(10 * np.log10(np.mean(ref ** 2) / np.mean((out - ref) ** 2)))


def activation_scales(model) -> dict[str, float]:
    """Scale of each activation's QuantizeLinear, by the tensor it quantizes."""
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    consts |= {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
               if n.op_type == "Constant"}
    return {n.input[0]: float(consts[n.input[1]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in consts}


@pytest.fixture(scope="module")
def ort_int8(art):
    """The ORT backend's INT8 graphs of the float export, one per calibration method."""
    per_frame = list(art["float"]["train"][:, None])  # N arrays of 1 x 3 x H x W, as the exporter makes them
    out = {}
    for method in ("max", "entropy"):
        dst = art["dir"] / f"student.ort-{method}.int8.onnx"
        out[method] = (dst, precision.to_int8(art["fp32"], dst, per_frame, method=method, backend="ort"))
    return out


@pytest.mark.parametrize("method", ["max", "entropy"])
def test_int8_ort_backend(art, ort_int8, method):
    dst, info = ort_int8[method]
    assert info["backend"] == "ort" and info["high_precision"] == "fp32" and info["version"] == ort.__version__
    assert info["method"] == method
    assert record(dst).details["quantization"]["method"] == method and record(dst).kind == "onnx-int8"
    model = onnx.load(str(dst))
    check_int8(model, onnx.load(str(art["fp32"])), info)
    # Q/DQ on the inputs of Conv/MatMul/Gemm only (a DQ they share with a data-movement op included): nothing
    # quantizes what they produce, no other computing op reads a DQ
    producer = {o: n for n in model.graph.node for o in n.output}
    assert not any(getattr(producer.get(n.input[0]), "op_type", "") in ("Conv", "MatMul", "Gemm")
                   for n in model.graph.node if n.op_type == "QuantizeLinear")
    fed = {n.op_type for n in model.graph.node if n.name in qdq_fed(model)}
    assert {"Conv", "MatMul"} <= fed <= {"Conv", "MatMul", "Gemm", "Identity", "Reshape", "Transpose"}, fed
    agree, _ = agreement(dst, art["fp32"], art["float"]["val"])
    assert agree >= 0.95 and sqnr_db(dst, art["fp32"], art["float"]["val"]) >= 25.0, agree


def test_ort_entropy_clips_where_max_does_not(ort_int8):
    """Entropy thresholds never exceed the calibrated maximum and cut the long tails of some activations."""
    by_max = activation_scales(onnx.load(str(ort_int8["max"][0])))
    by_entropy = activation_scales(onnx.load(str(ort_int8["entropy"][0])))
    assert by_max.keys() == by_entropy.keys() and len(by_max) > 20
    ratio = np.array([by_entropy[t] / by_max[t] for t in by_max])
    assert (ratio <= 1 + 1e-4).all() and (ratio < 0.9).any(), ratio.round(3)


def test_entropy_threshold_keeps_what_carries_information():
    rng = np.random.default_rng(0)

    def kept(x: np.ndarray) -> float:
        x = np.abs(x)
        hist = np.histogram(x, bins=2048, range=(0.0, x.max()))[0]
        return precision.entropy_threshold(hist) / 2048 * x.max()

    assert kept(rng.uniform(-1, 1, 100_000)) == pytest.approx(1.0, abs=2e-3)  # nothing to cut: the whole range
    outlier = kept(np.append(rng.normal(0, 1, 100_000), 40.0))  # one far outlier: cut, the bulk kept
    assert 3.0 < outlier < 6.0
    tailed = rng.laplace(0, 1, 100_000)  # a long tail: cut
    assert kept(tailed) < 0.95 * np.abs(tailed).max()
    assert precision.entropy_threshold(np.zeros(2048)) == 2048


def test_static_batch_calibrates_whole_batches(art, tmp_path):
    src, dst = tmp_path / "b2.onnx", tmp_path / "b2.int8.onnx"
    torch.manual_seed(0)
    with torch.no_grad():
        torch.onnx.export(build_model("mit_b0", num_classes=19).eval(), torch.randn(2, 3, *SIZE), str(src),
                          opset_version=17, dynamo=False, input_names=["image"], output_names=["logits"])
    info = precision.to_int8(src, dst, art["float"]["train"][:5], backend="ort")
    assert info["frames"] == 4 and info["calibration_batch"] == 2
    with pytest.raises(ExportError, match="static batch 2"):
        precision.to_int8(src, dst, art["float"]["train"][:1], backend="ort")


@pytest.mark.parametrize("bad, found", [
    (lambda x: x[:, :, :32, :64], "8 x 3 x 32 x 64 float32"),
    (lambda x: x.astype(np.float64), "8 x 3 x 64 x 128 float64"),
    (lambda x: np.zeros((8, *SIZE, 3), np.uint8), "8 x 64 x 128 x 3 uint8"),
    (lambda x: x[:0], "0 x 3 x 64 x 128 float32"),
])
@pytest.mark.parametrize("backend", ["modelopt", "ort"])
def test_wrong_calibration_is_refused(art, bad, found, backend):
    dst = art["dir"] / "bad.int8.onnx"
    with pytest.raises(ExportError, match="calibration data") as e:
        precision.to_int8(art["fp32"], dst, bad(art["float"]["train"]), backend=backend)
    assert "expected N x 3 x 64 x 128 float32" in str(e.value) and found in str(e.value)
    assert not dst.exists()


def test_missing_source_and_bad_options(art, tmp_path):
    with pytest.raises(ExportError, match="not found"):
        precision.to_fp16(tmp_path / "nope.onnx", tmp_path / "out.onnx")
    with pytest.raises(ExportError, match="not found"):
        precision.to_int8(tmp_path / "nope.onnx", tmp_path / "out.onnx", art["float"]["train"])
    with pytest.raises(ExportError, match="output directory not found"):
        precision.to_int8(art["fp32"], tmp_path / "no" / "out.onnx", art["float"]["train"], backend="ort")
    # the names config.py checks are refused by its checker when the library is called directly
    with pytest.raises(ConfigError, match="export.calibration_method='percentile'"):
        precision.to_int8(art["fp32"], tmp_path / "out.onnx", art["float"]["train"], method="percentile")
    with pytest.raises(ConfigError, match="export.int8_backend='tensorrt'"):
        precision.to_int8(art["fp32"], tmp_path / "out.onnx", art["float"]["train"], backend="tensorrt")
    assert list(tmp_path.iterdir()) == []


def test_missing_modelopt_names_the_install(art, tmp_path, monkeypatch):
    monkeypatch.setattr(precision.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ExportError, match="requirements-quant.txt"):
        precision.to_fp16(art["fp32"], tmp_path / "out.onnx")
    with pytest.raises(ExportError, match="requirements-quant.txt"):
        precision.to_int8(art["fp32"], tmp_path / "out.onnx", art["float"]["train"])
    assert list(tmp_path.iterdir()) == []


def test_failure_leaves_nothing_behind(art, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise ExportError("injected")

    dst = tmp_path / "student.int8.onnx"
    monkeypatch.setattr(precision, "_bypass_qdq", broken)
    with pytest.raises(ExportError, match="injected"):
        precision.to_int8(art["fp32"], dst, art["float"]["train"], backend="ort")
    assert list(tmp_path.iterdir()) == []
