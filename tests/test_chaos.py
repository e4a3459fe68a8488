"""Chaos: a tiny `distill export` killed with SIGKILL at seeded random moments, and a re-export stopped by SIGTERM or
Ctrl-C while the INT8 quantizer (Model Optimizer, in a child process) runs. After each: no process of the run is
left, no final artifact name without the sidecar that describes it, nothing new in the temp dir (the runs' TMPDIR);
the rerun in the same run directory completes, its artifacts load and give again the parity their sidecars record,
and no staging or temporary file remains anywhere in the run directory.

A full run takes about 25 s on the 2-core CPU (training 5 s, export 20 s, INT8 11 s of it), so ten complete reruns
do not fit in 3 minutes: the ten kills form two chains of five, run side by side (one per core), each in a run
directory of its own. Every run of a chain is the rerun of the kill before it (it must remove what that kill left,
checked at the next kill), and after the fifth kill the rerun runs to completion and is checked in full: 10 kills,
2 complete reruns. `pytest -s tests/test_chaos.py` prints the count per outcome."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline import artifacts
from pipeline.export import KINDS, STAGING
from pipeline.io import sha256_file
from tests.conftest import ROOT, spread_student

pytest.importorskip("modelopt.onnx.quantization")  # the quantizer child is Model Optimizer's

SIZE = (64, 96)
DATA = (8, 2, SIZE)  # train, val, size of the synthetic set, made once by conftest's `synthetic`
TINY = ["data.synthetic_train=8", "data.synthetic_val=2", "data.synthetic_size=64x96", "data.size=64x96",
        "teacher.variant=mit_b0", "student.variant=mit_b0", "train.steps=2", "train.batch_size=2",
        "train.warmup_steps=0", "train.eval_every=100", "train.ckpt_every=1",
        "export.fp16=true", "export.int8=true", "export.int8_backend=modelopt",
        "export.calibration_frames=2", "export.parity_frames=1", "export.eval_frames=1"]
SEED, KILLS, CHAINS = 12, 10, 2
# The phases of a run as its log marks their start, with their length here (2-core CPU, nothing else running). A kill
# moment is a phase drawn at random and a delay drawn uniformly over its length: the moments cover the run on a
# slower or busier machine too, where wall-clock moments would all fall in the first phases.
PHASES = (("", 7.0),  # start-up, data, teacher and student training (4 s once trained)
          ("export: tracing", 2.7),  # ONNX export and parity
          ("export: parity on", 4.4),  # FP16 conversion
          ("export: INT8 calibration", 11.0),  # INT8 quantization, Model Optimizer in its child
          ("export: scoring", 0.8))  # scoring, publishing, export.json
FINALS = [artifacts.run_file(kind) for kind in KINDS.values() if kind != "onnx-int8-qad"]  # no qad stage here
TAG = "TRANSKD_CHAOS_TAG"  # in the environment of the run, inherited by every process it starts


# ------------------------------------------------------------------------------------------------ processes
class Run:
    """`python -m pipeline.run ARGS --run-dir RUN_DIR` in the background, its environment tagged, its temp dir
    `tmpdir`, its output in a file beside that."""

    def __init__(self, args: list[str], run_dir: Path, tmpdir: Path, tag: str) -> None:
        log = run_dir / "run.log"
        self.log_from = log.stat().st_size if log.is_file() else 0  # earlier runs' lines stay in the file
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir), TAG: tag}
        self.out = (tmpdir.parent / f"out-{uuid.uuid4().hex[:8]}.txt").open("w")
        self.log, self.tag = log, tag
        # SIGINT as a terminal delivers it: a shell starts background jobs with SIGINT ignored, which a child inherits
        # (and Python then installs no KeyboardInterrupt handler), so pytest run in the background would not test it
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.run", *args, "--run-dir", str(run_dir)],
                                     cwd=tmpdir.parent, env=env, stdout=self.out, stderr=subprocess.STDOUT,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def logged(self) -> str:
        """What this run wrote to run.log so far."""
        return self.log.read_bytes()[self.log_from:].decode(errors="replace") if self.log.is_file() else ""

    def kill_at(self, marker: str, delay: float) -> list[str]:
        """SIGKILL `delay` seconds after the run logs `marker`; returns where it was (phase, and whether the quantizer
        child was running), nothing when it finished first."""
        while marker not in self.logged():
            if self.proc.poll() is not None:
                return []
            time.sleep(0.02)
        try:
            self.proc.wait(timeout=delay)
            return []
        except subprocess.TimeoutExpired:
            where = [f"killed during {phase(self.logged())}"] + ["quantizer running at the kill"] * bool(
                quantizer(self.tag))
            self.proc.kill()
            self.proc.wait()
            return where

    def output(self) -> str:
        self.out.close()
        return Path(self.out.name).read_text()


def tagged(tag: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process with `tag` in its environment, by a scan of /proc (a zombie has no
    environment left and is dead anyway)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"{TAG}={tag}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            found.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except OSError:
            continue
    return found


def survivors(tag: str, grace: float = 3.0) -> list[tuple[int, str]]:
    """The processes of the run still alive `grace` seconds after it was killed (the kernel needs a moment to deliver
    the parent-death signal and to tear a process down)."""
    deadline = time.monotonic() + grace
    while (left := tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def kill_all(tag: str) -> None:
    for pid, _ in tagged(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def quantizer(tag: str) -> list[int]:
    """The Model Optimizer child (precision._MODELOPT_CHILD) of the run."""
    return [pid for pid, cmd in tagged(tag) if "from modelopt.onnx.quantization import quantize" in cmd]


# ------------------------------------------------------------------------------------------------ files
def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.is_dir() else set()


def hidden(run_dir: Path) -> list[str]:
    """Staging and temporary files anywhere in the run directory: hidden names, `.tmp` names."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                  if any(part.startswith(".") or ".tmp" in part for part in p.relative_to(run_dir).parts))


def check_finals(run_dir: Path) -> None:
    """No final artifact name without the sidecar that describes it; a publish cut between the two renames leaves
    the sidecar complete under its staging name (artifacts.publish writes it first), which the next export
    finishes."""
    for name in FINALS:
        final = run_dir / name
        if not final.exists():
            continue
        try:
            artifacts.read_sidecar(final, verify=True)
        except Exception as e:
            pending = list(run_dir.glob(f".{name}.json.tmp*"))
            sha = json.loads(pending[0].read_text()).get("sha256") if pending else None
            assert sha == sha256_file(final), f"{final} without the sidecar that describes it ({e})"


def phase(logged: str) -> str:
    """Where a run was when it was killed, from what it had logged."""
    if "export: tracing" not in logged:
        return "training"  # or starting up
    if "export: parity on" in logged and "export: scoring" not in logged:
        return "conversion"  # FP16, INT8
    return "export"  # tracing and parity, scoring and publishing


# ------------------------------------------------------------------------------------------------ checks
def check_published(run_dir: Path, data_root: Path) -> None:
    """The run's final artifacts open in a Segmenter, their sidecars verify, and comparing each with the PyTorch
    student again gives the parity its sidecar records."""
    from pipeline.config import ExportConfig
    from pipeline.data import build_dataset
    from pipeline.export import DeployModel, check_parity, compare, graph_inputs, output_names
    from pipeline.infer import OrtBackend, Segmenter, TorchBackend
    from pipeline.models import load_model

    model = load_model(run_dir / "student.safetensors")
    e = ExportConfig(size=SIZE, parity_frames=1)
    reference = TorchBackend(DeployModel(model, e, fold=False), "cpu", outputs=output_names(e))
    val = build_dataset("synthetic", data_root, "val")
    report = json.loads((run_dir / "export.json").read_text())
    for name in FINALS:
        Segmenter.open(run_dir / name, provider="cpu")
        side = artifacts.read_sidecar(run_dir / name, verify=True)
        recorded = side.measured["parity"]
        again = compare(reference, OrtBackend(run_dir / name, "cpu"), graph_inputs(val, 1, e, side.normalization))
        assert again["argmax_agreement"] == recorded["argmax_agreement"], name
        assert again["max_abs_logit_diff"] == pytest.approx(recorded["max_abs_logit_diff"], rel=1e-3, abs=1e-6), name
        assert side.sha256 in {a["sha256"] for a in report["artifacts"].values()}, name
    check_parity(artifacts.read_sidecar(run_dir / FINALS[0]).measured["parity"], run_dir / FINALS[0])


@pytest.fixture(scope="module")
def clean_tmp(tmp_path_factory) -> Path:
    """A temp dir holding what every process keeps there, as /tmp does: ONNX Runtime's `.ses` (an id written at
    import) and torch's `torchinductor_<user>` cache folder (made by the first optimizer)."""
    tmpdir = tmp_path_factory.mktemp("clean-tmp")
    code = "import onnxruntime, torch; torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "TMPDIR": str(tmpdir)}, check=True)
    return tmpdir


class Sandbox:
    """Where the runs of one test or chain live: `tmpdir`, their TMPDIR, a copy of `clean_tmp`; `tag`, which finds
    their processes (and no one else's)."""

    def __init__(self, folder: Path, clean_tmp: Path) -> None:
        self.folder, self.tag = folder, uuid.uuid4().hex
        self.tmpdir = folder / f"tmpdir-{self.tag[:8]}"
        shutil.copytree(clean_tmp, self.tmpdir)
        self.clean = files(self.tmpdir)

    def run(self, args: list[str], run_dir: Path) -> Run:
        return Run(args, run_dir, self.tmpdir, self.tag)

    def check_after(self, what: str) -> None:
        """No process of the runs left, nothing left in their temp dir."""
        assert survivors(self.tag) == [], f"{what}: processes outlived the run"
        assert files(self.tmpdir) == self.clean, f"{what}: left in the temp dir"


def chain(box: Sandbox, run_dir: Path, moments: list[tuple[str, float]], args: list[str], data: Path) -> Counter:
    """A run killed at each of `moments` ((log marker, seconds after it)), each the rerun of the one before in the
    same run directory; then the rerun to completion."""
    counts: Counter = Counter()
    for k, (marker, delay) in enumerate(moments, 1):
        run = box.run(args, run_dir)
        where = run.kill_at(marker, delay)
        if not where:
            assert run.proc.returncode == 0, run.output()
        counts.update(where or ["finished before its kill"])
        box.check_after(f"{run_dir.name}, kill {k} {delay:.1f} s after {marker or 'the start'!r}")
        check_finals(run_dir)
        stale = sorted((run_dir / STAGING).glob("export-*"))
        assert len(stale) <= 1, f"kill {k}: the staging of earlier runs was not removed: {stale}"
    rerun = box.run(args, run_dir)
    assert rerun.proc.wait(timeout=300) == 0, rerun.output()
    box.check_after(f"{run_dir.name}, rerun")
    assert hidden(run_dir) == [], "staging or temporary files remain after the rerun"
    check_published(run_dir, data)
    counts["rerun ok"] += 1
    return counts


def test_sigkill_at_random_moments_leaves_nothing_half_written_or_orphaned(tmp_path, synthetic, clean_tmp, capsys):
    """Two chains of five kills, side by side (one per core), each in a run directory of its own."""
    data = synthetic(*DATA)
    args = ["distill", "export", *TINY, f"data.root={data}"]
    rng = random.Random(SEED)
    moments = [(marker, rng.uniform(0.0, length)) for marker, length in rng.choices(PHASES, k=KILLS)]
    order = [marker for marker, _ in PHASES]
    # each chain takes its moments in the order of the phases, so a kill in training finds training left to do
    chains = [sorted(moments[i::CHAINS], key=lambda m: order.index(m[0])) for i in range(CHAINS)]
    boxes = [Sandbox(tmp_path, clean_tmp) for _ in range(CHAINS)]
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(CHAINS) as pool:
            jobs = [pool.submit(chain, box, tmp_path / f"run-{i}", chains[i], args, data)
                    for i, box in enumerate(boxes)]
            counts = sum((job.result() for job in jobs), Counter())
    finally:
        for box in boxes:
            kill_all(box.tag)  # what an old version left running
    with capsys.disabled():
        print(f"\nchaos, seed {SEED}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
              + f"; {time.monotonic() - started:.0f} s")
    assert counts["quantizer running at the kill"] >= 1  # the moments include the case that orphaned it


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synthetic, clean_tmp) -> tuple[Path, list[str]]:
    """A run directory with a finished export (FP32 and INT8) of a saved student, and the command that made it."""
    from pipeline.models import save_model

    folder = tmp_path_factory.mktemp("exported")
    ckpt = save_model(spread_student(), folder / "mine.safetensors")
    args = ["export", "--checkpoint", str(ckpt), *TINY, "export.fp16=false", f"data.root={synthetic(*DATA)}"]
    run = Sandbox(folder, clean_tmp).run(args, folder / "run")
    assert run.proc.wait(timeout=300) == 0, run.output()
    return folder / "run", args


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_terminated_reexport_takes_the_quantizer_down_and_keeps_the_last_export(tmp_path, exported, clean_tmp,
                                                                                 sig, code):
    """The pipeline signalled while Model Optimizer quantizes in its child: the child goes with it (SIGTERM left it
    running), and the run directory keeps the export it had, each artifact with its sidecar (an interrupted
    export removed the student.onnx it had already overwritten, leaving its sidecar behind); Ctrl-C also removes
    the staging folder on the way out."""
    run_dir = tmp_path / "run"
    shutil.copytree(exported[0], run_dir)
    before = {name: sha256_file(run_dir / name) for name in sorted(files(run_dir)) if name.startswith("student.")}
    box = Sandbox(tmp_path, clean_tmp)
    run = box.run(exported[1], run_dir)
    try:
        deadline = time.monotonic() + 240
        while not quantizer(box.tag):
            assert run.proc.poll() is None and time.monotonic() < deadline, run.output()
            time.sleep(0.05)
        time.sleep(0.5)  # into the child's work
        run.proc.send_signal(sig)
        assert run.proc.wait(timeout=60) == code, run.output()
        box.check_after(signal.Signals(sig).name)
    finally:
        kill_all(box.tag)
    assert {name: sha256_file(run_dir / name) for name in before if (run_dir / name).is_file()} == before
    check_finals(run_dir)
    if sig == signal.SIGINT:
        assert hidden(run_dir) == [] and "interrupted" in run.output()
