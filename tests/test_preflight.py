"""Validate first: a run whose config, files or output places are wrong fails in one line before any data is generated,
any model built or any file written, so the corrected rerun starts clean."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from tests.conftest import ROOT, run_cli, splits, spread_student

# a distill that really runs in seconds, for the reruns that must now succeed
TINY = ["data.synthetic_train=2", "data.synthetic_val=1", "data.synthetic_size=64x64", "data.size=64x64",
        "teacher.variant=mit_b0", "train.steps=1", "train.batch_size=1", "train.warmup_steps=0"]


def refused(tmp_path: Path, *argv: str, timeout: float = 300) -> str:
    """Run the CLI in `tmp_path` (data.root defaults to data/synthetic there, --run-dir is run/); assert exit 2, one
    line on stderr and nothing written at all; return the line."""
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out, err = run_cli(*argv, "--run-dir", str(tmp_path / "run"), cwd=tmp_path, timeout=timeout)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and not out, (code, err[-3000:])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "something was written"
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
    return err.strip()


@pytest.fixture(scope="module")
def b1_checkpoint(tmp_path_factory) -> Path:
    """A mit_b1 checkpoint of our own format (19 classes), with its sidecar."""
    from pipeline.models import build_model, save_model

    return save_model(build_model("mit_b1"), tmp_path_factory.mktemp("b1") / "b1.safetensors")


# ------------------------------------------------------------------------------------------ method and weights
def test_misspelt_method_on_the_defaults_fails_in_seconds_having_written_nothing(tmp_path):
    start = time.monotonic()
    line = refused(tmp_path, "distill", "distill.method=transkd-bsae")
    seconds = time.monotonic() - start
    assert line.startswith("error: distill.method='transkd-bsae'") and "did you mean transkd-base" in line
    assert seconds < 10, f"{seconds:.1f} s"


def test_unknown_weights_key_fails_before_the_teacher_and_the_corrected_rerun_runs(tmp_path):
    line = refused(tmp_path, "distill", *TINY, "distill.weights.hlc=2")
    assert line.startswith("error: distill.weights.hlc: unknown setting 'hlc'") and "did you mean hcl?" in line
    # nothing was recorded, so the corrected rerun in the same run directory is not "made with other values"
    code, _, err = run_cli("distill", *TINY, "distill.weights.hcl=2", "--run-dir", str(tmp_path / "run"),
                           cwd=tmp_path, timeout=300)
    assert code == 0, err[-3000:]
    assert (tmp_path / "run" / "student.safetensors").is_file()


def test_a_student_wider_than_the_teacher_fails_before_the_teacher_is_trained(tmp_path):
    line = refused(tmp_path, "distill", *TINY, "student.variant=mit_b1")
    assert "teacher mit_b0 (widths [32, 64, 160, 256]) is narrower than student mit_b1" in line
    assert "teacher.variant" in line and "student.variant" in line


# ------------------------------------------------------------------------------------------ checkpoints
def test_a_checkpoint_of_another_variant_is_refused_naming_both_and_the_two_ways_out(tmp_path, b1_checkpoint):
    line = refused(tmp_path, "distill", *TINY, f"teacher.checkpoint={b1_checkpoint}", "teacher.variant=mit_b1",
                   f"student.checkpoint={b1_checkpoint}")
    assert line == (f"error: student.checkpoint: {b1_checkpoint} holds a mit_b1 model, but student.variant is "
                    "mit_b0; set student.variant=mit_b1 to use it, or drop student.checkpoint to train a mit_b0 "
                    "instead")
    line = refused(tmp_path, "teacher", *TINY, f"teacher.checkpoint={b1_checkpoint}")
    assert line.startswith(f"error: teacher.checkpoint: {b1_checkpoint} holds a mit_b1 model, but teacher.variant "
                           "is mit_b0")


def test_the_stage_refuses_a_checkpoint_of_another_variant_too(b1_checkpoint, synthetic):
    """stages.new_model, where the model is made, says the same as the preflight."""
    from pipeline.stages import new_model

    train, _ = splits(synthetic())
    spec = ModelConfig(variant="mit_b0", checkpoint=str(b1_checkpoint))
    with pytest.raises(ConfigError, match=r"student.checkpoint: .*b1.safetensors holds a mit_b1 model, but "
                                          r"student.variant is mit_b0; set student.variant=mit_b1"):
        new_model("student", spec, train, (64, 64), 0)
    assert new_model("student", ModelConfig(variant="mit_b1", checkpoint=str(b1_checkpoint)), train, (64, 64),
                     0).config.variant == "mit_b1"


def test_a_pretrained_encoder_starts_the_variant_whose_encoder_it_is(tmp_path, synthetic):
    """An encoder-only B5 file is named mit_b5 (its encoder is also PVTv2-B5's): it starts a pvt_v2_b5 with its
    encoder weights and the variant's FPN head; an encoder of another architecture is refused naming both."""
    import torch

    from pipeline.models import build_model
    from pipeline.models.checkpoints import mapping_for
    from pipeline.stages import new_model

    train, _ = splits(synthetic())
    torch.manual_seed(3)
    b5 = build_model("mit_b5")
    encoder = {k: v for k, v in b5.state_dict().items() if k.startswith("encoder.")}
    path = tmp_path / "b5_imagenet.pth"  # NVlabs' names, the encoder alone (the table's nvlabs column)
    torch.save({names[0]: encoder[key] for key, (_, names) in mapping_for(b5, "nvlabs", "").items()
                if key in encoder}, path)
    with pytest.warns(Warning):
        model = new_model("student", ModelConfig(variant="pvt_v2_b5", pretrained=str(path)), train, (64, 64), 0)
    assert model.config.variant == "pvt_v2_b5" and model.config.head_style == "fpn"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in encoder.items())
    with pytest.warns(Warning), pytest.raises(ConfigError, match=r"student.pretrained: .*holds a mit_b5 model, but "
                                                                  r"student.variant is pvt_v2_b4"):
        new_model("student", ModelConfig(variant="pvt_v2_b4", pretrained=str(path)), train, (64, 64), 0)


def test_a_checkpoint_of_other_classes_is_refused_before_the_data_is_made(tmp_path):
    from pipeline.models import save_model

    ckpt = save_model(spread_student(num_classes=21), tmp_path / "voc.safetensors")
    line = refused(tmp_path, "eval", *TINY[:4], "--checkpoint", str(ckpt))
    assert line == (f"error: --checkpoint: {ckpt} predicts 21 classes, the dataset synthetic has 19; give a "
                    "checkpoint of synthetic's classes, or the data.dataset it was trained on")


@pytest.mark.parametrize("item, message", [
    ("student.checkpoint={tmp}/none.safetensors", "{tmp}/none.safetensors: no such file or directory "
                                                  "(student.checkpoint)"),
    ("teacher.pretrained={tmp}/none.pth", "{tmp}/none.pth: no such file or directory (teacher.pretrained)"),
    ("data.dataset=cityscapes", "data.root data/synthetic: cityscapes dataset folder not found"),
])
def test_paths_that_must_exist(tmp_path, item, message):
    line = refused(tmp_path, "distill", *TINY, item.format(tmp=tmp_path))
    assert line.startswith("error: " + message.format(tmp=tmp_path)), line


def test_places_that_must_be_writable(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    code, _, err = run_cli("distill", *TINY, "--run-dir", str(tmp_path / "file" / "run"), cwd=tmp_path)
    assert code == 2 and err == (f"error: --run-dir {tmp_path}/file/run: {tmp_path}/file is a file, not a folder; "
                                 "choose another --run-dir\n")
    line = refused(tmp_path, "distill", *TINY, f"data.root={tmp_path}/file/synthetic")
    assert line == f"error: data.root {tmp_path}/file/synthetic: {tmp_path}/file is a file, not a folder; " \
                   "choose another data.root"


# ------------------------------------------------------------------------------------------ segment-bag
@pytest.fixture(scope="module")
def drive(tmp_path_factory) -> dict:
    """A real ROS 1 bag with three camera frames and a checkpoint to segment it with."""
    pytest.importorskip("rosbags")
    from pipeline.models import save_model
    from tests.test_bag import write_bag

    d = tmp_path_factory.mktemp("drive")
    frames = [np.random.default_rng(i).integers(0, 255, (64, 128, 3), dtype=np.uint8) for i in range(3)]
    return {"bag": write_bag(d / "drive.bag", "ros1", frames),
            "artifact": save_model(spread_student(), d / "s.safetensors")}


def test_segment_bag_out_inside_a_regular_file_is_one_line(tmp_path, drive):
    (tmp_path / "notes.txt").write_text("a file")
    out = tmp_path / "notes.txt" / "out.bag"
    line = refused(tmp_path, "segment-bag", "--bag", str(drive["bag"]), "--topic", "/cam/image", "--artifact",
                   str(drive["artifact"]), "--out", str(out))
    assert line == f"error: --out {out.parent}: {tmp_path}/notes.txt is a file, not a folder; choose another --out"


def test_segment_bag_video_in_a_missing_folder_fails_before_any_frame(tmp_path, drive):
    video = tmp_path / "videos" / "drive.mp4"
    line = refused(tmp_path, "segment-bag", "--bag", str(drive["bag"]), "--topic", "/cam/image", "--artifact",
                   str(drive["artifact"]), "--out", str(tmp_path / "out.bag"), "--video", str(video), timeout=60)
    assert line == (f"error: --video {video}: folder {video.parent} does not exist; create it or choose another "
                    "--video")


# ------------------------------------------------------------------------------------------ flags
@pytest.mark.parametrize("argv, message", [
    (["distill", "--bag", "x.bag"], "--bag belongs to segment-bag, which is not among the stages asked (distill)"),
    (["teacher", "distill", "--checkpoint", "x.safetensors"],
     "--checkpoint belongs to qad, eval and export, which are not among the stages asked (teacher, distill)"),
    (["distill", "--bag", "x.bag", "--checkpoint", "y.safetensors"],
     "--checkpoint belongs to qad, eval and export, which are not among the stages asked (distill)"),
    (["export", "--fps", "5"],
     "--fps belongs to segment-bag and segment, which are not among the stages asked (export)"),
])
def test_a_flag_of_a_stage_not_asked_is_refused_before_any_work(tmp_path, argv, message):
    assert refused(tmp_path, *argv) == f"error: {message}"


def test_help_and_the_stage_registry_import_no_torch():
    """The checks live beside the registry, which `--help` reads: importing them must stay light."""
    code = "import sys, pipeline.run, pipeline.preflight; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
