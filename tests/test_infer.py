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
from pipeline.infer import OrtBackend, Segmenter, TorchBackend, ort_session, provider_options, session_provider
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


def test_the_provider_reported_is_the_one_the_session_got(art):
    """ONNX Runtime here has only its CPU provider: asking for CUDA is refused in one line naming asked and got, and
    with fallback allowed it runs and says cpu; auto never refuses."""
    with pytest.raises(InputError) as e:
        Segmenter.open(art["float"], provider="cuda")
    msg = str(e.value)
    assert "provider cuda asked, cpu got" in msg and "--allow-fallback" in msg and "\n" not in msg
    seg = Segmenter.open(art["float"], provider="cuda", allow_fallback=True)
    d = seg.describe()
    assert (d["provider"], d["provider_asked"], d["device"]) == ("cpu", "cuda", "cpu")
    assert seg.predict(bgr_frames(art["val"], 1)[0]).shape == (96, 192)
    auto = OrtBackend(art["float"], "auto")
    assert auto.provider == session_provider(auto.session) == "cpu" and auto.asked == "auto"
    assert "provider_asked" not in Segmenter.open(art["float"], provider="cpu").describe()
    with pytest.raises(InputError, match="provider 'rocm': expected auto, cpu, cuda, tensorrt"):
        ort_session(art["float"], "rocm")


def test_provider_options_follow_onnx_runtime_docs(art, tmp_path):
    """The options builder is a pure function: TensorRT with both caches, the precision's flags and, for a dynamic
    graph, one explicit profile at the shapes it will run (trtexec syntax); CUDA on the asked GPU."""
    from pipeline.onnxinfo import inspect_onnx

    inputs = [(t.name, t.shape) for t in inspect_onnx(art["dynamic"]).inputs]
    assert inputs == [("image", ("batch", 3, "height", "width"))]
    (trt, trt_opts), (cuda, cuda_opts), (cpu, cpu_opts) = provider_options(
        ["tensorrt", "cuda", "cpu"], device_id=1, precision="fp16", inputs=inputs,
        shapes={"image": (2, 3, 512, 1024)}, cache_dir=tmp_path / "trt_cache")
    assert (trt, cuda, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert trt_opts == {"device_id": 1, "trt_fp16_enable": True, "trt_int8_enable": False,
                        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path / "trt_cache"),
                        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(tmp_path / "trt_cache"),
                        "trt_profile_min_shapes": "image:2x3x512x1024", "trt_profile_opt_shapes": "image:2x3x512x1024",
                        "trt_profile_max_shapes": "image:2x3x512x1024"}
    assert cuda_opts == {"device_id": 1} and cpu_opts == {}
    # INT8 (Q/DQ) allows FP16 too; a static graph, or a dynamic input with no shape given, gets no explicit profile
    (_, int8), = provider_options(["tensorrt"], precision="int8", inputs=[("image", (1, 3, 64, 128))],
                                  shapes={"image": (1, 3, 64, 128)})
    assert int8 == {"device_id": 0, "trt_fp16_enable": True, "trt_int8_enable": True}
    (_, unknown), = provider_options(["tensorrt"], inputs=inputs + [("scale", (-1,))], shapes={"image": (1, 3, 8, 8)})
    assert not any(k.startswith("trt_profile") for k in unknown) and unknown["trt_fp16_enable"] is False
    # the cache folder defaults to trt_cache/ beside the graph, made when the TensorRT provider is in the chain
    from pipeline.infer import _tensorrt_settings

    settings = _tensorrt_settings(art["dynamic"], {"image": (1, 3, 64, 128)}, None)
    assert settings["cache_dir"] == art["dynamic"].parent / "trt_cache" and settings["cache_dir"].is_dir()
    assert settings["precision"] == "fp32" and settings["inputs"] == inputs


def test_torch_dtype_auto_is_the_amp_choice_and_devices_are_parsed(art):
    from pipeline.amp import choose
    from pipeline.infer import cuda_index

    seg = Segmenter.open(art["ckpt"], device="cpu", dtype="auto", size=SIZE)
    assert seg.describe()["precision"] == choose("auto", "cpu").name  # bf16 where the CPU has it natively
    assert seg.predict(bgr_frames(art["val"], 1)[0]).shape == (96, 192)
    with pytest.raises(InputError, match="dtype 'int8': expected one of auto, fp32, fp16, bf16"):
        TorchBackend(art["model"], "cpu", "int8")
    assert [cuda_index(d) for d in ("cuda:1", "cuda", "cpu", "auto")] == [1, 0, 0, 0]
    with pytest.raises(InputError, match="cuda:N"):
        cuda_index("cuda:x")


def test_host_upsample_and_argmax_is_the_evaluators():
    """The CPU path's class-by-class running maximum gives F.interpolate(bilinear, align_corners=False).argmax, the
    ids the evaluator scores, at a camera size that is no multiple of the logits'."""
    import torch.nn.functional as F

    from pipeline.infer import upsampled_argmax

    rng = np.random.default_rng(3)
    logits = rng.standard_normal((19, 24, 40)).astype(np.float32) * 4
    for size in ((96, 160), (135, 241), (24, 40)):
        ref = F.interpolate(torch.from_numpy(logits)[None], size=size, mode="bilinear", align_corners=False)
        ref = ref.argmax(1)[0].numpy()
        ours = upsampled_argmax(logits, size)
        assert ours.dtype == np.uint8 and ours.shape == size
        assert (ours == ref).mean() >= 0.9995  # float rounding of the two resizes may flip an exact near-tie


def test_postprocess_benchmark_compares_both_host_paths(tmp_path):
    from benchmarks.postprocess import main

    out = tmp_path / "pp.json"
    assert main(["--camera", "90x160", "--logits", "32x40", "--rounds", "2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["camera"] == "90x160" and set(row["ms"]) == {"all planes", "running max"}
    assert row["agreement"] >= 0.999 and row["speedup"] > 0


def test_a_missing_runtime_package_is_one_line_naming_what_to_install(art, monkeypatch):
    """A deployment environment holds only its backend's packages: what is missing is named with its pip package."""
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ModuleNotFoundError
    with pytest.raises(InputError, match=r"running an ONNX file needs the Python module 'onnxruntime' \(pip install "
                                         r"onnxruntime\)") as e:
        Segmenter.open(art["float"])
    assert "\n" not in str(e.value)
