"""Quantization-aware distillation (the qad stage): the fake-quantized student learns against the teacher through the
one Trainer, a killed QAD run resumes to the uninterrupted one's states, bad qad keys and missing models are refused in
one line, and `distill qad` writes a QAD state that load_model opens."""

import argparse
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import config as config_mod
from pipeline import quant
from pipeline.errors import ConfigError
from pipeline.io import load_state, sha256_file
from tests.conftest import (
    ddp_and_one_process,
    ddp_worker_finish,
    ddp_worker_start,
    kill_at_step,
    run_cli,
    splits,
    spread_student,
    start_cli,
)
from tests.test_preflight import refused
from tests.test_train import DATA, TINY


def _model(train_set, seed: int, variant: str = "mit_b0"):
    """A random model of `variant` with the dataset's label set in its meta, as the stages record it."""
    from pipeline.models.segformer import IMAGENET_MEAN, IMAGENET_STD, ModelMeta

    model = spread_student(seed, train_set.num_classes, variant)
    model.meta = ModelMeta(list(train_set.classes), [list(c) for c in train_set.palette], IMAGENET_MEAN, IMAGENET_STD,
                           (64, 96), "test")
    return model


@pytest.fixture(scope="module")
def made_run(synthetic, tmp_path_factory) -> Path:
    """A run directory as distill leaves it (teacher.safetensors, student.safetensors, no training states): copy it."""
    from pipeline.models import save_model

    train, _ = splits(synthetic(*DATA))
    folder = tmp_path_factory.mktemp("made") / "run"
    folder.mkdir()
    save_model(_model(train, 1), folder / "teacher.safetensors")
    save_model(_model(train, 2), folder / "student.safetensors")
    return folder


def _args(synthetic, *more: str) -> list[str]:
    return [*TINY, f"data.root={synthetic(*DATA)}", "train.batch_size=2", "qad.calibration_frames=2",
            "qad.warmup_steps=1", *more]


# ------------------------------------------------------------------------------------------------ learning
def test_thirty_qad_steps_lower_the_loss_on_a_fixed_batch(synthetic, tmp_path):
    from pipeline.stages import datasets, qad_method
    from pipeline.train import DistEnv, Trainer

    cfg = config_mod.load(None, _args(synthetic, "qad.lr=1e-3", "qad.warmup_steps=0", "qad.steps=30"))
    env = DistEnv(0, 1, torch.device("cpu"))
    train, val = datasets(cfg, tmp_path, env)
    teacher, student = _model(train, 1), _model(train, 2)
    qmodel = quant.quantize(student)
    batch = {k: torch.stack([train[i][k] for i in range(2)]) for k in ("image", "label")}
    quant.calibrate(qmodel, [batch["image"]])
    quant.learn_ranges(qmodel, True)
    method = qad_method(cfg, teacher, qmodel)
    assert method.weights == {"ce": 1.0, "hcl": 1.0, "pea": 1.0, "kd": 1.0} and method.options["temperature"] == 4.0
    conv = next(u.module for u in quant.units(qmodel) if isinstance(u.module, quant.QuantConv2d))
    ranges, weight = quant.range_state(qmodel), conv.weight.detach().clone()
    trainer = Trainer("qad", cfg, tmp_path, qmodel, method, train, val, env)
    assert trainer.precision.dtype is None  # fake quantization trains in float32, whatever train.amp says
    qmodel.train()
    history = [trainer.train_step(step, itertools.repeat(batch)) for step in range(30)]
    assert set(history[0]) == {"ce", "hcl", "pea", "kd", "total"}
    assert history[-1]["total"] < 0.7 * history[0]["total"], [round(h["total"], 3) for h in history]
    # the weights learned through the straight-through estimator, the ranges through LSQ's gradient
    assert not torch.equal(conv.weight, weight)
    assert sum(abs(v - ranges[k]) > 0 for k, v in quant.range_state(qmodel).items()) > len(ranges) // 2


def test_the_modules_start_from_the_distill_state_when_it_matches(synthetic, tmp_path):
    from pipeline.distill import build_method
    from pipeline.stages import distill_modules
    from pipeline.train import Checkpointer

    train, _ = splits(synthetic(*DATA))
    teacher, student = _model(train, 1), _model(train, 2)
    torch.manual_seed(5)
    distilled = build_method("transkd-base", teacher, student)
    Checkpointer(tmp_path, "student", 2, {"distill.method": "transkd-base"}).save(
        3, {"step": 3, "modules": distilled.modules.state_dict()})
    torch.manual_seed(6)
    method = build_method("transkd-base", teacher, quant.quantize(student))
    assert distill_modules(tmp_path, method) == str(tmp_path / "checkpoints" / "student" / "step-0000003.safetensors")
    assert all(torch.equal(v, distilled.modules.state_dict()[k]) for k, v in method.modules.state_dict().items())
    other = build_method("transkd-ea", teacher, quant.quantize(student))  # another method: its own seeded init
    before = {k: v.clone() for k, v in other.modules.state_dict().items()}
    assert distill_modules(tmp_path, other).startswith("seeded init")
    assert all(torch.equal(v, before[k]) for k, v in other.modules.state_dict().items())


def _qad_worker(rank: int, world: int, port: int, root: str, run_dir: str, accumulate: int, out: str) -> None:
    from pipeline.stages import qad_method, qad_student
    from pipeline.train import Trainer

    cfg = config_mod.load(None, [*TINY, f"data.root={root}", "qad.steps=3", "train.batch_size=2",
                                 f"train.accumulate={accumulate}", "train.eval_every=100", "train.ckpt_every=100",
                                 "qad.calibration_frames=2", "qad.lr=1e-3", "train.device=cpu"])
    env, train, val = ddp_worker_start(rank, world, port, cfg, run_dir)
    qmodel, _ = qad_student(cfg, _model(train, 2), train, val)
    trainer = Trainer("qad", cfg, Path(run_dir), qmodel, qad_method(cfg, _model(train, 1), qmodel), train, val, env)
    ddp_worker_finish(trainer, qmodel, env, out)


def test_two_gloo_processes_train_qad_as_one_process_with_the_same_global_batch(synthetic, tmp_path):
    a, b = ddp_and_one_process(_qad_worker, str(synthetic(*DATA)), tmp_path)
    assert set(a) == set(b) and any(k.endswith("amax") for k in a)
    for k in a:  # weights, and the activation ranges LSQ moved, all-reduced like every other gradient
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_a_non_finite_qad_loss_stops_with_the_step_and_the_term(made_run, synthetic, tmp_path):
    from pipeline.stages import datasets, qad_method, qad_student
    from pipeline.train import DistEnv, Trainer, TrainingError

    cfg = config_mod.load(None, _args(synthetic, "qad.steps=5", "train.ckpt_every=1", "qad.lr=1e30",
                                      "qad.warmup_steps=0"))
    env = DistEnv(0, 1, torch.device("cpu"))
    train, val = datasets(cfg, tmp_path, env)
    qmodel, _ = qad_student(cfg, _model(train, 2), train, val)
    trainer = Trainer("qad", cfg, tmp_path, qmodel, qad_method(cfg, _model(train, 1), qmodel), train, val, env)
    with pytest.raises(TrainingError, match=r"^qad step \d: loss term '\w+' is (nan|inf); stopped. Last good "
                                            r"checkpoint: .*checkpoints/qad/step-\d+.safetensors$"):
        trainer.fit()


# ------------------------------------------------------------------------------------------------ resume
def _same(a, b, where: str = "state") -> None:
    """Two training states equal in every tensor bit and every value."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_a_killed_qad_run_resumes_to_the_uninterrupted_states(made_run, synthetic, tmp_path):
    runs = {name: tmp_path / name for name in ("straight", "killed")}
    for run in runs.values():
        shutil.copytree(made_run, run)
    args = _args(synthetic, "qad.steps=10", "train.ckpt_every=2", "train.eval_every=10")
    straight = start_cli("qad", "--run-dir", str(runs["straight"]), *args, cwd=tmp_path)
    proc = start_cli("qad", "--run-dir", str(runs["killed"]), *args, cwd=tmp_path)
    assert 4 <= kill_at_step(proc, runs["killed"] / "checkpoints" / "qad" / "last.json", 4) < 10
    assert not (runs["killed"] / "student.qad.last.safetensors").exists()
    code, _, err = run_cli("qad", "--run-dir", str(runs["killed"]), *args, cwd=tmp_path, timeout=300)
    assert code == 0, err[-3000:]
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-3000:]
    assert "qad: resumed from" in (runs["killed"] / "run.log").read_text()
    a, b = (load_state(run / "checkpoints" / "qad" / "step-0000010") for run in runs.values())
    assert a["step"] == 10 and a["start_miou"] is not None
    _same(a, b)
    for name in ("student.qad.safetensors", "student.qad.last.safetensors"):
        assert sha256_file(runs["straight"] / name) == sha256_file(runs["killed"] / name), name


# ------------------------------------------------------------------------------------------------ refusals
def test_qad_refuses_without_a_student_or_a_teacher_in_one_line(made_run, tmp_path):
    line = refused(tmp_path, "qad", *TINY)
    assert line == (f"error: {tmp_path / 'run' / 'student.safetensors'}: no student to fine-tune with quantization "
                    "(qad); run the distill stage first or pass --checkpoint")
    student = tmp_path / "mine.safetensors"
    shutil.copy(made_run / "student.safetensors", student)
    shutil.copy(made_run / "student.safetensors.json", tmp_path / "mine.safetensors.json")
    line = refused(tmp_path, "qad", *TINY, "--checkpoint", str(student))
    assert line == (f"error: {tmp_path / 'run' / 'teacher.safetensors'}: no teacher to distil from while quantizing "
                    "(qad); run the distill stage first or set teacher.checkpoint")


def test_a_qad_state_is_no_student_to_start_qad_from(made_run, tmp_path):
    from pipeline.models import load_model

    state = tmp_path / "s.qad.safetensors"
    quant.save_qad(quant.quantize(load_model(made_run / "student.safetensors")), state)
    line = refused(tmp_path, "qad", *TINY, f"teacher.checkpoint={made_run / 'teacher.safetensors'}",
                   "--checkpoint", str(state))
    assert line == (f"error: --checkpoint {state}: already fake-quantized (a QAD state); qad starts from the float "
                    "student")


@pytest.mark.parametrize("item, message", [
    ("qad.weights.hlc=2", "qad.weights.hlc: unknown setting 'hlc'; expected one of ce, hcl, pea, csf_mid, "
                          "pea_stage_weights, class_weights, ce_resolution, kd, temperature (method transkd-base's "
                          "settings and logit KD; did you mean hcl?)"),
    ("qad.weights.kd=-1", "qad.weights (logit KD): method kd: weight kd=-1, expected a number >= 0"),
    ("qad.weights.temperature=0", "qad.weights (logit KD): method kd: temperature=0, expected a number > 0"),
    ("qad.weights.pea=x", "method transkd-base: weight pea='x', expected a number >= 0"),
    ("qad.weights.ce_resolution=quarter", "qad.weights.ce_resolution: set it as distill.ce_resolution"),
])
def test_bad_qad_weights_are_refused_before_any_work(made_run, item, message):
    from pipeline import preflight

    cfg = config_mod.load(None, [*TINY, item])
    with pytest.raises(ConfigError) as e:
        preflight.check(cfg, ["qad"], argparse.Namespace(checkpoint=None), made_run)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), e.value


def test_qad_weights_go_over_the_distill_weights_key_by_key():
    cfg = config_mod.load(None, ["distill.weights.hcl=2", "distill.weights.pea=3", "qad.weights.pea=0.5",
                                 "qad.weights.temperature=2"])
    assert cfg.qad.weights == {"kd": 1.0, "pea": 0.5, "temperature": 2}
    assert config_mod.qad_options(cfg) == {"hcl": 2, "pea": 0.5, "kd": 1.0, "temperature": 2, "ce_resolution": "label"}


# ------------------------------------------------------------------------------------------------ the CLI
def test_distill_then_qad_writes_a_qad_state_that_load_model_opens(synthetic, tmp_path):
    from pipeline.artifacts import read_sidecar
    from pipeline.models import load_model

    run = tmp_path / "run"
    args = _args(synthetic, "train.steps=2", "qad.steps=2")
    code, out, err = run_cli("distill", "qad", "--run-dir", str(run), *args, cwd=tmp_path, timeout=300)
    assert code == 0, err[-3000:]
    meta = read_sidecar(run / "student.qad.safetensors", verify=True)
    assert meta.kind == "checkpoint-qad" and meta.precision == "int8"
    assert meta.source_sha256 == sha256_file(run / "student.safetensors")  # made from the run's student
    q = meta.details["quantization"]
    assert q["learn_ranges"] is True and q["calibration"]["frames"] == 2 and q["method"]["weights"]["kd"] == 1.0
    # the method's train-only modules went on from where distillation left them
    assert q["modules_from"] == str(run / "checkpoints" / "student" / "step-0000002.safetensors")
    model = load_model(run / "student.qad.safetensors")
    assert quant.is_quantized(model) and quant.range_state(model) == pytest.approx(q["ranges"])
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 96)).shape == (1, 19, 16, 24)
    assert read_sidecar(run / "student.qad.last.safetensors").details["training"]["step"] == 2
    summary = json.loads((run / "summary.json").read_text())["qad"]
    assert summary["role"] == "qad" and summary["steps"] == 2 and summary["amp"]["dtype"] == "fp32"
    assert 0 <= summary["start_val_miou"] <= summary["best_val_miou"] <= 1
    assert "student.qad.safetensors" in out and "(PTQ, step 0) -> best" in out
    config = config_mod.load(run / "config.yaml")
    assert config.qad.steps == 2 and config.qad.weights == {"kd": 1.0}  # every qad key in the resolved config
    # a changed qad key refuses to resume that training, before any work, and the run's own config stays
    code, _, err = run_cli("qad", "--run-dir", str(run), *args, "qad.lr=1e-3", cwd=tmp_path, timeout=300)
    assert code == 2 and err.count("\n") == 1 and "qad.lr" in err, err[-3000:]
    assert "lr: 0.001" not in (run / "config.yaml").read_text()
