"""Shared fixtures: deterministic torch, synthetic data sets on disk, a tiny student with a spread of classes, and a
runner for the command-line entry points in a child process."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a - b).abs().max().item()


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Callable[..., Path]:
    """`synthetic(train, val, size, seed)` -> the folder of a generated street-scene set, made once per session for
    each set of arguments."""
    from pipeline.data import ensure_synthetic

    made: dict[tuple, Path] = {}

    def make(train: int = 4, val: int = 4, size: tuple[int, int] = (96, 192), seed: int = 0) -> Path:
        key = (train, val, tuple(size), seed)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"synthetic-{train}-{val}-{size[0]}x{size[1]}-{seed}")
            made[key] = ensure_synthetic(folder / "synthetic", train, val, tuple(size), seed, progress=False)
        return made[key]

    return make


def splits(root: Path):
    """The (train, val) datasets of a synthetic folder."""
    from pipeline.data import build_dataset

    return build_dataset("synthetic", root, "train"), build_dataset("synthetic", root, "val")


def spread_student(seed: int = 0, num_classes: int = 19, variant: str = "mit_b0"):
    """A random student whose classifier is scaled up, so its argmax varies across the image and many classes
    occur (a random head predicts one constant class)."""
    from pipeline.models import build_model

    torch.manual_seed(seed)
    model = build_model(variant, num_classes=num_classes).eval()
    with torch.no_grad():
        model.head.classifier.weight.mul_(300.0)
    return model


def export_tiny(folder: Path, val, train, size: tuple[int, int] = (64, 128), model=None, **export) -> Path:
    """A student (default: spread_student()) exported the quick way into `folder`, FP32 ONNX only, parity and
    accuracy on 2 frames; `export` sets more ExportConfig fields. Returns its student.onnx."""
    from pipeline.config import ExportConfig
    from pipeline.export import export_student

    e = ExportConfig(size=size, fp16=False, int8=False, parity_frames=2, eval_frames=2, **export)
    export_student(spread_student() if model is None else model, folder, e, val, train)
    return Path(folder) / "student.onnx"


@pytest.fixture(scope="module")
def student():
    return spread_student()


@pytest.fixture(scope="session")
def fitted_student(synthetic):
    """(a MiT-B0 fitted for 20 AdamW steps to the 8 training frames of a 64x128 synthetic set, that set's folder):
    a trained network's logit scale and margins, which quantization-parity checks need (a random network's argmax
    flips with every rounding step)."""
    from pipeline.data import TrainTransform, build_dataset
    from pipeline.models import build_model

    root = synthetic(8, 6, (64, 128))
    train = build_dataset("synthetic", root, "train", TrainTransform(size=(64, 128), flip=False, jitter=False))
    torch.manual_seed(0)
    model = build_model("mit_b0", num_classes=19)
    x = torch.stack([train[i]["image"] for i in range(len(train))])
    y = torch.stack([train[i]["label"] for i in range(len(train))])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(20):
        logits = torch.nn.functional.interpolate(model(x), size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), root


def run_cli(*args: str, cwd: Path | str = ROOT, module: str | None = "pipeline.run", timeout: float = 600,
            env: dict | None = None) -> tuple[int, str, str]:
    """A command line in a child process (`python -m module args`, or `python args` when module is None), with the
    repository importable and one thread per library; returns (exit code, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, *(["-m", module] if module else []), *args]
    p = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def start_cli(*args: str, cwd: Path | str = ROOT, module: str = "pipeline.run", **kw) -> subprocess.Popen:
    """Like run_cli, without waiting: for tests that signal or kill the process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on, for a test's own gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker_start(rank: int, world: int, port: int, cfg, run_dir: str):
    """A process mp.spawn started, set up as torchrun starts one (its rendezvous variables, one thread), joined to the
    run's process group; returns (env, train, val) of `cfg` in `run_dir`."""
    from pipeline.stages import datasets
    from pipeline.train import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return (env, *datasets(cfg, Path(run_dir), env))


def ddp_worker_finish(trainer, model, env, out: str) -> None:
    """Train, then the main process saves `model`'s parameters to `out`; a group of several processes is closed."""
    trainer.fit()
    if env.main:
        torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, out)
    if env.world > 1:
        torch.distributed.destroy_process_group()


def ddp_and_one_process(worker: Callable, root: str, tmp_path: Path) -> tuple[dict, dict]:
    """The parameters `worker(rank, world, port, root, run_dir, accumulate, out)` saves after training in two gloo
    processes with accumulate 1, and in one process with accumulate 2: the same global batch."""
    import torch.multiprocessing as mp

    ddp, single = tmp_path / "ddp.pt", tmp_path / "single.pt"
    mp.spawn(worker, args=(2, free_port(), root, str(tmp_path / "ddp"), 1, str(ddp)), nprocs=2)
    mp.spawn(worker, args=(1, free_port(), root, str(tmp_path / "one"), 2, str(single)), nprocs=1)
    return torch.load(ddp), torch.load(single)


def kill_at_step(proc: subprocess.Popen, pointer: Path, step: int, timeout: float = 240) -> int:
    """SIGKILL a training run (start_cli) once its checkpoint pointer `pointer` (checkpoints/<role>/last.json) says
    `step` or later; returns the step it had reached. Fails when the run ends or errs first."""
    import json
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= step:
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return json.loads(pointer.read_text())["step"]


def imported_modules(path: Path) -> set[str]:
    """Every module a Python file imports, by its dotted name (relative imports as their module part)."""
    names = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names
