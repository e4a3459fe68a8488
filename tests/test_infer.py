"""Segmenter: every backend available here (PyTorch CPU, ONNX Runtime CPU) on real exported graphs, one contract."""

import json
from dataclasses import replace

import cv2
import numpy as np
import onnx
import pytest
import torch

from pipeline import artifacts
from pipeline.config import ExportConfig
from pipeline.data import EvalTransform, build_dataset, network_input
from pipeline.errors import InputError
from pipeline.evaluate import evaluate, score
from pipeline.export import export_student
from pipeline.infer import OrtBackend, Segmenter, TorchBackend
from pipeline.models import save_model
from tests.conftest import splits, spread_student

SIZE = (64, 128)


@pytest.fixture(scope="module")
def art(tmp_path_factory, synthetic):
    """A tiny student, its checkpoint, and three exported graphs: float/logits static, uint8/labels static at
    batch 2, float/logits dynamic."""
    train, val = splits(synthetic(4, 6, (96, 192)))
    model = spread_student()
    out = {"val": val, "model": model}
    d = tmp_path_factory.mktemp("artifacts")
    out["ckpt"] = save_model(model, d / "student.safetensors")
    for name, graph in {"float": {}, "uint8": {"input": "uint8", "output": "labels", "batch": 2},
                        "dynamic": {"dynamic": True}}.items():
        sub = d / name
        sub.mkdir()
        e = ExportConfig(size=SIZE, fp16=False, int8=False, parity_frames=2, eval_frames=2, **graph)
        export_student(model, sub, e, val, train)
        out[name] = sub / "student.onnx"
    return out


def bgr_frames(val, n):
    return [np.ascontiguousarray(val.read(i)[0][:, :, ::-1]) for i in range(n)]


def test_torch_segmenter_scores_what_the_evaluator_scores(art):
    seg = Segmenter.open(art["ckpt"], size=SIZE)
    assert seg.describe()["backend"] == "torch" and seg.classes[0] == "road"
    ours = score(seg, art["val"], progress=False).miou
    loader = torch.utils.data.DataLoader(build_dataset("synthetic", art["val"].root, "val", EvalTransform(size=SIZE)))
    ref = evaluate(art["model"], loader, num_classes=19, progress=False).miou
    assert ours == pytest.approx(ref, abs=2e-3)
    ids = seg.predict(bgr_frames(art["val"], 1)[0])
    assert ids.shape == (96, 192) and ids.dtype == np.uint8 and len(np.unique(ids)) > 1  # at the frame's size
    # the reparameterised copy the export traces predicts the same classes
    deployed = Segmenter.open(art["ckpt"], size=SIZE, deploy=True).predict(bgr_frames(art["val"], 1)[0])
    assert (deployed == ids).mean() >= 0.999


@pytest.mark.parametrize("kind", ["float", "uint8", "dynamic"])
def test_onnx_segmenters_agree_with_pytorch(art, kind):
    frames = bgr_frames(art["val"], 3)
    if kind == "uint8":  # a labels graph upsamples to the network size; its labels are resized from there
        frames = [cv2.resize(f, SIZE[::-1], interpolation=cv2.INTER_LINEAR) for f in frames]
    ref = Segmenter.open(art["ckpt"], size=SIZE).predict(frames)
    seg = Segmenter.open(art[kind], provider="cpu", size=SIZE if kind == "dynamic" else None)
    c = seg.contract
    assert (c.input, c.output) == {"float": ("float", "logits"), "uint8": ("uint8", "labels"),
                                   "dynamic": ("float", "logits")}[kind]
    assert c.batch == {"float": 1, "uint8": 2, "dynamic": None}[kind]
    ids = seg.predict(frames)  # 3 frames: the batch-2 graph runs a full batch and a padded one
    assert ids.shape == (3, *frames[0].shape[:2])
    assert (ids == ref).mean() >= 0.999
    one_by_one = np.stack([seg.predict(f) for f in frames])
    assert np.array_equal(one_by_one, ids)


def test_dynamic_graph_runs_at_the_frame_size_without_a_size(art):
    seg = Segmenter.open(art["dynamic"], provider="cpu")
    assert seg.size is None
    frame = bgr_frames(art["val"], 1)[0]
    (x,) = seg.preprocess([frame])
    assert x.shape == (1, 3, 96, 192)
    ref = Segmenter.open(art["ckpt"]).predict(frame)  # PyTorch at the frame's own size too
    assert (seg.predict(frame) == ref).mean() >= 0.999


def test_input_buffers_are_allocated_once_and_outputs_follow_the_input(art):
    seg = Segmenter.open(art["float"], provider="cpu")
    a, b = bgr_frames(art["val"], 2)
    first = seg.preprocess([a])[0]
    assert seg.preprocess([b])[0] is first  # the same buffer, refilled
    ia, ib = seg.predict(a), seg.predict(b)
    assert not np.array_equal(ia, ib)
    assert np.array_equal(seg.predict(a), ia)
    # one preprocessing (data.transforms.network_input): the float graph sees the numbers the export's parity check
    # saw and training evaluation feeds the model, to the bit
    rgb = np.ascontiguousarray(a[:, :, ::-1])
    norm = seg.meta.normalization
    ref = network_input(rgb, SIZE, norm.mean, norm.std)[None]
    assert np.array_equal(seg.preprocess([a])[0], ref)
    evaluated = EvalTransform(size=SIZE, mean=norm.mean, std=norm.std)(rgb, np.zeros(rgb.shape[:2], np.uint8))[0]
    assert np.array_equal(evaluated.numpy()[None], ref)


def test_colorize_uses_the_palette_and_blends(art):
    seg = Segmenter.open(art["float"], provider="cpu")
    ids = np.array([[0, 1], [2, 0]], np.uint8)
    rgb = seg.colorize(ids)
    assert rgb.shape == (2, 2, 3) and tuple(rgb[0, 1]) == tuple(seg.meta.palette[1])
    image = np.zeros((2, 2, 3), np.uint8)
    half = seg.colorize(ids, image, alpha=0.5)
    assert abs(int(half[0, 1, 0]) - seg.meta.palette[1][0] // 2) <= 1
    with pytest.raises(InputError, match="differ in size"):
        seg.colorize(ids, np.zeros((3, 3, 3), np.uint8))


def test_bad_input_is_one_line(art, tmp_path):
    with pytest.raises(InputError, match="no such artifact"):
        Segmenter.open(tmp_path / "missing.onnx")
    seg = Segmenter.open(art["float"], provider="cpu")
    for bad, what in [(np.zeros((10, 10), np.uint8), "uint8 (10, 10)"), (np.zeros((8, 8, 3), np.float32), "float32"),
                      ([], "no frames")]:
        with pytest.raises(InputError, match=r"expected H x W x 3 uint8|no frames") as e:
            seg.predict(bad)
        assert what in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="fixed at 64x128"):
        Segmenter.open(art["float"], size=(128, 256))
    with pytest.raises(InputError, match="offers only"):
        Segmenter.open(art["float"], provider="tensorrt")
    # an ONNX file that was not exported by this pipeline: no contract in its metadata
    plain = onnx.load(str(art["float"]))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "foreign.onnx"))
    with pytest.raises(InputError, match="not a graph exported by this pipeline"):
        Segmenter.open(tmp_path / "foreign.onnx")
    # a record that does not describe the graph it sits in
    meta = artifacts.read_onnx({p.key: p.value for p in onnx.load(str(art["float"])).metadata_props}, "student.onnx")
    for k, v in replace(meta, contract=replace(meta.contract, size=[32, 64])).onnx_props().items():
        plain.metadata_props.add(key=k, value=v)
    onnx.save(plain, str(tmp_path / "edited.onnx"))
    with pytest.raises(InputError, match="1x3x64x128 but its record says 1x3x32x64"):
        Segmenter.open(tmp_path / "edited.onnx")
    side = json.loads((art["float"].parent / "student.onnx.json").read_text())
    assert side["contract"]["size"] == list(SIZE)


def test_backends_run_the_primary_output_and_infer_every_output(art):
    """The one runner interface: `run` the deployed output, `infer` every output by name; a static batch-2 graph
    takes a single frame (repeated to the batch, the first result kept)."""
    frame = bgr_frames(art["val"], 1)[0]
    seg = Segmenter.open(art["uint8"], provider="cpu")
    batch = seg.preprocess([frame])[0]  # 2 x 64 x 128 x 3, the second slot padded
    ort = OrtBackend(art["uint8"], "cpu")
    one = ort.infer(batch[:1])
    assert list(one) == ["labels"] and one["labels"].shape == (1, *SIZE)
    assert np.array_equal(one["labels"], ort.run(batch)[:1])
    torch_seg = Segmenter.open(art["ckpt"], size=SIZE)
    x = torch_seg.preprocess([frame])[0]
    assert isinstance(torch_seg.backend, TorchBackend)
    out = torch_seg.backend.infer(x)
    assert list(out) == ["logits"] and np.array_equal(out["logits"], torch_seg.backend.run(x).numpy())
