"""pipeline/timing.py and the scripts over it (benchmarks/latency.py, accuracy.py) and the bench stage: statistics,
interleaving, every backend here end to end, the JSON schema, and the refusals."""

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import timing
from pipeline.config import ExportConfig
from pipeline.errors import InputError
from pipeline.export import export_student
from pipeline.models import build_model, save_model
from pipeline.timing import Target, parse_amount, run_interleaved, summarize
from tests.conftest import run_cli, splits, spread_student

SIZE = (64, 128)


def test_statistics_of_known_timings():
    s = summarize([float(v) for v in range(1, 101)], batch=4)  # 1..100 ms
    assert s["count"] == 100 and s["mean"] == 50.5 and s["min"] == 1 and s["max"] == 100
    # linear interpolation between closest ranks: p = 1 + (n - 1) q
    assert s["p50"] == pytest.approx(50.5) and s["p90"] == pytest.approx(90.1) and s["p95"] == pytest.approx(95.05)
    assert s["p99"] == pytest.approx(99.01)
    assert s["std"] == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert s["throughput"] == pytest.approx(4 * 1000 / 50.5)
    one = summarize([7.0])
    assert one["std"] == 0.0 and one["p99"] == 7.0 and one["throughput"] == pytest.approx(1000 / 7)
    with pytest.raises(InputError, match="no timing samples"):
        summarize([])


def test_amounts():
    assert parse_amount("50", "--iterations") == ("count", 50.0)
    assert parse_amount("1.5s", "--iterations") == ("seconds", 1.5)
    assert parse_amount("0", "--warmup") == ("count", 0.0)
    for bad in ("0", "-3", "abc", "2m"):
        with pytest.raises(InputError, match="--iterations"):
            parse_amount(bad, "--iterations")


def test_interleaving_alternates_and_shares_the_iterations():
    calls = []

    def target(name):
        t = Target(name, "onnx", Path(name), {})
        t.step = lambda n: calls.extend([name] * n) or {"compute": [1.0] * n}
        return t

    ts = [target("a"), target("b"), target("c")]
    run_interleaved(ts, ("count", 1), ("count", 6), rounds=3)
    assert calls[:3] == ["a", "b", "c"]  # warm-up, not kept
    timed = calls[3:]
    # rounds of 2 calls each, the order reversed every other round
    assert timed == ["a", "a", "b", "b", "c", "c", "c", "c", "b", "b", "a", "a", "a", "a", "b", "b", "c", "c"]
    assert all(len(t.samples["compute"]) == 6 for t in ts)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synthetic):
    """A run directory as distill + export leave it (teacher, student, student.onnx, student.int8.onnx)."""
    root = synthetic(6, 4, SIZE)
    train, val = splits(root)
    run = tmp_path_factory.mktemp("run")
    student = spread_student()
    save_model(student, run / "student.safetensors")
    save_model(build_model("mit_b1", num_classes=19).eval(), run / "teacher.safetensors")
    int8 = pytest.importorskip("modelopt.onnx.quantization", reason="INT8 needs nvidia-modelopt") is not None
    # a random student: its Q/DQ graph is held to a looser agreement with the fake-quantized model (near-ties)
    export_student(student, run, ExportConfig(input="float", output="logits", size=SIZE, fp16=False, int8=int8,
                                              parity_frames=2, calibration_frames=4, int8_min_agreement=0.9), val,
                   train)
    return run, root


def cli(*args):
    return run_cli(*args, module=None)


def test_latency_of_every_backend_here_with_a_baseline(run_dir, tmp_path):
    run, _ = run_dir
    out = tmp_path / "lat.json"
    code, stdout, err = cli("benchmarks/latency.py", "--onnx", str(run / "student.onnx"),
                            str(run / "student.int8.onnx"), "--checkpoint", str(run / "student.safetensors"),
                            "--size", "64x128", "--warmup", "1",
                            "--iterations", "4", "--rounds", "2", "--threads", "1", "--e2e", "--frame-size", "96x192",
                            "--baseline", "student.safetensors", "--json", str(out))
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["schema"] == "transkd-latency/1"
    assert set(report) == {"schema", "settings", "machine", "results"}
    assert {"cpu", "cpu_count", "torch", "onnxruntime", "gpu"} <= set(report["machine"])
    rows = {r["label"]: r for r in report["results"]}
    assert set(rows) == {"student.onnx", "student.int8.onnx", "student.safetensors"}
    assert rows["student.onnx"]["backend"] == "onnxruntime" and rows["student.safetensors"]["backend"] == "torch"
    assert rows["student.int8.onnx"]["precision"] == "int8"
    for r in rows.values():
        assert set(timing.STATS) | {"count", "throughput"} == set(r["compute"]) and r["compute"]["count"] == 4
        assert r["compute"]["min"] <= r["compute"]["p50"] <= r["compute"]["p99"] <= r["compute"]["max"]
        assert {"preprocess", "postprocess", "end_to_end"} <= set(r) and r["frame_size"] == "96x192"
        assert r["end_to_end"]["mean"] >= r["preprocess"]["mean"]
    assert rows["student.safetensors"]["speedup_vs_baseline"] == 1.0
    assert rows["student.onnx"]["speedup_vs_baseline"] == pytest.approx(
        rows["student.safetensors"]["compute"]["p50"] / rows["student.onnx"]["compute"]["p50"])
    assert "| student.int8.onnx | onnxruntime (cpu) |" in stdout and "end to end" in stdout


@pytest.mark.parametrize("args, message", [
    (["--onnx", "nope.onnx"], "nope.onnx: no such artifact"),
    (["--onnx", "{run}/student.onnx", "--batch", "2"], "fixed at batch 1"),
    (["--onnx", "{run}/student.onnx", "--size", "128x256"], "fixed at 64x128"),
    (["--checkpoint", "{run}/student.safetensors"], "give --size"),
    (["--onnx", "{run}/student.onnx", "--baseline", "other.onnx"], "--baseline other.onnx: not one of"),
    (["--onnx", "{run}/student.onnx", "--iterations", "ten"], "--iterations 'ten'"),
    ([], "nothing to time"),
])
def test_latency_refusals_are_one_line(run_dir, args, message):
    run, _ = run_dir
    code, _, err = cli("benchmarks/latency.py", *[a.format(run=run) for a in args])
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_engine_outside_its_profile_is_refused_before_tensorrt_is_needed(run_dir, tmp_path):
    pytest.importorskip("trt.runtime")
    from tests.test_trt_runtime import plan_files, sidecar

    side = sidecar("student.int8.plan")
    image = {**side.details["inputs"][0], "profile": {"min": [1, 3, 64, 64], "opt": [1, 3, 64, 128],
                                                      "max": [2, 3, 128, 256]}}
    plan = plan_files(tmp_path, replace(side, details={**side.details, "inputs": [image]}))
    code, _, err = cli("benchmarks/latency.py", "--engine", str(plan), "--batch", "4", "--size", "64x128")
    assert code == 2 and err.count("\n") == 1 and "4" in err and "profile" in err, err
    code, _, err = cli("benchmarks/latency.py", "--engine", str(plan), "--size", "512x1024")
    assert code == 2 and err.count("\n") == 1 and "profile" in err, err


def test_accuracy_of_artifacts_equals_the_export_measurement(run_dir, tmp_path):
    run, root = run_dir
    out = tmp_path / "acc.json"
    code, stdout, err = cli("benchmarks/accuracy.py", str(run / "student.onnx"), str(run / "student.safetensors"),
                            "--root", str(root), "--size", "64x128", "--json", str(out))
    assert code == 0, err
    rows = {Path(r["artifact"]).name: r for r in json.loads(out.read_text())["results"]}
    measured = json.loads((run / "student.onnx.json").read_text())["measured"]
    # the export scored the ONNX on the same frames through its own path: the same number
    assert rows["student.onnx"]["miou"] == pytest.approx(measured["miou"], abs=1e-9)
    assert rows["student.safetensors"]["miou"] == pytest.approx(measured["pytorch_miou"], abs=2e-3)
    assert "| student.onnx | onnxruntime | fp32 | 64x128 |" in stdout


def test_bench_stage_writes_report_md_json_and_plot(run_dir):
    run, root = run_dir
    keys = [f"data.root={root}", "data.synthetic_train=6", "data.synthetic_val=4", "data.synthetic_size=64x128",
            "data.size=64x128", "bench.iterations=2", "bench.rounds=1", "bench.warmup=0", "bench.threads=1"]
    code, stdout, err = run_cli("bench", "--run-dir", str(run), *keys)
    assert code == 0, err
    report = json.loads((run / "report.json").read_text())
    rows = {r["label"]: r for r in report["results"]}
    assert {"teacher.safetensors", "student.safetensors", "student.onnx"} <= set(rows)
    assert rows["teacher.safetensors"]["speedup_vs_teacher"] == 1.0
    measured = json.loads((run / "student.onnx.json").read_text())["measured"]
    assert rows["student.onnx"]["miou"] == pytest.approx(measured["miou"], abs=1e-9)
    cx = report["complexity"]
    assert cx["teacher.safetensors"]["gmacs"] > cx["student.safetensors"]["gmacs"] > cx["student.onnx"]["gmacs"]
    assert (run / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run / "report.md").read_text()
    assert "| student.onnx | cpu | onnxruntime | fp32 |" in md and "report.png" in md and "report.md" in stdout


class Unrelated(torch.nn.Module):
    """A model that has nothing to do with this pipeline: three inputs of three kinds, two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bias = torch.nn.Embedding(4, 8)

    def forward(self, images, scale, class_ids):
        features = self.conv(images) * scale + self.bias(class_ids)[:, :, None, None]
        return features, features.mean((2, 3))


@pytest.fixture(scope="module")
def foreign_onnx(tmp_path_factory):
    """An ONNX file torch.onnx.export made from an unrelated model: no transkd.metadata, no sidecar; images with a
    dynamic batch, height and width, a static scale, int64 class ids with a dynamic batch."""
    path = tmp_path_factory.mktemp("foreign") / "detector.onnx"
    example = (torch.zeros(1, 3, 16, 16), torch.ones(1), torch.zeros(1, dtype=torch.int64))
    torch.onnx.export(Unrelated().eval(), example, str(path), input_names=["images", "scale", "class_ids"],
                      output_names=["features", "pooled"], dynamo=False,
                      dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}, "class_ids": {0: "n"}})
    return path


def latency_main(capsys, *args):
    from benchmarks.latency import main

    code = main([*args, "--warmup", "1", "--iterations", "4", "--rounds", "2"])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_foreign_onnx_is_timed_like_trtexec(foreign_onnx, tmp_path, capsys):
    """Inputs from the graph, the dynamic dims from --batch and --size, random input of each dtype: the full
    statistics row, and the resolved shapes in the JSON."""
    out = tmp_path / "lat.json"
    code, stdout, err = latency_main(capsys, "--onnx", str(foreign_onnx), "--batch", "2", "--size", "32x48",
                                     "--json", str(out))
    assert code == 0, err
    assert "detector.onnx: images 2x3x32x48 float32, scale 1 float32, class_ids 2 int64" in stdout
    head = next(line for line in stdout.splitlines() if line.startswith("| artifact"))
    assert all(f"{s} ms" in head for s in timing.STATS) and head.endswith("img/s |")
    assert "| detector.onnx | onnxruntime (cpu) | cpu | fp32 | 2 | 32x48 |" in stdout
    (row,) = json.loads(out.read_text())["results"]
    assert row["foreign"] and row["provider"] == "cpu" and row["batch"] == 2
    assert row["inputs"] == {"images": "2x3x32x48 float32", "scale": "1 float32", "class_ids": "2 int64"}
    assert list(row["outputs"]) == ["features", "pooled"]
    c = row["compute"]
    assert c["count"] == 4 and c["min"] <= c["p50"] <= c["p99"] <= c["max"]
    assert c["throughput"] == pytest.approx(2 * 1000 / c["mean"])


def test_shapes_win_over_batch_and_size(foreign_onnx, tmp_path, capsys):
    out = tmp_path / "lat.json"
    code, _, err = latency_main(capsys, "--onnx", str(foreign_onnx), "--batch", "2", "--size", "32x48",
                                "--shapes", "images:3x3x8x12,class_ids:3", "--json", str(out))
    assert code == 0, err
    (row,) = json.loads(out.read_text())["results"]
    assert row["inputs"]["images"] == "3x3x8x12 float32" and row["inputs"]["class_ids"] == "3 int64"
    assert row["batch"] == 3 and row["size"] == "8x12"
    assert json.loads(out.read_text())["settings"]["shapes"] == "images:3x3x8x12,class_ids:3"


@pytest.mark.parametrize("args, message", [
    ([], "has a dynamic dim 2: give --size HxW"),
    (["--size", "32x48", "--e2e"], "needs the contract"),
    (["--shapes", "images:1x3x8x8,boxes:1x4"], "--shapes names 'boxes', but the inputs are"),
    (["--shapes", "images:1x4x8x8", "--size", "32x32"], "does not fit the input's"),
    (["--size", "32x48", "--provider", "cuda"], "provider cuda asked, cpu got"),
])
def test_foreign_onnx_refusals_are_one_line(foreign_onnx, capsys, args, message):
    code, _, err = latency_main(capsys, "--onnx", str(foreign_onnx), *args)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert "--allow-fallback" in err or "cuda" not in args
    assert "input 'images'" in err or args  # a missing dim names the input


def test_an_asked_provider_that_falls_back_is_timed_where_it_runs_when_allowed(foreign_onnx, tmp_path, capsys):
    out = tmp_path / "lat.json"
    code, stdout, err = latency_main(capsys, "--onnx", str(foreign_onnx), "--size", "32x32", "--provider", "cuda",
                                     "--allow-fallback", "--json", str(out))
    assert code == 0, err
    (row,) = json.loads(out.read_text())["results"]
    assert (row["provider"], row["provider_asked"], row["device"]) == ("cpu", "cuda", "cpu")
    assert "| detector.onnx | onnxruntime (cpu) | cpu |" in stdout


def test_our_graph_keeps_its_contract_and_refuses_shapes(run_dir, capsys):
    run, _ = run_dir
    code, _, err = latency_main(capsys, "--onnx", str(run / "student.onnx"), "--shapes", "image:1x3x64x128")
    assert code == 2 and "--shapes is for graphs and engines without this pipeline's record" in err, err
    assert not timing.foreign(run / "student.onnx", "onnx") and not timing.foreign(run / "missing.onnx", "onnx")


def test_an_engine_without_sidecar_goes_to_the_tensorrt_helper(tmp_path, capsys):
    """No sidecar: not refused for the missing record, but handed to trt/timing.py, which needs TensorRT and a GPU
    (here it says so in one line)."""
    plan = tmp_path / "someone_elses.plan"
    plan.write_bytes(b"\0" * 64)
    assert timing.foreign(plan, "engine")
    code, _, err = latency_main(capsys, "--engine", str(plan), "--size", "64x128")
    assert code == 2 and err.count("\n") == 1 and "every artifact this pipeline writes has its sidecar" not in err, err


def test_random_inputs_take_each_dtype_and_refuse_what_cannot_be_fed():
    from pipeline.onnxinfo import Tensor

    inputs = [Tensor("x", "float16", ("n", 3)), Tensor("ids", "int64", (5,)), Tensor("mask", "bool", (4,)),
              Tensor("img", "uint8", (2, 2))]
    feed = timing.random_inputs(inputs, {"x": (2, 3), "ids": (5,), "mask": (4,), "img": (2, 2)})
    assert {k: (v.dtype.name, v.shape) for k, v in feed.items()} == {
        "x": ("float16", (2, 3)), "ids": ("int64", (5,)), "mask": ("bool", (4,)), "img": ("uint8", (2, 2))}
    assert 0 <= feed["ids"].min() and feed["ids"].max() < 4
    again = timing.random_inputs(inputs, {"x": (2, 3), "ids": (5,), "mask": (4,), "img": (2, 2)})
    assert all(np.array_equal(feed[k], again[k]) for k in feed)  # seeded
    with pytest.raises(InputError, match="input 'tokens' is bfloat16"):
        timing.random_inputs([Tensor("tokens", "bfloat16", (1,))], {"tokens": (1,)}, where="m.onnx")


def test_two_onnx_runtimes_in_one_environment_are_refused_before_a_session(foreign_onnx, tmp_path):
    """onnxruntime and onnxruntime-gpu both install the onnxruntime module: with a second distribution's record on
    the path, the session is refused in one line (pipeline.deps) instead of running on whichever files won."""
    from tests.conftest import ROOT

    record = tmp_path / "site" / "onnxruntime_gpu-1.20.1.dist-info"
    record.mkdir(parents=True)
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.20.1\n")
    code, _, err = run_cli("benchmarks/latency.py", "--onnx", str(foreign_onnx), "--size", "32x32", module=None,
                           env={"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path / 'site'}"})
    assert code == 2 and err.count("\n") == 1 and "onnxruntime-gpu 1.20.1" in err, err


def test_artifacts_of_several_runs_are_named_apart():
    from benchmarks.latency import short_names

    names = short_names(["runs/ev_mit/student.onnx", "runs/ev_lvt/student.onnx", "runs/ev_lvt/student.int8.onnx",
                         "/abs/x/student.onnx"])
    assert list(names.values()) == ["ev_mit/student.onnx", "ev_lvt/student.onnx", "ev_lvt/student.int8.onnx",
                                     "x/student.onnx"]
    assert list(short_names(["a/student.onnx", "a/student.int8.onnx"]).values()) == ["student.onnx",
                                                                                       "student.int8.onnx"]
    assert list(short_names(["a/b/s.onnx", "c/b/s.onnx"]).values()) == ["a/b/s.onnx", "c/b/s.onnx"]
