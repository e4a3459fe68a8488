"""benchmarks/gpu_check.py: on a machine with no GPU it says so and exits 0; its sections run on the CPU with --smoke
(the same code the GPU run takes, on a tiny model), each ok or skipped with its reason, a failed one reported in one
line with exit status 1; the report is rewritten after every section."""

import json

import pytest
import torch

from tests.conftest import run_cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu_says_so_and_exits_0(tmp_path):
    code, out, err = run_cli("--out", str(tmp_path / "gc"), module="benchmarks.gpu_check")
    assert code == 0, err
    assert "no CUDA GPU is visible" in out
    assert not (tmp_path / "gc").exists()  # nothing measured, nothing written


def test_smoke_sections_on_cpu(tmp_path):
    out = tmp_path / "gc"
    code, stdout, err = run_cli("--out", str(out), "--device", "cpu", "--smoke", "--only", "environment",
                                "cuda_runtime", "segmenter", "tensorrt", "torch_latency", module="benchmarks.gpu_check")
    assert code == 0, stdout + err
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["schema"] == "transkd-gpu-check/1" and report["slug"].startswith("cpu-")
    status = {k: v["status"] for k, v in report["sections"].items()}
    assert list(status) == ["environment", "cuda_runtime", "segmenter", "tensorrt", "torch_latency"]
    assert status["environment"] == status["segmenter"] == status["torch_latency"] == "ok"
    assert status["cuda_runtime"] == status["tensorrt"] == "skipped: needs a CUDA device"
    env = report["sections"]["environment"]["data"]
    assert env["packages"]["torch"] == torch.__version__
    assert env["amp_auto"]["cpu"]["dtype"] in ("bf16", "fp32")
    seg = report["sections"]["segmenter"]["data"]
    assert {(r["precision"], r["mode"]) for r in seg} == {("fp32", "eager"), ("bf16", "eager")}
    assert next(r for r in seg if r["precision"] == "fp32")["agreement_vs_cpu_fp32"] == 1.0
    grid = report["sections"]["torch_latency"]["data"]["rows"]
    assert len(grid) == 2 * 2 * 2  # fp32/bf16 x batch 1/2 x student/teacher at one size
    assert all(r["p50_ms"] > 0 and r["img_per_s"] > 0 for r in grid)
    md = (out / "gpu_check.md").read_text()
    for name in status:
        assert f"## {name}: {status[name]}" in md


def test_failed_section_is_one_line_and_exit_1(tmp_path):
    out = tmp_path / "gc"
    (out / "work").mkdir(parents=True)
    (out / "work" / "run").write_text("a file where the run directory goes")
    code, stdout, err = run_cli("--out", str(out), "--device", "cpu", "--smoke", "--only", "environment", "distill",
                                module="benchmarks.gpu_check")
    assert code == 1, stdout + err
    sections = json.loads((out / "gpu_check.json").read_text())["sections"]
    assert sections["environment"]["status"] == "ok"
    assert sections["distill"]["status"].startswith("failed: AssertionError: pipeline.run exited 2: error:")
    assert "failed: distill" in stdout.splitlines()[-1]
    assert "Traceback" not in (out / "distill.log").read_text()
