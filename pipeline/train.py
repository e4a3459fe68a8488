"""One Trainer for a teacher, a student alone, distillation or quantization-aware distillation (QAD): AMP, torchrun
DDP, atomic checkpoints, exact resume."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler, Subset
from tqdm import tqdm

from pipeline import amp
from pipeline.artifacts import run_file
from pipeline.config import Config, keys
from pipeline.distill.methods import DistillMethod
from pipeline.errors import CheckpointError, ConfigError, PipelineError
from pipeline.evaluate import evaluate
from pipeline.io import load_state, progress_interval, reason, save_state, write_json
from pipeline.models import save_model
from pipeline.models.segformer import SegFormer

log = logging.getLogger("pipeline")
QAD = "qad"  # the role that fine-tunes the fake-quantized student (pipeline/quant.py) against the teacher
# keys that may change between a run and its resumption: they do not change what is computed
RESUMABLE_KEYS = ("train.log_every", "train.eval_every", "qad.eval_every", "train.ckpt_every",
                  "train.keep_checkpoints", "train.resume", "data.workers", "data.root")


class TrainingError(PipelineError):
    """Training cannot go on (a non-finite loss, a run directory that belongs to another config)."""


@dataclass
class DistEnv:
    """Where this process sits: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK, a plain run is rank 0 of 1."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


@dataclass(frozen=True)
class DistPlan:
    """How this process joins the run: the device it works on, and the process-group backend (None for a single
    process) with the keywords of init_process_group."""

    device: torch.device
    backend: str | None
    init_kwargs: dict


def dist_plan(world: int, local_rank: int, use_cuda: bool, cuda_devices: int = 0) -> DistPlan:
    """The plan for rank `local_rank` on its machine: gloo on the CPU; on CUDA, NCCL bound to the process's GPU.

    `device_id` binds the process group to that GPU, so NCCL forms its communicator there at once instead of
    guessing the device at the first collective (PyTorch docs, torch.distributed.init_process_group, device_id;
    available since PyTorch 2.3)."""
    if not use_cuda:
        return DistPlan(torch.device("cpu"), "gloo" if world > 1 else None, {})
    if not 0 <= local_rank < cuda_devices:
        raise ConfigError(f"LOCAL_RANK={local_rank}: this machine shows {cuda_devices} CUDA device(s); start at most "
                          f"{cuda_devices} processes per machine (torchrun --nproc-per-node)")
    device = torch.device("cuda", local_rank)
    return DistPlan(device, "nccl" if world > 1 else None, {"device_id": device} if world > 1 else {})


def init_distributed(device: str = "auto") -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda: no CUDA device is available")
    plan = dist_plan(world, int(os.environ.get("LOCAL_RANK", "0")), use_cuda,
                     torch.cuda.device_count() if use_cuda else 0)
    if plan.device.type == "cuda":
        torch.cuda.set_device(plan.device)  # first: NCCL and every later CUDA call of this process use this GPU
    if plan.backend and not dist.is_initialized():
        dist.init_process_group(plan.backend, **plan.init_kwargs)
    rank = dist.get_rank() if world > 1 else 0
    return DistEnv(rank, world, plan.device)


def derived_seed(*parts) -> int:
    """A 63-bit seed from any parts: the same (seed, role, step, shard) gives the same randomness in any process."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), NumPy and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class StepSampler(Sampler):
    """Micro-batches of (index, augmentation seed) for one process, from step `start` on, as a pure function of
    (seed, step): the data position is the step, so a resumed run reads exactly what the killed one would have.

    Each optimizer step draws a global batch of batch * accumulate * world samples from a per-epoch
    permutation; shard r * accumulate + m of it is micro-batch m of rank r. One process with accumulate=k and
    k processes with accumulate=1 therefore see the same samples in the same groups.
    """

    def __init__(self, n: int, batch: int, accumulate: int, env: DistEnv, seed: int, start: int, steps: int):
        self.n, self.batch, self.acc, self.env, self.seed = n, batch, accumulate, env, seed
        self.start, self.steps = start, steps
        self.global_batch = batch * accumulate * env.world
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                derived_seed(self.seed, "epoch", epoch)))}
        return self._perms[epoch]

    def __len__(self) -> int:
        return (self.steps - self.start) * self.acc

    def __iter__(self):
        for step in range(self.start, self.steps):
            for m in range(self.acc):
                shard = self.env.rank * self.acc + m
                first = step * self.global_batch + shard * self.batch
                items = []
                for p in range(first, first + self.batch):
                    epoch, offset = divmod(p, self.n)
                    items.append((int(self._perm(epoch)[offset]), derived_seed(self.seed, "aug", p)))
                yield items


class _Objective(nn.Module):
    """Student + train-only modules as one module, so DDP sees every trainable parameter in one forward."""

    def __init__(self, student: SegFormer, method: DistillMethod) -> None:
        super().__init__()
        self.student = student
        self.modules_ = method.modules
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor, teacher_taps) -> dict[str, torch.Tensor]:
        return self.method.loss(self.student.features(x), teacher_taps, y)


def resumed_precision(state: dict, setting: str, device: torch.device, current: amp.Choice) -> amp.Choice:
    """The precision a resumed run continues in: the one its state records (a state written before the choice was
    recorded: the one the trainer of that time took, read from the state), so that a resumption on a machine where
    `train.amp` would resolve otherwise computes what the run started with. TrainingError where this device cannot."""
    record = state.get("amp")
    way_out = "train.resume=never starts it over, or use a new --run-dir"
    if record is not None:
        if not isinstance(record, dict) or record.get("dtype") not in amp.NAMES.values():
            raise TrainingError(f"the state's amp record {record!r} names no precision (expected a dtype of "
                                f"{', '.join(amp.NAMES.values())}); {way_out}")
        name, started = record["dtype"], f"{record['dtype']} ({record.get('reason', 'recorded')})"
    else:  # that trainer: autocast on CUDA only; auto took bf16 unless a GradScaler was running
        on_cuda = "cuda" in state.get("rng", {})
        scaled = bool(state.get("scaler"))
        name = "fp32" if not on_cuda or setting == "off" else "fp16" if scaled else "bf16"
        started = f"{name} (a state from before the choice was recorded)"
    if name == current.name:
        return current
    dtype = {v: k for k, v in amp.NAMES.items()}[name]
    if name == "fp16" and device.type != "cuda":
        raise TrainingError(f"the run started in {started} with a GradScaler; fp16 autocast runs on CUDA only, so it "
                            f"cannot continue on {device}: resume it on a CUDA device; {way_out}")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError(f"the run started in {started}; {device} cannot run bf16: resume it on a device that can; "
                            f"{way_out}")
    log.warning("train.amp=%s would take %s here (%s); the run started in %s and continues in it", setting,
                current.name, current.reason, started)
    return amp.Choice(dtype, f"resumed: the run started in {started}")


def place(modules: list[nn.Module | None], device: torch.device, channels_last: bool) -> None:
    """Move the modules a step runs (student, train-only modules, teacher) to the device, channels-last on CUDA."""
    present = [m for m in modules if m is not None]
    for m in present:
        m.to(device)
    if device.type == "cuda" and channels_last:
        for m in present:
            m.to(memory_format=torch.channels_last)


def rng_state(cuda: bool) -> dict:
    """Every generator training draws from, in the checkpoint's layout (NumPy's keys as a plain list)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [np_state[1].tolist(), *np_state[2:]],
            "python": random.getstate(), **({"cuda": torch.cuda.get_rng_state()} if cuda else {})}


def set_rng_state(rng: dict, cuda: bool) -> None:
    torch.set_rng_state(rng["torch"])
    mt_keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state(("MT19937", np.asarray(mt_keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(rng["python"])
    if "cuda" in rng and cuda:
        torch.cuda.set_rng_state(rng["cuda"])


def role_config(cfg: Config, role: str) -> Config:
    """The config `role` trains with. QAD takes its steps, lr and warm-up from the qad section and runs in float32:
    fake quantization rounds each tensor to a grid of 255 steps, which a bf16 (8-bit mantissa) or fp16 autocast would
    round again, so the model trained would not be the one exported. Every other role trains with `cfg` itself."""
    if role != QAD:
        return cfg
    q = cfg.qad
    return replace(cfg, train=replace(cfg.train, steps=q.steps, lr=q.lr, warmup_steps=q.warmup_steps, amp="off",
                                      eval_every=q.eval_every))


def model_files(role: str) -> tuple[str, str]:
    """The run directory's files of the model `role` trains: (best on validation, final step)."""
    best = run_file("checkpoint-qad") if role == QAD else run_file("checkpoint", role)
    return best, best.removesuffix(".safetensors") + ".last.safetensors"


def config_view(cfg: Config, role: str) -> dict:
    """The config keys that decide what a role's training computes (RESUMABLE_KEYS left out), as JSON values."""
    view = {k: v for k, v in keys(cfg).items() if k.split(".")[0] in ("data", "train", "distill", "seed", role)}
    return json.loads(json.dumps({k: v for k, v in view.items() if k not in RESUMABLE_KEYS}, default=list))


class Checkpointer:
    """The training states of one role in `run_dir/checkpoints/<role>`: `step-NNNNNNN.safetensors` + `.json` through
    pipeline.io.save_state, `last.json` naming the newest, only the newest `keep` kept. Each state records
    `config_view`; a state is resumed only under the same values."""

    def __init__(self, run_dir: Path, role: str, keep: int, config: dict) -> None:
        self.run_dir, self.role, self.keep, self.config = run_dir, role, keep, config
        self.folder = run_dir / "checkpoints" / role
        self.last: Path | None = None  # the stem of the newest state written or resumed

    def save(self, step: int, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = self.folder / f"step-{step:07d}"
        save_state(stem, {**state, "config": self.config})
        write_json(self.folder / "last.json", {"checkpoint": stem.name, "step": step})
        self.last = stem
        # states of later steps belong to a run this one replaced (train.resume=never): never keep them over this one
        older = [p for p in sorted(self.folder.glob("step-*.json")) if p.stem <= stem.name]
        for old in sorted(set(self.folder.glob("step-*.json")) - set(older[-self.keep:])):
            old.with_suffix(".safetensors").unlink(missing_ok=True)
            old.unlink(missing_ok=True)

    def remove_partial(self) -> None:
        """What a write killed midway left in the folder: every hidden file there is a temporary one (io.atomic_path's
        `.<name>.tmp<pid>`, and safetensors' own `.tmpXXXXXX` beside it), never a state."""
        for partial in self.folder.glob(".*") if self.folder.is_dir() else []:
            partial.unlink(missing_ok=True)

    def _unresumable(self, problem: str) -> TrainingError:
        return TrainingError(f"{problem}; the {self.role} training cannot resume from it: train.resume=never starts "
                             "it over in this run directory, or use a new --run-dir")

    def load_last(self) -> dict | None:
        """The newest state, None when there is none; a state of another config is refused, and so is a broken one
        (the pointer, the state's files or its sha256), naming the file and the ways out."""
        pointer = self.folder / "last.json"
        if not pointer.is_file():
            return None
        try:
            name = json.loads(pointer.read_text())["checkpoint"]
            if not isinstance(name, str) or not re.fullmatch(r"step-\d+", name):
                raise ValueError(f"'checkpoint' is {name!r}, expected a step-NNNNNNN name")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise self._unresumable(f"{pointer}: not a pointer to a training state ({reason(e)})") from None
        stem = self.folder / name
        try:
            state = load_state(stem)
        except CheckpointError as e:
            raise self._unresumable(str(e)) from None
        saved = state.get("config") if isinstance(state, dict) else None
        if not isinstance(saved, dict):
            raise self._unresumable(f"{stem}.json: no config recorded in the training state")
        diff = sorted(k for k in set(saved) | set(self.config) if saved.get(k) != self.config.get(k))
        if diff:
            raise TrainingError(
                f"{self.run_dir}: holds a {self.role} run with another config ({', '.join(diff)} differ); "
                "use another --run-dir, or train.resume=never to start over"
            )
        self.last = stem
        return state


class MetricsLog:
    """What training shows, from the main process only: the progress bar with the loss terms every step;
    TensorBoard scalars and a debug log line every `every` steps and at the last; the validation scores."""

    def __init__(self, role: str, run_dir: Path, steps: int, start: int, every: int, main: bool) -> None:
        self.role, self.steps, self.every, self.main = role, steps, every, main
        self.writer = None
        if main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard" / role))
        self.bar = tqdm(total=steps, initial=start, desc=role, disable=not main, dynamic_ncols=True,
                        mininterval=progress_interval())

    def step(self, done: int, terms: dict[str, float], lr: float, rate: float) -> None:
        if not self.main:
            return
        self.bar.update(1)
        self.bar.set_postfix({**{k: f"{v:.3f}" for k, v in terms.items()}, "lr": f"{lr:.2e}", "img/s": f"{rate:.1f}"},
                             refresh=False)
        if done % self.every == 0 or done == self.steps:
            for k, v in terms.items():
                self.writer.add_scalar(f"loss/{k}", v, done)
            self.writer.add_scalar("lr", lr, done)
            self.writer.add_scalar("images_per_s", rate, done)
            log.debug("%s step %d: %s", self.role, done, json.dumps({k: round(v, 5) for k, v in terms.items()}))

    def validation(self, step: int, miou: float, pixel_acc: float) -> None:
        log.info("%s step %d: val mIoU %.2f %%, pixel accuracy %.2f %%", self.role, step, 100 * miou, 100 * pixel_acc)
        self.writer.add_scalar("val/miou", miou, step)

    def close(self) -> None:
        self.bar.close()  # ends the bar's line, so an error message starts on its own
        if self.writer:
            self.writer.close()


class Trainer:
    """Trains `student` (the model being trained in this stage: a teacher, a student, or for role "qad" the
    fake-quantized student, saved with quant.save_qad and `record`, its keywords) with `method`."""

    def __init__(self, role: str, cfg: Config, run_dir: Path, student: SegFormer, method: DistillMethod,
                 train_set, val_set, env: DistEnv, record: dict | None = None) -> None:
        cfg = role_config(cfg, role)
        self.role, self.cfg, self.run_dir, self.env, self.record = role, cfg, run_dir, env, record or {}
        self.t = t = cfg.train
        self.steps = getattr(cfg, role).steps or t.steps
        self.global_batch = t.batch_size * t.accumulate * env.world
        self.student, self.method = student, method
        place([student, method.modules, method.teacher], env.device, t.channels_last)
        self.precision = amp.choose(t.amp, env.device)  # resume() may replace it by the one the run started with
        self.objective: nn.Module = _Objective(student, method)
        if env.world > 1:
            # CSF keeps two squeeze convs and uses one per batch size; zero-weight terms leave modules idle
            self.objective = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                find_unused_parameters=len(method.modules) > 0)
        params = [p for p in self.objective.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_factor)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.precision.scaler)
        self.train_set, self.val_set = train_set, val_set
        self.ckpt = Checkpointer(run_dir, role, t.keep_checkpoints, config_view(cfg, role))
        self.metrics: MetricsLog | None = None  # opened by fit
        self.start, self.best = 0, -1.0
        self.start_miou: float | None = None  # QAD: the calibrated (PTQ) student's score, before any step

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then poly decay from lr to lr * final_lr_ratio over the remaining steps."""
        t = self.t
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        span = max(self.steps - t.warmup_steps, 1)
        progress = min((step - t.warmup_steps) / span, 1.0)
        return t.final_lr_ratio + (1 - t.final_lr_ratio) * (1 - progress) ** t.power

    # ---------------------------------------------------------------------------------------- training state

    def state(self, step: int) -> dict:
        """The training state after `step` in the checkpoint layout (the Checkpointer adds the config)."""
        return {
            "step": step, "best_miou": self.best,
            "model": self.student.state_dict(), "modules": self.method.modules.state_dict(),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(), "amp": self.precision.record(self.t.amp, self.env.device),
            "rng": rng_state(self.env.device.type == "cuda"),
            "data": {"position": step * self.global_batch, "samples": len(self.train_set)},
            **({"start_miou": self.start_miou} if self.role == QAD else {}),
        }

    def resume(self) -> None:
        """Continue from the run directory's newest state, unless train.resume=never."""
        if self.env.main:
            self.ckpt.remove_partial()
        state = None if self.t.resume == "never" else self.ckpt.load_last()
        if state is None:
            return
        self.student.load_state_dict(state["model"])
        self.method.modules.load_state_dict(state["modules"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        try:
            precision = resumed_precision(state, self.t.amp, self.env.device, self.precision)
        except TrainingError as e:
            raise TrainingError(f"{self.ckpt.last}.json: {e}") from None
        if precision.dtype != self.precision.dtype:
            self.precision = precision
            self.scaler = torch.amp.GradScaler(self.env.device.type, enabled=precision.scaler)
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], self.env.device.type == "cuda")
        self.start, self.best = state["step"], state["best_miou"]
        self.start_miou = state.get("start_miou")
        log.info("%s: resumed from %s (step %d of %d)", self.role, self.ckpt.last, self.start, self.steps)

    # ------------------------------------------------------------------------------------------ one step

    def _loader(self) -> DataLoader:
        sampler = StepSampler(len(self.train_set), self.t.batch_size, self.t.accumulate, self.env,
                              self.cfg.seed, self.start, self.steps)
        return DataLoader(self.train_set, batch_sampler=sampler, num_workers=self.cfg.data.workers,
                          pin_memory=self.env.device.type == "cuda")

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch["image"].to(self.env.device, non_blocking=True)
        y = batch["label"].to(self.env.device, non_blocking=True)
        if self.env.device.type == "cuda" and self.t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def _autocast(self):
        return amp.autocast(self.precision, self.env.device)

    def _check_finite(self, losses: dict[str, torch.Tensor], step: int) -> None:
        for name, value in losses.items():
            if not torch.isfinite(value).all():
                kept = f"{self.ckpt.last}.safetensors" if self.ckpt.last else "none (no checkpoint written yet)"
                raise TrainingError(
                    f"{self.role} step {step + 1}: loss term {name!r} is {value.item()}; stopped. "
                    f"Last good checkpoint: {kept}"
                )

    def train_step(self, step: int, batches) -> dict[str, float]:
        """One optimizer step over `accumulate` micro-batches from `batches`; returns the loss terms averaged."""
        env, acc = self.env, self.t.accumulate
        self.opt.zero_grad(set_to_none=True)
        terms: dict[str, float] = {}
        for m in range(acc):
            x, y = self._inputs(next(batches))
            # dropout and drop-path masks follow the data shard, not the process: resumable and DDP-invariant
            torch.manual_seed(derived_seed(self.cfg.seed, self.role, step, env.rank * acc + m))
            sync = m == acc - 1 or env.world == 1  # DDP all-reduces the gradients once, after the last micro-batch
            no_sync = contextlib.nullcontext() if sync else self.objective.no_sync()
            with no_sync, self._autocast():
                teacher = self.method.teacher_features(x)
                losses = self.objective(x, y, teacher)
            self._check_finite(losses, step)
            self.scaler.scale(losses["total"] / acc).backward()
            for k, v in losses.items():
                terms[k] = terms.get(k, 0.0) + v.item() / acc
        if self.t.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.objective.parameters(), self.t.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return terms

    # ---------------------------------------------------------------------------------------------- the run

    def validate(self, step: int) -> float:
        """Score the student on the validation set (each process its shard); the best so far is saved."""
        shard = Subset(self.val_set, range(self.env.rank, len(self.val_set), self.env.world))
        loader = DataLoader(shard, batch_size=1, num_workers=self.cfg.data.workers)
        result = evaluate(self.student, loader, device=self.env.device, num_classes=self.student.config.num_classes,
                          classes=self.student.meta.classes, amp_dtype=self.precision.dtype, progress=False)
        if self.env.main:
            self.metrics.validation(step, result.miou, result.pixel_acc)
            if result.miou > self.best:
                self.best = result.miou
                self._save_model(model_files(self.role)[0], step, result.miou)
        return result.miou

    def _save_model(self, name: str, step: int, miou: float | None) -> None:
        extra = {"step": step, "val_miou": miou, "dataset": self.cfg.data.dataset, "method": self.method.name}
        source = f"{self.role} training, {self.method.name}, step {step}"
        if self.role == QAD:  # the fake-quantized model: its ranges and float groups are part of what is saved
            from pipeline.quant import save_qad

            save_qad(self.student, self.run_dir / name, source=source, training=extra, **self.record)
        else:
            save_model(self.student, self.run_dir / name, source=source, extra=extra)

    def fit(self) -> dict:
        """Train to `steps`, resuming first when allowed; returns the run summary."""
        self.resume()
        env, t = self.env, self.t
        log.info("%s: %s on %s (%s)", self.role,
                 "float32" if self.precision.dtype is None else f"{self.precision.name} autocast", env.device,
                 self.precision.reason)
        self.metrics = MetricsLog(self.role, self.run_dir, self.steps, self.start, t.log_every, env.main)
        seen, terms = 0, {}
        try:
            if self.role == QAD and self.start == 0:  # step 0 is the calibrated (PTQ) model: PTQ -> QAD in the log
                self.start_miou = self.validate(0)
            self.student.train()
            self.method.modules.train()
            batches = iter(self._loader())
            t0 = time.perf_counter()
            for step in range(self.start, self.steps):
                terms = self.train_step(step, batches)
                seen += self.global_batch
                done = step + 1
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                self.metrics.step(done, terms, self.sched.get_last_lr()[0], rate)
                if done % t.eval_every == 0 or done == self.steps:
                    self.validate(done)
                    self.student.train()
                if env.main and (done % t.ckpt_every == 0 or done == self.steps):
                    self.ckpt.save(done, self.state(done))
                env.barrier()
        finally:
            self.metrics.close()
        if self.start >= self.steps:
            log.info("%s: already trained to step %d in %s", self.role, self.steps, self.ckpt.folder)
        summary = {"role": self.role, "method": self.method.name, "steps": self.steps, "resumed_from": self.start,
                   "global_batch": self.global_batch, "best_val_miou": self.best,
                   "amp": self.precision.record(t.amp, env.device),
                   "images_per_s": seen / max(time.perf_counter() - t0, 1e-9) if seen else None,
                   "final_losses": terms if self.start < self.steps else None,
                   **({"start_val_miou": self.start_miou} if self.role == QAD else {})}
        if env.main:
            best, last = model_files(self.role)
            self._save_model(last, self.steps, None)
            if not (self.run_dir / best).is_file():
                self._save_model(best, self.steps, None)
        return summary
