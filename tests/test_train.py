"""Trainer: DDP equals gradient accumulation, SIGKILL + resume equals an uninterrupted run, NaN stops cleanly,
and the CLI chains teacher -> distill in one run directory."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import amp
from pipeline import config as config_mod
from pipeline.artifacts import read_sidecar
from pipeline.errors import ConfigError
from pipeline.models import build_model
from pipeline.train import dist_plan
from tests.conftest import ddp_and_one_process, ddp_worker_finish, ddp_worker_start, kill_at_step, run_cli, start_cli

TINY = ["data.synthetic_train=12", "data.synthetic_val=4", "data.synthetic_size=64x128", "data.size=64x96",
        "teacher.variant=mit_b0", "student.variant=mit_b0", "train.warmup_steps=2", "train.log_every=1"]
DATA = (12, 4, (64, 128))  # the synthetic set TINY describes, made once by conftest's `synthetic`


# ----------------------------------------------------------------------------------------- DDP == accumulate


def _train_worker(rank: int, world: int, port: int, root: str, run_dir: str, accumulate: int, out: str) -> None:
    from pipeline.distill import build_method
    from pipeline.train import Trainer

    cfg = config_mod.load(None, TINY + [f"data.root={root}", "train.steps=3", "train.batch_size=2",
                                        f"train.accumulate={accumulate}", "train.eval_every=100",
                                        "train.ckpt_every=100", "data.flip=true", "train.device=cpu"])
    env, train, val = ddp_worker_start(rank, world, port, cfg, run_dir)
    torch.manual_seed(0)
    teacher, student = build_model("mit_b0"), build_model("mit_b0")
    method = build_method("transkd-base", teacher, student)
    ddp_worker_finish(Trainer("student", cfg, Path(run_dir), student, method, train, val, env), student, env, out)


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, synthetic):
    a, b = ddp_and_one_process(_train_worker, str(synthetic(*DATA)), tmp_path)
    torch.manual_seed(0)  # the workers' initial weights, rebuilt: teacher first, then the student
    build_model("mit_b0")
    start = dict(build_model("mit_b0").named_parameters())
    assert set(a) == set(b)
    moved = 0
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
        moved += int(not torch.equal(a[k], start[k]))
    assert moved > 0.9 * len(a)  # the comparison is between trained weights, not two untouched copies


def test_each_cuda_process_takes_its_local_gpu_and_binds_nccl_to_it():
    plan = dist_plan(world=8, local_rank=3, use_cuda=True, cuda_devices=4)
    assert plan.device == torch.device("cuda", 3) and plan.backend == "nccl"
    assert plan.init_kwargs == {"device_id": torch.device("cuda", 3)}  # the communicator is formed on that GPU
    one = dist_plan(world=1, local_rank=0, use_cuda=True, cuda_devices=1)
    assert (one.device, one.backend, one.init_kwargs) == (torch.device("cuda", 0), None, {})


def test_cpu_processes_join_gloo_without_a_device():
    assert dist_plan(world=2, local_rank=1, use_cuda=False) == dist_plan(world=2, local_rank=0, use_cuda=False)
    plan = dist_plan(world=2, local_rank=1, use_cuda=False)
    assert (plan.device, plan.backend, plan.init_kwargs) == (torch.device("cpu"), "gloo", {})
    assert dist_plan(world=1, local_rank=0, use_cuda=False).backend is None


def test_more_processes_than_gpus_is_one_line():
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=2: this machine shows 2 CUDA device\(s\)"):
        dist_plan(world=4, local_rank=2, use_cuda=True, cuda_devices=2)


# ------------------------------------------------------------------------------------------ kill and resume


def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(tmp_path, synthetic):
    args = TINY + [f"data.root={synthetic(*DATA)}", "train.steps=30", "train.ckpt_every=3", "train.eval_every=15",
                   "train.batch_size=4", "data.size=96x128"]
    code, _, err = run_cli("teacher", "--run-dir", str(tmp_path / "straight"), *args, cwd=tmp_path, timeout=300)
    assert code == 0, err

    proc = start_cli("teacher", "--run-dir", str(tmp_path / "killed"), *args, cwd=tmp_path)
    killed_at = kill_at_step(proc, tmp_path / "killed" / "checkpoints" / "teacher" / "last.json", 9)
    assert 9 <= killed_at < 30
    assert not (tmp_path / "killed" / "teacher.last.safetensors").exists()

    code, _, err = run_cli("teacher", "--run-dir", str(tmp_path / "killed"), *args, cwd=tmp_path, timeout=300)
    assert code == 0, err
    assert "resumed from" in (tmp_path / "killed" / "run.log").read_text()
    a = load_file(tmp_path / "straight" / "teacher.last.safetensors")
    b = load_file(tmp_path / "killed" / "teacher.last.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_changed_config_refuses_to_resume(tmp_path, synthetic):
    args = TINY + [f"data.root={synthetic(*DATA)}", "train.steps=2", "train.batch_size=2"]
    assert run_cli("teacher", "--run-dir", str(tmp_path / "r"), *args, cwd=tmp_path, timeout=300)[0] == 0
    code, _, err = run_cli("teacher", "--run-dir", str(tmp_path / "r"), *args, "train.lr=0.1", cwd=tmp_path,
                           timeout=300)
    assert code == 2
    assert err.strip().startswith("error:") and "train.lr" in err and len(err.strip().splitlines()) == 1, err
    assert "lr: 0.1" not in (tmp_path / "r" / "config.yaml").read_text()  # the run's own config stays


def test_non_finite_loss_stops_with_the_step_and_term(tmp_path, synthetic):
    args = TINY + [f"data.root={synthetic(*DATA)}", "train.steps=40", "train.ckpt_every=1", "train.batch_size=2",
                   "train.lr=1e12", "train.warmup_steps=0"]
    code, _, err = run_cli("teacher", "--run-dir", str(tmp_path / "nan"), *args, cwd=tmp_path, timeout=300)
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: teacher step ") and ("'ce' is nan" in line or "'ce' is inf" in line), line
    kept = line.split("Last good checkpoint: ")[1]
    assert Path(kept).is_file()


# ------------------------------------------------------------------------------------------------- the CLI


def test_distill_trains_the_teacher_then_the_student_in_one_run_dir(tmp_path, synthetic):
    run = tmp_path / "run"
    args = TINY + [f"data.root={synthetic(*DATA)}", "train.steps=4", "train.batch_size=2", "train.eval_every=2",
                   "distill.method=transkd-ea"]
    code, out, err = run_cli("distill", "--run-dir", str(run), *args, cwd=tmp_path, timeout=300)
    assert code == 0, err
    for name in ("config.yaml", "run.log", "summary.json", "method.json", "teacher.safetensors",
                 "teacher.safetensors.json", "student.safetensors", "student.safetensors.json",
                 "student.last.safetensors"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard" / "student").glob("events.out.tfevents.*"))
    cfg = config_mod.load(run / "config.yaml")
    assert cfg.distill.method == "transkd-ea" and cfg.train.steps == 4
    meta = read_sidecar(run / "student.safetensors")
    assert meta.details["training"]["method"] == "transkd-ea" and meta.classes[0] == "road"
    assert meta.contract.size == [64, 96]
    assert "run directory" in out and "student.safetensors" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["distill"]["teacher"]["steps"] == 4 and summary["distill"]["steps"] == 4
    # the precision train.amp=auto took here, for both models, in the summary and the log
    choice = amp.choose("auto", "cpu")
    assert summary["distill"]["amp"] == summary["distill"]["teacher"]["amp"] == choice.record("auto", "cpu")
    assert f"student: {'float32' if choice.dtype is None else choice.name + ' autocast'} on cpu" in (
        run / "run.log").read_text()
    # eval reads the run's student by default and writes eval.json, scored in the same precision
    code, out, err = run_cli("eval", "--run-dir", str(run), *args, cwd=tmp_path, timeout=300)
    assert code == 0, err
    scores = json.loads((run / "eval.json").read_text())
    assert 0.0 <= scores["miou"] <= 1.0 and scores["amp"] == choice.record("auto", "cpu")


def test_cli_errors_are_one_line(tmp_path):
    for argv, expected in ((["distil"], "unknown stage 'distil'"), (["distill", "train.stepz=3"], "unknown key"),
                           ([], "no stage given"),
                           (["eval", "--run-dir", str(tmp_path / "x"), "--checkpoint", str(tmp_path / "none.pth")],
                            "none.pth: no such file")):
        code, _, err = run_cli(*argv, "data.root=" + str(tmp_path / "d"), "data.synthetic_train=2",
                               "data.synthetic_val=1", "data.synthetic_size=64x64", cwd=tmp_path, timeout=300)
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("error:") and expected in last and "Traceback" not in err, (argv, err)


def test_a_write_killed_midway_leaves_nothing_after_the_next_run(tmp_path):
    """A kill inside a state's write leaves temporary files in checkpoints/<role> (io.atomic_path's and the ones
    safetensors writes beside its target); the next Checkpointer run removes them and keeps every state."""
    from pipeline.train import Checkpointer

    ckpt = Checkpointer(tmp_path, "teacher", 2, {"k": 1})
    ckpt.save(1, {"step": 1, "w": torch.ones(2)})
    partial = [ckpt.folder / ".step-0000002.safetensors.tmp4242", ckpt.folder / ".tmpeizLEs",
               ckpt.folder / ".last.json.tmp4242"]
    for p in partial:
        p.write_bytes(b"half")
    ckpt.remove_partial()
    assert sorted(p.name for p in ckpt.folder.iterdir()) == ["last.json", "step-0000001.json",
                                                             "step-0000001.safetensors"]
    assert ckpt.load_last()["step"] == 1
