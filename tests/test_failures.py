"""One line for every failure: a corrupt image in a DataLoader worker, a full / read-only / size-limited disk at a
training checkpoint or an artifact, non-finite weights, a broken resume state, sidecars missing a field. Real
processes and real files: the disk errors come from the kernel (a small tmpfs, a read-only mount, RLIMIT_FSIZE)."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.errors import CheckpointError
from pipeline.models import build_model, load_model, save_model
from tests.conftest import ROOT, run_cli

DATA = (4, 2, (64, 128))  # the synthetic set ARGS describe, made once by conftest's `synthetic`
ARGS = ["data.synthetic_train=4", "data.synthetic_val=2", "data.synthetic_size=64x128", "data.size=64x96",
        "teacher.variant=mit_b0", "student.variant=mit_b0", "train.batch_size=2", "train.warmup_steps=1"]
CKPT = 1 << 20  # a B0 checkpoint is ~15 MB, a training state with AdamW ~45 MB: any limit below this fails them


def error_line(err: str) -> str:
    """The one `error:` line that ends a failed run's stderr (log lines and the progress bar may precede it, a
    traceback may not)."""
    assert "Traceback" not in err and "Caught" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Staging files of a write that did not finish (`.<name>.tmp<pid>`, safetensors' own temp files)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name)


@pytest.fixture
def data(tmp_path, synthetic) -> Path:
    """A private copy of the synthetic set, free to corrupt."""
    return Path(shutil.copytree(synthetic(*DATA), tmp_path / "data"))


@pytest.fixture
def mount(tmp_path):
    """`mount(folder, size, readonly)`: a tmpfs at `folder`, unmounted after the test. Skips where this process may
    not mount (not root, or no CAP_SYS_ADMIN, as in most containers and CI runners)."""
    points: list[Path] = []

    def make(folder: Path, size: str = "8m", readonly: bool = False) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if readonly else "")
        if shutil.which("mount") is None:
            pytest.skip("no mount command")
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                           text=True)
        if p.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
        points.append(folder)
        return folder

    yield make
    for folder in reversed(points):
        subprocess.run(["umount", str(folder)], check=True)


def run_limited(*args: str, file_size: int, cwd: Path) -> tuple[int, str, str]:
    """`python -m pipeline.run args` whose files may not grow past `file_size` bytes (RLIMIT_FSIZE): a write
    beyond fails with EFBIG, as on a file system with a file-size cap (SIGXFSZ ignored, as Python does anyway)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "pipeline.run", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300, preexec_fn=limit)
    return p.returncode, p.stdout, p.stderr


# ------------------------------------------------------------------------------------- DataLoader workers


def test_a_corrupt_image_read_in_a_dataloader_worker_is_one_line_naming_the_file(tmp_path, data):
    bad = sorted((data / "leftImg8bit" / "train").rglob("*.png"))[1]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # a PNG signature, then nothing decodable
    args = ["teacher", "--run-dir", str(tmp_path / "run"), *ARGS, f"data.root={data}", "data.workers=1",
            "train.steps=2", "train.eval_every=100"]
    code, _, err = run_cli(*args, cwd=tmp_path, timeout=300)
    assert code == 2, err
    assert error_line(err) == f"error: {bad}: unreadable or corrupt image"
    # --debug keeps the whole story: the main process's traceback and the worker's
    code, _, err = run_cli(*args, "--debug", cwd=tmp_path, timeout=300)
    assert code == 1 and "Traceback" in err and "DataLoader worker process 0" in err and str(bad) in err


# ------------------------------------------------------------------------------------------- OS errors


def train_args(tmp_path: Path, data: Path, run: Path, first_write: str) -> list[str]:
    """A two-step teacher whose first large write is a training state (`state`) or the model artifact (`model`)."""
    every = ["train.ckpt_every=1", "train.eval_every=100"] if first_write == "state" else \
        ["train.ckpt_every=100", "train.eval_every=1"]
    return ["teacher", "--run-dir", str(run), *ARGS, f"data.root={data}", "train.steps=2", *every]


def check_nothing_written(run: Path) -> None:
    """No training state, pointer or model under a final name, and no staging file left behind."""
    states = run / "checkpoints" / "teacher"
    assert not list(states.glob("step-*")) and not (states / "last.json").exists()
    assert not list(run.glob("teacher*.safetensors*"))
    assert leftovers(run) == []


@pytest.mark.parametrize("first_write, target", [("state", "checkpoints/teacher/step-0000001.safetensors"),
                                                 ("model", "teacher.safetensors")])
def test_a_full_disk_during_training_is_one_line_naming_the_file(tmp_path, data, mount, first_write, target):
    run = mount(tmp_path / "disk", "8m") / "run"
    code, _, err = run_cli(*train_args(tmp_path, data, run, first_write), cwd=tmp_path, timeout=300)
    assert code == 2, err
    line = error_line(err)
    assert line.startswith(f"error: {run / target}: No space left on device; free space"), line
    check_nothing_written(run)


@pytest.mark.parametrize("first_write, target", [("state", "checkpoints/teacher/step-0000001.safetensors"),
                                                 ("model", "teacher.safetensors")])
def test_a_file_size_limit_during_training_is_one_line_naming_the_file(tmp_path, data, first_write, target):
    run = tmp_path / "run"
    code, _, err = run_limited(*train_args(tmp_path, data, run, first_write), file_size=CKPT, cwd=tmp_path)
    assert code == 2, err
    line = error_line(err)
    assert line.startswith(f"error: {run / target}: File too large; "), line
    assert "ulimit -f" in line
    check_nothing_written(run)


def test_a_read_only_checkpoint_folder_is_one_line_naming_the_file(tmp_path, data, mount):
    run = tmp_path / "run"
    mount(run / "checkpoints" / "teacher", "1m", readonly=True)
    code, _, err = run_cli(*train_args(tmp_path, data, run, "state"), cwd=tmp_path, timeout=300)
    assert code == 2, err
    line = error_line(err)
    assert line.startswith(f"error: {run}/checkpoints/teacher/step-0000001.safetensors: Read-only file system; "), line


def test_a_file_where_the_checkpoint_folder_should_be_is_one_line(tmp_path, data):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    code, _, err = run_cli(*train_args(tmp_path, data, run, "state"), cwd=tmp_path, timeout=300)
    assert code == 2, err
    line = error_line(err)
    assert line.startswith(f"error: {run}/checkpoints/teacher: Not a directory; a part of the path is a file"), line


@pytest.mark.parametrize("size, named", [("20m", ""), ("34m", "/student.onnx")])
def test_a_full_disk_during_export_is_one_line_and_leaves_no_artifact(tmp_path, data, mount, size, named):
    """The student takes ~15 MB, the traced graph as much again, and a copy of it as much again: 20 MB fills up in
    the trace (a write of torch's that names no file: the run directory is named), 34 MB at the graph's own write."""
    run = mount(tmp_path / "disk", size)
    save_model(build_model("mit_b0", num_classes=19), run / "student.safetensors")
    code, _, err = run_cli("export", "--run-dir", str(run), *ARGS, f"data.root={data}", "export.fp16=false",
                           "export.int8=false", "export.engines=off", cwd=tmp_path, timeout=300)
    assert code == 2, err
    line = error_line(err)
    assert line.startswith(f"error: {run}{named}: No space left on device; free space"), line
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "run.log", "student.safetensors",
                                                     "student.safetensors.json"]


# ------------------------------------------------------------------------------------------ checkpoints


def test_non_finite_weights_are_refused_at_load_naming_the_first_tensor(tmp_path, data):
    model = build_model("mit_b0", num_classes=19)
    with torch.no_grad():
        model.encoder.stages[1].blocks[0].attn.q.weight[0, :3] = float("nan")
        model.head.classifier.bias[2] = float("inf")
    save_model(model, tmp_path / "nan.safetensors")  # a diverged training, saved as is
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "nan.safetensors")
    assert "'encoder.stages.1.blocks.0.attn.q.weight' holds 3 NaN and 0 inf" in str(e.value)
    code, _, err = run_cli("eval", "--run-dir", str(tmp_path / "run"), "--checkpoint",
                           str(tmp_path / "nan.safetensors"), *ARGS, f"data.root={data}", cwd=tmp_path, timeout=300)
    assert code == 2 and "encoder.stages.1.blocks.0.attn.q.weight" in error_line(err), err
    assert not (tmp_path / "run" / "eval.json").exists()


def broken_sidecar(tmp_path: Path, edit) -> Path:
    path = tmp_path / "student.safetensors"
    save_model(build_model("mit_b0", num_classes=19), path)
    side = path.with_name(path.name + ".json")
    record = json.loads(side.read_text())
    edit(record)
    side.write_text(json.dumps(record))
    return path


@pytest.mark.parametrize("edit, field", [(lambda r: r.pop("classes"), "'classes' missing"),
                                         (lambda r: r["details"]["config"].pop("heads"),
                                          "'details.config.heads' missing")])
def test_a_checkpoint_sidecar_missing_a_field_is_one_line_naming_it(tmp_path, data, edit, field):
    path = broken_sidecar(tmp_path, edit)
    with pytest.raises(CheckpointError, match=field):
        load_model(path)
    code, _, err = run_cli("eval", "--run-dir", str(tmp_path / "run"), "--checkpoint", str(path), *ARGS,
                           f"data.root={data}", cwd=tmp_path, timeout=300)
    assert code == 2 and field in error_line(err), err


def test_an_engine_sidecar_input_without_dtype_is_one_line_naming_it(tmp_path):
    pytest.importorskip("trt.runtime")
    from tests.test_trt_runtime import plan_files, sidecar

    side = sidecar("student.int8.plan")
    image = {k: v for k, v in side.details["inputs"][0].items() if k != "dtype"}
    plan = plan_files(tmp_path, replace(side, details={**side.details, "inputs": [image]}))
    code, _, err = run_cli("benchmarks/latency.py", "--engine", str(plan), "--size", "64x128", module=None)
    assert code == 2, err
    line = error_line(err)
    assert "details.inputs[0]" in line and "dtype" in line and str(plan) in line, line


# --------------------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic) -> tuple[Path, list[str]]:
    """A finished two-step teacher run with both training states kept, and the arguments that made it."""
    folder = tmp_path_factory.mktemp("trained")
    args = [*ARGS, f"data.root={synthetic(*DATA)}", "train.steps=2", "train.ckpt_every=1", "train.eval_every=100"]
    code, _, err = run_cli("teacher", "--run-dir", str(folder / "run"), *args, cwd=folder, timeout=300)
    assert code == 0, err
    return folder / "run", args


def _flip_byte(path: Path) -> str:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    return "sha256 differs"


BREAKS = {  # how a resume state breaks -> (the file the error names, what it says)
    "pointer not JSON": ("last.json", lambda d: (d / "last.json").write_text('{"checkpoint": "step-00')),
    "pointer to nothing": ("last.json", lambda d: (d / "last.json").write_text('{"step": 2}')),
    "state files missing": ("step-0000002.json", lambda d: [p.unlink() for p in d.glob("step-0000002.*")]),
    "state record cut short": ("step-0000002.json", lambda d: (d / "step-0000002.json").write_text('{"sta')),
    "state fails its sha256": ("step-0000002.safetensors", lambda d: _flip_byte(d / "step-0000002.safetensors")),
}


@pytest.mark.parametrize("how", BREAKS)
def test_a_broken_resume_state_names_the_file_and_the_way_out(tmp_path, trained, how):
    source, args = trained
    run = Path(shutil.copytree(source, tmp_path / "run"))
    states = run / "checkpoints" / "teacher"
    name, breaks = BREAKS[how]
    breaks(states)
    code, _, err = run_cli("teacher", "--run-dir", str(run), *args, cwd=tmp_path, timeout=300)
    assert code == 2, err
    line = error_line(err)
    assert line.startswith(f"error: {states / name}: "), line
    assert "train.resume=never" in line and "--run-dir" in line, line
    # the way out it names works, and leaves a run directory that resumes
    code, _, err = run_cli("teacher", "--run-dir", str(run), *args, "train.resume=never", cwd=tmp_path, timeout=300)
    assert code == 0, err
    assert json.loads((states / "last.json").read_text())["checkpoint"] == "step-0000002"
    assert sorted(p.name for p in states.iterdir()) == ["last.json", "step-0000001.json",
                                                        "step-0000001.safetensors", "step-0000002.json",
                                                        "step-0000002.safetensors"]
