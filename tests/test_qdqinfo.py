"""The Q/DQ census (pipeline/qdqinfo.py) on hand-built graphs whose answer is known, on the traced INT8 student, and
its CLI (benchmarks/int8_placement.py)."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pipeline.errors import InputError
from pipeline.qdqinfo import census, table
from tests.conftest import run_cli, spread_student

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def qdq(src: str, name: str) -> list[onnx.NodeProto]:
    """QuantizeLinear -> DequantizeLinear of `src` (scale `s`, zero point `z`); the DQ is `name`, its output too."""
    return [helper.make_node("QuantizeLinear", [src, "s", "z"], [f"{name}_q"], name=f"{name}_Q"),
            helper.make_node("DequantizeLinear", [f"{name}_q", "s", "z"], [name], name=name)]


def graph(nodes, inits, outputs, x_shape=(1, 4, 8, 8), x_type=F32, out_type=F32) -> onnx.ModelProto:
    inits = [const("s", np.float32(0.1)), const("z", np.int8(0)), *inits]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", x_type, list(x_shape))],
                          [helper.make_tensor_value_info(o, out_type, None) for o in outputs], inits)
    # the checker wants the outputs' shapes: shape inference writes them, the checker then checks the whole graph
    model = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.checker.check_model(model, full_check=True)
    del model.graph.value_info[:]  # the census infers what it needs itself
    return model


def weight(name: str, shape) -> onnx.TensorProto:
    return const(name, np.random.default_rng(0).standard_normal(shape).astype(np.float32))


def test_a_pair_feeding_only_an_add_dangles_and_one_feeding_a_conv_does_not():
    nodes = [*qdq("X", "dx"), *qdq("W", "dw"), helper.make_node("Conv", ["dx", "dw"], ["C"], pads=[1] * 4),
             *qdq("X", "da"), helper.make_node("Add", ["da", "C"], ["Y"])]
    c = census(graph(nodes, [weight("W", (4, 4, 3, 3))], ["Y"]))
    assert (c["weight_pairs"], c["per_channel_weight_pairs"], c["activation_pairs"], c["other_dq"]) == (1, 0, 2, 0)
    assert c["dangling"] == [{"node": "da", "tensor": "X", "feeds": ["Add"]}]
    assert c["int8_mac_coverage"] == 1.0 and c["float_compute"] == []


def test_pairs_are_followed_through_data_movement_and_only_a_data_or_weight_input_counts():
    nodes = [*qdq("X", "dr"), helper.make_node("Reshape", ["dr", "shape"], ["R"]),
             # a folded weight: an INT8 initializer read by DequantizeLinear, no QuantizeLinear; per output channel
             helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["dw"], name="dw", axis=0),
             *qdq("X", "db"), helper.make_node("ReduceMean", ["db"], ["B"], axes=[0, 2, 3], keepdims=0),
             *qdq("B", "dbias"), helper.make_node("Conv", ["R", "dw", "dbias"], ["C"]),
             *qdq("X", "dc"), helper.make_node("Cast", ["dc"], ["dc16"], to=F16),
             helper.make_node("Cast", ["dc16"], ["dc32"], to=F32),
             helper.make_node("Resize", ["dc32", "", "scales"], ["U"], mode="nearest")]
    inits = [const("shape", np.array([1, 4, 8, 8], np.int64)), const("Wq", np.ones((4, 4, 1, 1), np.int8)),
             const("ws", np.full(4, 0.1, np.float32)), const("wz", np.zeros(4, np.int8)),
             const("scales", np.array([1, 1, 2, 2], np.float32))]
    c = census(graph(nodes, inits, ["C", "U"]))
    assert (c["weight_pairs"], c["per_channel_weight_pairs"], c["activation_pairs"]) == (1, 1, 4)
    dangling = {d["node"]: d["feeds"] for d in c["dangling"]}
    # the bias of a Conv is not an INT8 operand; the Cast round trip leads to a float Resize
    assert dangling == {"db": ["ReduceMean"], "dbias": ["Conv"], "dc": ["Resize"]}
    assert c["int8_mac_coverage"] == 1.0
    assert (c["casts"], c["cast_pairs"], c["cast_roundtrips"]) == (2, 1, 1)


def two_convs(x_shape=(1, 4, 8, 8)) -> onnx.ModelProto:
    """conv1 (3x3, both inputs quantized: 8*8*4 outputs x 4*3*3 = 9216 MACs) -> conv2 (1x1, float: 1024 MACs)."""
    nodes = [*qdq("X", "dx"), *qdq("W1", "dw1"), helper.make_node("Conv", ["dx", "dw1"], ["C1"], pads=[1] * 4,
                                                                  name="conv1"),
             helper.make_node("Conv", ["C1", "W2"], ["Y"], name="conv2")]
    return graph(nodes, [weight("W1", (4, 4, 3, 3)), weight("W2", (4, 4, 1, 1))], ["Y"], x_shape)


def test_int8_mac_coverage_counts_the_macs_of_convs_with_both_inputs_quantized():
    c = census(two_convs())
    assert (c["macs"], c["int8_macs"]) == (10240, 9216)
    assert c["int8_mac_coverage"] == pytest.approx(0.9)
    assert c["float_compute"] == [{"node": "conv2", "op": "Conv", "macs": 1024, "through_dq": [False, False]}]


def test_a_dynamic_input_is_counted_at_the_size_given():
    model = two_convs(("N", 4, "H", "W"))
    assert census(model, size=(16, 8))["macs"] == 2 * 10240
    with pytest.raises(InputError, match="dynamic dim 2: give --size"):
        census(model)


def test_casts_around_an_fp32_island():
    nodes = [helper.make_node("Cast", ["X"], ["h"], to=F16), helper.make_node("Cast", ["h"], ["f"], to=F32),
             helper.make_node("Softmax", ["f"], ["p"]), helper.make_node("Cast", ["p"], ["Y"], to=F16),
             helper.make_node("Cast", ["h"], ["h2"], to=F16)]  # a Cast after a Cast, not back to FP32
    c = census(graph(nodes, [], ["Y", "h2"], out_type=F16))
    assert (c["cast_pairs"], c["cast_roundtrips"]) == (2, 1)
    assert c["casts_around"] == {"Softmax": 2, "LayerNormalization": 0}
    assert (c["weight_pairs"], c["activation_pairs"], c["macs"], c["int8_mac_coverage"]) == (0, 0, 0, 0.0)


def test_table_puts_each_census_in_its_column():
    a, b = census(two_convs()), census(graph(qdq("X", "d"), [], ["d"]))
    lines = table(a, b, names=("two convs", "one pair")).splitlines()
    assert lines[0] == "| | two convs | one pair |"
    assert "| INT8 MAC coverage | 90.0 % | 0.0 % |" in lines
    assert "| dangling activation pairs (feed no INT8 op) | 0 | 1 |" in lines
    with pytest.raises(ValueError):
        table(a, b, names=("one",))


def test_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="no such ONNX file"):
        census(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(InputError, match="junk.onnx: not"):
        census(tmp_path / "junk.onnx")


def test_the_traced_int8_student_has_no_dangling_pair_and_most_macs_in_int8():
    from pipeline import quant
    from pipeline.config import ExportConfig
    from pipeline.export import DeployModel

    qm = quant.quantize(spread_student())
    deploy = DeployModel(qm, ExportConfig(size=(64, 128)), fold=False)
    quant.calibrate(deploy, [torch.randn(1, 3, 64, 128) for _ in range(2)])
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(deploy, (torch.zeros(1, 3, 64, 128),), buf, opset_version=17, dynamo=False,
                          input_names=["image"], output_names=["logits"])
    qm.eval()  # the exporter restores the wrapper's mode
    c = census(onnx.load_from_string(buf.getvalue()))
    assert c["dangling"] == []
    # MiT-B0: 8 blocks x (q, kv, proj, fc1, dwconv, fc2) + 6 reductions (stages 1-3) + 3 patch embeddings (not the
    # stem) + 4 head projections = 61 weights; 85 activation quantizers (quant.PLACEMENT), one Q/DQ pair each
    weights = [m for m in qm.modules() if isinstance(m, (quant.QuantConv2d, quant.QuantLinear))]
    assert c["weight_pairs"] == c["per_channel_weight_pairs"] == len(weights) == 61
    assert c["activation_pairs"] == len(quant.act_quantizers(qm)) == 85
    assert c["other_dq"] == 0
    # only the stem and the classifier stay float: 93.8 % of the MACs at 64x128 are INT8
    assert [f["node"] for f in c["float_compute"]] == ["/model/encoder/stages.0/embed/proj/Conv",
                                                       "/model/head/classifier/Conv"]
    assert c["int8_mac_coverage"] > 0.93


def test_cli_prints_graphs_side_by_side_and_writes_json(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(two_convs(), str(a))
    onnx.save(graph([*qdq("X", "da"), helper.make_node("Add", ["da", "X"], ["Y"])], [], ["Y"]), str(b))
    rc, out, err = run_cli("benchmarks/int8_placement.py", str(a), str(b), "--json", str(tmp_path / "c.json"),
                           module=None)
    assert rc == 0, err
    assert f"| | {a} | {b} |" in out and "dangling X -> Add" in out and "float Conv conv2" in out
    graphs = json.loads((tmp_path / "c.json").read_text())["graphs"]
    assert [(g["path"], g["dangling_pairs"]) for g in graphs] == [(str(a), 0), (str(b), 1)]
    rc, out, err = run_cli("benchmarks/int8_placement.py", str(a), str(tmp_path / "missing.onnx"), module=None)
    assert rc == 2 and err.strip() == f"error: {tmp_path / 'missing.onnx'}: no such ONNX file", err
