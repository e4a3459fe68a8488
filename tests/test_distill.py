"""Distillation methods: parameter anchors, loss definitions, gradients, optimisation, frozen teacher, errors."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.distill import METHODS, build_method
from pipeline.distill.csf import CrossSelectiveFusion, hcl_loss
from pipeline.distill.losses import ce_loss, cwd_loss, kd_loss
from pipeline.errors import ConfigError
from pipeline.models import build_model, save_model
from tests.conftest import n_params, run_cli

DISTILLING = [m for m in METHODS if m != "none"]


def batch(b=2, h=64, w=96, classes=19, seed=0):
    """Random images with labels in 8 x 8 pixel blocks (learnable at the logits' 1/4 resolution)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, classes, (b, 1, h // 8, w // 8), generator=g).float()
    labels = torch.nn.functional.interpolate(blocks, size=(h, w), mode="nearest")[:, 0].long()
    return torch.randn(b, 3, h, w, generator=g), labels


def step_losses(method, x, y):
    s = method.student.features(x)
    return method.loss(s, method.teacher_features(x), y)


@pytest.fixture(scope="module")
def b2_b0():
    torch.manual_seed(0)
    return build_model("mit_b2"), build_model("mit_b0")


def test_parameter_anchors_b2_to_b0(b2_b0):
    # docs/method.md section 6: student + train-only modules, teacher MiT-B2 -> student MiT-B0, 19 classes
    teacher, student = b2_b0
    expected = {"none": 3.72, "kd": 3.72, "cwd": 3.72, "review": 4.37, "transkd-base": 4.56, "transkd-gl": 5.22,
                "transkd-ea": 5.53}
    modules = {}
    for name in METHODS:
        m = build_method(name, teacher, student)
        modules[name] = {k: n_params(v) for k, v in m.modules.items()}
        assert round((n_params(student) + n_params(m.modules)) / 1e6, 2) == expected[name], name
    assert modules["none"] == {}
    assert modules["transkd-base"] == {"csf": 650_304, "pea": 193_536}
    assert modules["transkd-gl"]["gl"] == 656_130
    assert modules["transkd-ea"]["ea"] == 970_952


def test_train_only_modules_start_as_the_reference_initialises_them():
    # CSF's reduce / project convs: kaiming_uniform(a=1), std 1/sqrt(fan_in) (PyTorch's default: 0.58x that);
    # EA's patch-embedding convs: N(0, sqrt(2 / fan_out)) with zero bias, as the reference's MiT patch embedding
    torch.manual_seed(0)
    method = build_method("transkd-ea", build_model("mit_b2"), build_model("mit_b0"))
    for unit in method.modules["csf"].units:
        for conv in (unit.reduce[0], unit.project[0]):
            fan_in = conv.weight[0].numel()
            assert conv.weight.std().item() == pytest.approx(fan_in ** -0.5, rel=0.1)
            assert conv.weight.abs().max().item() <= (3 / fan_in) ** 0.5
    for embed in method.modules["ea"].embed:
        w = embed.proj.weight
        fan_out = w.shape[0] * w.shape[2] * w.shape[3]
        assert w.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
        assert not embed.proj.bias.any()


@pytest.mark.parametrize("pair", [("mit_b5", "mit_b1"), ("mit_b1", "mit_b0"), ("mit_b2", "mit_b2"),
                                  ("pvt_v2_b2", "pvt_v2_b0"), ("mit_b2", "pvt_v2_b0"), ("mit_b2", "lvt")])
def test_other_pairs_build_and_train(pair):
    teacher, student = build_model(pair[0]), build_model(pair[1])
    x, y = batch(2, 64, 64)
    for name in ("transkd-base", "transkd-gl", "transkd-ea", "cwd"):
        options = {"cwd_on": "maps"} if name == "cwd" else {}
        method = build_method(name, teacher, student, **options)
        loss = step_losses(method, x, y)
        loss["total"].backward()
        assert torch.isfinite(loss["total"]) and loss["total"] > 0
        proj = method.modules["pea"].proj if "pea" in method.modules else method.modules["cwd_proj"]
        assert [p.weight.shape[0] for p in proj] == list(teacher.config.dims)  # widths from the variant tables
        student.zero_grad()


def test_saved_student_holds_no_distillation_tensors(tmp_path, b2_b0):
    teacher, _ = b2_b0
    student = build_model("mit_b0")
    method = build_method("transkd-ea", teacher, student)
    step_losses(method, *batch())["total"].backward()
    save_model(student, tmp_path / "student.safetensors")
    state = load_file(tmp_path / "student.safetensors")
    assert set(state) == set(build_model("mit_b0").state_dict())
    build_model("mit_b0").load_state_dict(state, strict=True)
    assert sum(v.numel() for k, v in state.items() if "num_batches" not in k and "running" not in k) == 3_719_027


# ------------------------------------------------------------------------------------------ loss definitions


def test_losses_vanish_where_their_definition_implies_it():
    x = torch.randn(2, 19, 16, 24)
    assert kd_loss(x, x, 4.0).abs() < 1e-6
    assert cwd_loss(x, x, 4.0).abs() < 1e-6
    maps = [torch.randn(2, c, s, s) for c, s in ((64, 16), (128, 8), (320, 4), (512, 2))]
    assert hcl_loss(maps, maps) == 0
    labels = torch.randint(0, 19, (2, 16, 24))
    confident = 50.0 * torch.nn.functional.one_hot(labels, 19).permute(0, 3, 1, 2).float()
    assert ce_loss(confident, labels) < 1e-6
    # ...and are positive otherwise
    y = torch.randn_like(x)
    assert kd_loss(x, y, 4.0) > 0 and cwd_loss(x, y, 4.0) > 0
    assert hcl_loss(maps, [m + 0.1 * torch.randn_like(m) for m in maps]) > 0


def test_ce_at_quarter_resolution_is_the_references_downsampled_label_cross_entropy():
    """ce_resolution=quarter: the cross-entropy of the 1/4-resolution logits against the labels downsampled to that
    size by nearest neighbour at pixel centres (the reference resizes its label images with PIL's NEAREST to
    int(H/4 + 0.5) x int(W/4 + 0.5) in train/train_TransKDBase.py), ignore pixels (255) staying ignored."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 19, 16, 24, generator=g)
    labels = torch.randint(0, 19, (2, 64, 96), generator=g)
    labels[:, 8:24, 4:40] = 255  # an ignored region, and single ignored pixels at some sampled centres
    labels[0, 2::4, 2::8] = 255
    # independently: output pixel i samples input row floor((i + 0.5) * 64 / 16), i.e. the centre pixel 4i + 2
    rows = ((torch.arange(16) + 0.5) * 64 / 16).floor().long()
    cols = ((torch.arange(24) + 0.5) * 96 / 24).floor().long()
    small = labels[:, rows][:, :, cols]
    assert (small == 255).any() and (small != 255).any()
    keep = small != 255
    log_p = torch.log_softmax(logits, 1).permute(0, 2, 3, 1)[keep]
    expected = -log_p.gather(1, small[keep][:, None]).mean()
    quarter = ce_loss(logits, labels, resolution="quarter")
    assert torch.allclose(quarter, expected, rtol=1e-6, atol=1e-6)
    # the ignored pixels contribute nothing: any class scores there leave the loss as it is
    moved = logits.clone().permute(0, 2, 3, 1)
    moved[~keep] = 100.0 * torch.randn(int((~keep).sum()), 19, generator=g)
    assert torch.allclose(ce_loss(moved.permute(0, 3, 1, 2), labels, resolution="quarter"), quarter)
    # the default upsamples the logits instead: another loss on the same inputs; typos are refused
    assert not torch.allclose(ce_loss(logits, labels), quarter)
    assert torch.equal(ce_loss(logits, labels), ce_loss(logits, labels, resolution="label"))
    with pytest.raises(ValueError, match="resolution='quater'"):
        ce_loss(logits, labels, resolution="quater")
    # the same sampling as PIL's NEAREST resize, the reference's
    image = pytest.importorskip("PIL.Image")
    pil = image.fromarray(labels[0].to(torch.uint8).numpy()).resize((24, 16), image.NEAREST)
    assert torch.equal(torch.tensor(np.array(pil)).long(), small[0])


def test_the_method_passes_ce_resolution_to_the_cross_entropy():
    student = build_model("mit_b0")
    x, y = batch()
    s = student.features(x)
    assert build_method("none", None, student).options["ce_resolution"] == "label"
    quarter = build_method("none", None, student, ce_resolution="quarter").loss(s, None, y)["ce"]
    assert torch.equal(quarter, ce_loss(s.logits, y, resolution="quarter"))
    assert torch.equal(build_method("none", None, student).loss(s, None, y)["ce"], ce_loss(s.logits, y))
    with pytest.raises(ConfigError, match=r"ce_resolution='quater', expected one of label, quarter"):
        build_method("none", None, student, ce_resolution="quater")


def test_the_losses_compute_in_float32_from_bf16_taps():
    """Under bf16 autocast every loss is the float32 loss of its taps cast up: CPU autocast would otherwise resample,
    pool and take the softmax in bf16."""
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(2, 19, *hw, generator=g).bfloat16() for hw in ((16, 24), (32, 48)))
    maps = [torch.randn(2, 64, 16, 16, generator=g).bfloat16() for _ in range(2)]
    labels = torch.randint(0, 19, (2, 64, 96), generator=g)
    losses = {"kd": lambda f: kd_loss(f(s), f(t), 4.0), "cwd": lambda f: cwd_loss(f(s), f(t), 4.0),
              "ce": lambda f: ce_loss(f(s), labels), "hcl": lambda f: hcl_loss([f(maps[0])], [f(maps[1])])}
    for name, loss in losses.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = loss(lambda x: x)
        want = loss(torch.Tensor.float)
        assert got.dtype == torch.float32 and torch.equal(got, want), name


def test_under_bf16_autocast_the_teacher_runs_in_bf16_and_every_term_is_float32(b2_b0):
    teacher, student = b2_b0
    x, y = batch()
    for name in DISTILLING:
        method = build_method(name, teacher, student, **({"cwd_on": "maps"} if name == "cwd" else {}))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            taps = method.teacher_features(x)
            losses = method.loss(student.features(x), taps, y)
        assert {t.dtype for t in [taps.logits, *taps.maps]} == {torch.bfloat16}, name
        assert not any(t.requires_grad for t in [taps.logits, *taps.maps, *taps.embeddings]), name
        assert {v.dtype for v in losses.values()} == {torch.float32}, name
        losses["total"].backward()
        grad = student.encoder.stages[0].embed.proj.weight.grad
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        student.zero_grad()


def test_hcl_pools_only_levels_smaller_than_the_map():
    s, t = torch.zeros(1, 4, 4, 4), torch.ones(1, 4, 4, 4)
    # a constant offset of 1 gives MSE 1 at every level, so the weighted average is 1 whatever levels are used
    assert hcl_loss([s], [t]).item() == pytest.approx(1.0)
    # a checkerboard difference averages out under 2x2 and 1x1 pooling (level 4 is skipped at height 4):
    # (1 + 1/2 * 0 + 1/4 * 0) / (1 + 1/2 + 1/4)
    board = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 * 2.0 - 1.0
    assert hcl_loss([board.expand(1, 4, 4, 4)], [torch.zeros(1, 4, 4, 4)]).item() == pytest.approx(1 / 1.75)


def test_pea_and_ea_vanish_for_an_identity_alignment_of_identical_taps():
    student = build_model("mit_b0")
    teacher = copy.deepcopy(student)
    for name in ("transkd-base", "transkd-ea"):
        method = build_method(name, teacher, student, hcl=0.0, ce=0.0)
        with torch.no_grad():
            for lin in method.modules["pea"].proj:
                lin.weight.copy_(torch.eye(lin.weight.shape[0]))
                lin.bias.zero_()
            if "ea" in method.modules:
                method.modules["ea"].w.fill_(1.0)
                method.modules["ea"].v.zero_()
        student.eval()
        x, y = batch()
        loss = method.loss(student.features(x), method.teacher_features(x), y)
        assert set(loss) == {"pea", "total"}  # zero-weight terms are not computed
        assert loss["pea"].abs() < 1e-10


@pytest.mark.parametrize("name", DISTILLING)
def test_each_term_is_positive_with_finite_gradients_into_the_student(name, b2_b0):
    teacher, _ = b2_b0
    student = build_model("mit_b0").train()
    method = build_method(name, teacher, student)
    x, y = batch()
    loss = step_losses(method, x, y)
    terms = [k for k in loss if k != "total"]
    assert set(terms) == set(METHODS[name].weights)
    for term in terms:
        student.zero_grad()
        assert loss[term] > 0 and torch.isfinite(loss[term])
        loss[term].backward(retain_graph=True)
        stages = student.encoder.stages
        # every term reaches every stage's patch embedding, and (except the embedding loss, which reads the
        # tokens before the blocks) the transformer blocks of the deepest stage
        reached = [stages[i].embed.proj.weight for i in range(4)]
        if term != "pea":
            reached.append(stages[3].blocks[-1].ffn.fc2.weight)
        for p in reached:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, term


@pytest.mark.parametrize("name", list(METHODS))
def test_thirty_steps_lower_the_total_loss(name):
    torch.manual_seed(1)
    teacher = build_model("mit_b1")
    student = build_model("mit_b0", drop_path=0.0, dropout=0.0).train()
    method = build_method(name, teacher, student)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    params = list(student.parameters()) + list(method.modules.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    method.modules.train()
    x, y = batch(2, 64, 64)
    history = []
    for _ in range(30):
        loss = step_losses(method, x, y)
        opt.zero_grad()
        loss["total"].backward()
        opt.step()
        history.append(loss["total"].item())
    assert history[-1] < 0.8 * history[0], history
    # the teacher stayed frozen: eval mode, no gradient, not a single value changed (BN statistics included)
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("b", [1, 3])
def test_csf_shapes_and_the_batch_one_branch(b):
    csf = CrossSelectiveFusion((32, 64, 160, 256), (64, 128, 320, 512)).train()
    maps = [torch.randn(b, c, s, 2 * s) for c, s in ((32, 16), (64, 8), (160, 4), (256, 2))]
    before = csf.units[0].squeeze[1].running_mean.clone()
    outs = csf(maps)
    assert [tuple(o.shape) for o in outs] == [(b, 64, 16, 32), (b, 128, 8, 16), (b, 320, 4, 8), (b, 512, 2, 4)]
    sum(o.mean() for o in outs).backward()
    unit = csf.units[0]
    # batch 1: the BatchNorm-free squeeze is used (the reference's quirk) and the BN squeeze is untouched
    assert (unit.squeeze_single[0].weight.grad is not None) == (b == 1)
    assert (unit.squeeze[0].weight.grad is not None) == (b > 1)
    assert torch.equal(unit.squeeze[1].running_mean, before) == (b == 1)
    assert not hasattr(csf.units[3], "attend")  # the deepest unit has nothing to fuse with


def test_batch_one_trains_every_method(b2_b0):
    teacher, _ = b2_b0
    student = build_model("mit_b0").train()
    x, y = batch(1)
    for name in METHODS:
        loss = step_losses(build_method(name, teacher, student), x, y)
        loss["total"].backward()
        assert torch.isfinite(loss["total"])


def test_taps_of_different_spatial_sizes_are_aligned(b2_b0):
    # the teacher sees the frame at twice the resolution: every map, token grid and logit map differs in size
    teacher, _ = b2_b0
    student = build_model("mit_b0")
    x, y = batch(2, 64, 96)
    big = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    for name in DISTILLING:
        options = {"cwd_on": "maps"} if name == "cwd" else {}
        method = build_method(name, teacher, student, **options)
        t = method.teacher_features(big)
        assert t.sizes[0] == (32, 48)
        loss = method.loss(student.features(x), t, y)
        student.zero_grad()
        loss["total"].backward()
        assert torch.isfinite(loss["total"])
        assert student.encoder.stages[0].embed.proj.weight.grad.abs().sum() > 0


def test_teacher_taps_are_plain_tensors_without_history(b2_b0):
    teacher, student = b2_b0
    method = build_method("transkd-base", teacher, student)
    taps = method.teacher_features(batch()[0])
    for t in [*taps.maps, *taps.embeddings, taps.logits]:
        assert not t.requires_grad and not t.is_inference()


def test_weights_and_options_are_overridable(b2_b0):
    teacher, student = b2_b0
    method = build_method("transkd-base", teacher, student, pea=2.5, pea_stage_weights=[1, 1, 1, 1])
    assert method.weights == {"ce": 1.0, "hcl": 1.0, "pea": 2.5}
    assert method.options["pea_stage_weights"] == (1.0, 1.0, 1.0, 1.0)
    x, y = batch()
    s = student.features(x)
    t = method.teacher_features(x)
    base = build_method("transkd-base", teacher, student)
    base.modules.load_state_dict(method.modules.state_dict())
    ratio = method.loss(s, t, y)["pea"] / base.loss(s, t, y)["pea"]
    assert ratio > 2.5  # stage weights 1 instead of (0.1, 0.1, 0.5, 1.0) can only add
    assert method.describe()["train_only_parameters"] == 843_840


def test_bad_configs_fail_before_training(b2_b0):
    teacher, student = b2_b0
    with pytest.raises(ConfigError, match=r"unknown distillation method 'transkd'.*did you mean transkd-"):
        build_method("transkd", teacher, student)
    with pytest.raises(ConfigError, match=r"pea_stage_weights=\[0.1, 0.1, 0.5\], expected a list of 4"):
        build_method("transkd-base", teacher, student, pea_stage_weights=[0.1, 0.1, 0.5])
    with pytest.raises(ConfigError, match="teacher mit_b0 .* is narrower than student mit_b1 .* at stage 1"):
        build_method("transkd-base", build_model("mit_b0"), build_model("mit_b1"))
    with pytest.raises(ConfigError, match=r"unknown setting 'hlc'; expected one of ce, hcl, pea"):
        build_method("transkd-base", teacher, student, hlc=1.0)
    with pytest.raises(ConfigError, match=r"weight kd=-1, expected a number >= 0"):
        build_method("kd", teacher, student, kd=-1)
    with pytest.raises(ConfigError, match="teacher predicts 19 classes, student 21"):
        build_method("kd", teacher, build_model("mit_b0", num_classes=21))
    with pytest.raises(ConfigError, match="needs a teacher"):
        build_method("review", None, student)
    with pytest.raises(ConfigError, match="gl_heads=6 must divide"):
        build_method("transkd-gl", teacher, student, gl_heads=6)
    with pytest.raises(ConfigError, match="cwd_on='stages'"):
        build_method("cwd", teacher, student, cwd_on="stages")
    with pytest.raises(ConfigError, match="class_weights has 3 entries, expected 19"):
        build_method("none", None, student, class_weights=[1, 2, 3])
    # the student alone needs no teacher; a narrower "teacher" is fine for logit KD, which has no modules
    assert n_params(build_method("none", None, student).modules) == 0
    assert n_params(build_method("review", None, student, hcl=0).modules) == 0
    build_method("kd", build_model("mit_b0"), build_model("mit_b1"))


def test_ce_resolution_reaches_the_run_and_is_set_in_one_place(tmp_path, synthetic):
    """distill.ce_resolution=quarter is the option of the method the run builds (method.json); the same option in
    distill.weights is refused before any work, naming the key to use."""
    data = synthetic(train=4, val=2, size=(64, 96))
    common = ["data.size=64x96", f"data.root={data}", "teacher.variant=mit_b0", "train.steps=1", "train.batch_size=2",
              "train.warmup_steps=0", "train.eval_every=100", "train.ckpt_every=100"]
    code, _, err = run_cli("distill", "--run-dir", str(tmp_path / "q"), "distill.ce_resolution=quarter", *common)
    assert code == 0, err
    recorded = json.loads((tmp_path / "q" / "method.json").read_text())
    assert recorded["options"]["ce_resolution"] == "quarter"
    code, _, err = run_cli("distill", "--run-dir", str(tmp_path / "w"), "distill.weights.ce_resolution=quarter",
                           *common)
    assert code == 2 and err.strip().splitlines()[-1] == (
        "error: distill.weights.ce_resolution: set it as distill.ce_resolution (label or quarter)")
    assert not (tmp_path / "w" / "config.yaml").exists()
