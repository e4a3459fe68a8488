"""The autocast precision choice (pipeline/amp.py) and the Trainer's use of it: bf16 only where the hardware has it,
training and the teacher's forward in the chosen dtype, the choice recorded in the run, exact resume in it."""

from pathlib import Path

import pytest
import torch

from pipeline import amp
from pipeline import config as config_mod
from pipeline.distill import build_method
from pipeline.io import load_state, save_state, write_json
from pipeline.models import build_model
from pipeline.stages import datasets
from pipeline.train import Trainer, TrainingError, init_distributed, resumed_precision

TINY = ["data.synthetic_train=12", "data.synthetic_val=4", "data.synthetic_size=64x128", "data.size=64x96",
        "teacher.variant=mit_b0", "student.variant=mit_b0", "train.warmup_steps=2", "train.log_every=1",
        "train.batch_size=2", "train.eval_every=100", "train.device=cpu"]
DATA = (12, 4, (64, 128))  # the synthetic set TINY describes (tests/test_train.py makes the same one)

# /proc/cpuinfo as the Linux kernel prints it (one processor each; x86 `flags`, Arm `Features`)
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht \
syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni pclmulqdq \
ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm \
3dnowprefetch invpcid_single ssbd ibrs ibpb stibp ibrs_enhanced fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms \
invpcid rtm avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt \
xsavec xgetbv1 xsaves avx_vnni avx512_bf16 arat avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes \
vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq la57 rdpid cldemote movdiri movdir64b fsrm md_clear \
serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8 arch_capabilities
bogomips\t: 5399.99
"""
CASCADE_LAKE = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU @ 2.80GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht \
syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid pni pclmulqdq ssse3 fma cx16 \
pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch fsgsbase \
bmi1 hle avx2 smep bmi2 erms invpcid rtm mpx avx512f avx512dq rdseed adx smap clflushopt clwb avx512cd avx512bw \
avx512vl xsaveopt xsavec xgetbv1 xsaves arat avx512_vnni md_clear arch_capabilities
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop \
sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh \
rng
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""
GRAVITON2 = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""


# ----------------------------------------------------------------------------------------------- the choice


@pytest.mark.parametrize("cc", [(6, 1), (7, 0), (7, 5)])
def test_auto_on_a_gpu_before_ampere_is_fp16_with_a_grad_scaler(cc):
    choice = amp.choose("auto", "cuda", capability=cc)
    assert (choice.dtype, choice.scaler, choice.name) == (torch.float16, True, "fp16")
    assert f"{cc[0]}.{cc[1]}" in choice.reason


@pytest.mark.parametrize("cc", [(8, 0), (8, 6), (8, 7), (9, 0)])
def test_auto_from_compute_capability_8_0_is_bf16_without_a_scaler(cc):
    choice = amp.choose("auto", "cuda:1", capability=cc)
    assert (choice.dtype, choice.scaler, choice.name) == (torch.bfloat16, False, "bf16")


def test_explicit_settings_on_cuda_are_taken_as_asked():
    assert amp.choose("bf16", "cuda", capability=(7, 5)).dtype == torch.bfloat16
    assert amp.choose("fp16", "cuda", capability=(9, 0)).scaler
    assert amp.choose("off", "cuda", capability=(9, 0)).dtype is None


@pytest.mark.parametrize("text, native", [(SAPPHIRE_RAPIDS, True), (CASCADE_LAKE, False), (GRAVITON3, True),
                                          (GRAVITON2, False)])
def test_native_cpu_bf16_from_proc_cpuinfo_flags(text, native):
    assert amp.cpu_bf16_from_flags(amp.cpu_flags(text)) is native


def test_this_cpus_probe_agrees_with_its_proc_cpuinfo():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    # PyTorch's own CPU probes (x86) and the kernel's flags are two independent answers to the same question
    assert amp.cpu_bf16_native() == amp.cpu_bf16_from_flags(amp.cpu_flags(cpuinfo.read_text(errors="replace")))


@pytest.mark.parametrize("setting, native, name", [("auto", True, "bf16"), ("auto", False, "fp32"),
                                                   ("bf16", False, "bf16"), ("fp16", True, "fp32"),
                                                   ("off", True, "fp32")])
def test_the_choice_on_a_cpu(setting, native, name):
    choice = amp.choose(setting, "cpu", cpu_native=native)
    assert choice.name == name and not choice.scaler
    assert choice.record(setting, "cpu") == {"setting": setting, "device": "cpu", "dtype": name,
                                             "grad_scaler": False, "reason": choice.reason}


# ------------------------------------------------------------------------------------------ the Trainer


def make_trainer(run_dir: Path, root: Path, *overrides: str, seed: int = 0) -> Trainer:
    """A transkd-base distillation of a tiny B0 (initialised from `seed`) from a B0 teacher, in this process, on the
    CPU."""
    cfg = config_mod.load(None, TINY + [f"data.root={root}", *overrides])
    env = init_distributed("cpu")
    run_dir.mkdir(parents=True, exist_ok=True)
    train, val = datasets(cfg, run_dir, env)
    torch.manual_seed(0)
    teacher = build_model("mit_b0")  # a given teacher: a real run loads it from its file, it is not in the state
    torch.manual_seed(seed)
    student = build_model("mit_b0")
    return Trainer("student", cfg, run_dir, student, build_method("transkd-base", teacher, student), train, val, env)


@pytest.mark.parametrize("setting", ["auto", "off", "bf16"])
def test_training_and_the_teachers_forward_run_in_the_chosen_dtype_and_the_run_records_it(tmp_path, synthetic,
                                                                                          setting):
    choice = amp.choose(setting, "cpu")
    if setting == "auto" and amp.cpu_bf16_native():
        assert choice.dtype == torch.bfloat16  # a CPU with native bf16 takes it
    trainer = make_trainer(tmp_path, synthetic(*DATA), f"train.amp={setting}", "train.steps=1", "train.eval_every=1")
    seen: dict[str, set] = {"student": set(), "teacher": set()}
    for role, model in (("student", trainer.student), ("teacher", trainer.method.teacher)):
        conv = model.encoder.stages[0].embed.proj  # the first convolution: autocast runs it in the chosen dtype
        conv.register_forward_hook(lambda m, i, out, role=role: seen[role].add(out.dtype))
    summary = trainer.fit()  # one step and one validation
    expected = choice.dtype or torch.float32
    assert seen == {"student": {expected}, "teacher": {expected}}
    assert summary["amp"] == choice.record(setting, "cpu")
    state = load_state(tmp_path / "checkpoints" / "student" / "step-0000001")
    assert state["amp"] == choice.record(setting, "cpu")
    assert trainer.method.teacher.encoder.stages[0].embed.proj.weight.dtype == torch.float32  # weights stay float32


def test_a_bf16_run_resumed_halfway_ends_with_the_uninterrupted_weights(tmp_path, synthetic):
    root, args = synthetic(*DATA), ("train.amp=bf16", "train.steps=4", "train.ckpt_every=2")
    straight = make_trainer(tmp_path, root, *args)
    start = {k: v.clone() for k, v in straight.student.state_dict().items()}
    straight.fit()
    want = {k: v.clone() for k, v in straight.student.state_dict().items()}
    # as if the run had been killed after step 2: the pointer names that state (the newest two are kept)
    write_json(tmp_path / "checkpoints" / "student" / "last.json", {"checkpoint": "step-0000002", "step": 2})
    resumed = make_trainer(tmp_path, root, *args, seed=1)  # other initial weights: all comes from the state
    summary = resumed.fit()
    assert summary["resumed_from"] == 2 and summary["amp"]["dtype"] == "bf16"
    got = resumed.student.state_dict()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    assert sum(not torch.equal(want[k], start[k]) for k in want) > 0.9 * len(want)  # trained weights, not the start


def test_a_state_from_before_the_choice_was_recorded_resumes_in_float32_as_it_started(tmp_path, synthetic):
    """An older trainer ran `train.amp=auto` in float32 on every CPU: its state has no `amp` record. Resumed here,
    where auto may mean bf16, it continues in float32 and ends with the float32 run's weights."""
    root, args = synthetic(*DATA), ("train.steps=4", "train.ckpt_every=2")
    straight = make_trainer(tmp_path, root, "train.amp=off", *args)
    straight.fit()
    want = {k: v.clone() for k, v in straight.student.state_dict().items()}
    folder = tmp_path / "checkpoints" / "student"
    state = load_state(folder / "step-0000002")
    del state["amp"]
    state["config"]["train.amp"] = "auto"
    save_state(folder / "step-0000002", state)
    write_json(folder / "last.json", {"checkpoint": "step-0000002", "step": 2})
    summary = make_trainer(tmp_path, root, "train.amp=auto", *args, seed=1).fit()
    assert summary["amp"]["dtype"] == "fp32" and summary["amp"]["setting"] == "auto"
    assert "resumed" in summary["amp"]["reason"] or not amp.cpu_bf16_native()
    got = load_state(folder / "step-0000004")["model"]
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


def test_a_state_this_device_cannot_continue_is_refused_naming_it(tmp_path, synthetic):
    root, args = synthetic(*DATA), ("train.steps=2", "train.ckpt_every=2")
    make_trainer(tmp_path, root, *args).fit()
    stem = tmp_path / "checkpoints" / "student" / "step-0000002"
    state = load_state(stem)
    state["amp"] = amp.choose("auto", "cuda", capability=(7, 5)).record("auto", "cuda:0")  # as a T4 run records it
    save_state(stem, state)
    with pytest.raises(TrainingError) as e:
        make_trainer(tmp_path, root, *args).fit()
    assert str(e.value).startswith(f"{stem}.json: the run started in fp16") and len(str(e.value).splitlines()) == 1


# --------------------------------------------------------------------------------- resumed precision rules


def test_a_resumed_run_keeps_the_recorded_precision_over_what_this_machine_would_choose():
    here = amp.choose("auto", "cpu", cpu_native=False)  # a CPU without bf16: auto would be float32
    bf16_run = {"amp": amp.choose("auto", "cpu", cpu_native=True).record("auto", "cpu")}
    kept = resumed_precision(bf16_run, "auto", torch.device("cpu"), here)
    assert kept.dtype == torch.bfloat16 and not kept.scaler and kept.reason.startswith("resumed")
    fp32_run = {"amp": here.record("auto", "cpu")}
    bf16_here = amp.choose("auto", "cpu", cpu_native=True)
    assert resumed_precision(fp32_run, "auto", torch.device("cpu"), bf16_here).dtype is None
    assert resumed_precision(bf16_run, "auto", torch.device("cpu"), bf16_here) is bf16_here  # the same: unchanged


def test_an_fp16_run_cannot_continue_on_a_cpu_and_says_so_in_one_line():
    fp16_run = {"amp": amp.choose("auto", "cuda", capability=(7, 5)).record("auto", "cuda:0")}
    with pytest.raises(TrainingError) as e:
        resumed_precision(fp16_run, "auto", torch.device("cpu"), amp.choose("auto", "cpu", cpu_native=True))
    line = str(e.value)
    assert len(line.splitlines()) == 1 and "fp16" in line and "CUDA" in line and "train.resume=never" in line


def test_a_broken_record_is_refused_in_one_line():
    with pytest.raises(TrainingError, match=r"amp record \{'dtype': 'int8'\} names no precision") as e:
        resumed_precision({"amp": {"dtype": "int8"}}, "auto", torch.device("cpu"), amp.choose("off", "cpu"))
    assert len(str(e.value).splitlines()) == 1 and "train.resume=never" in str(e.value)


@pytest.mark.parametrize("state, name", [
    ({"rng": {"torch": 0}, "scaler": {}}, "fp32"),  # a CPU run: that trainer never used autocast on a CPU
    ({"rng": {"torch": 0, "cuda": 0}, "scaler": {}}, "bf16"),  # auto on CUDA without a GradScaler
    ({"rng": {"torch": 0, "cuda": 0}, "scaler": {"scale": 65536.0}}, "fp16"),  # auto on CUDA with one
])
def test_a_state_without_a_record_resumes_in_what_its_trainer_took(state, name):
    here = amp.choose("auto", "cpu", cpu_native=name == "fp32")  # a choice other than the one the run started in
    if name == "fp16":
        with pytest.raises(TrainingError, match="fp16"):
            resumed_precision(state, "auto", torch.device("cpu"), here)
        return
    assert resumed_precision(state, "auto", torch.device("cpu"), here).name == name
