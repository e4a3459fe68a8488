"""Configuration and the command line: defaults, YAML, key=value overrides, one-line errors, the stage registry's
flags, and the package's entry points."""

import importlib
import json

import pytest

from pipeline import config
from pipeline.errors import ConfigError
from pipeline.stages import STAGES, stage_flags
from tests.conftest import ROOT, imported_modules, run_cli


def test_overrides_are_typed():
    cfg = config.load(None, ["data.size=96x160", "train.steps=7", "train.lr=1e-3", "data.flip=false",
                             "distill.method=transkd-ea", "distill.weights.pea=2", "seed=3",
                             "teacher.checkpoint=t.pth"])
    assert cfg.data.size == (96, 160) and cfg.train.steps == 7 and cfg.train.lr == 1e-3
    assert cfg.data.flip is False and cfg.distill.method == "transkd-ea" and cfg.distill.weights == {"pea": 2}
    assert cfg.seed == 3 and cfg.teacher.checkpoint == "t.pth"


def test_yaml_then_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  dataset: cityscapes\n  size: [512, 1024]\ntrain:\n  steps: 100\n"
                 "distill:\n  weights: {hcl: 2.0}\n")
    cfg = config.load(f, ["train.steps=5"])
    assert cfg.data.dataset == "cityscapes" and cfg.data.size == (512, 1024)
    assert cfg.train.steps == 5 and cfg.distill.weights == {"hcl": 2.0}
    dumped = config.dump(cfg)
    assert "size:\n  - 512\n  - 1024" in dumped or "size: [512, 1024]" in dumped


@pytest.mark.parametrize("item,match", [
    ("train.step=5", r"unknown key 'train.step'; did you mean train.steps.*valid keys: data.dataset"),
    ("data.dataset=kitti", r"data.dataset='kitti': expected one of synthetic, cityscapes, acdc, nyuv2, voc"),
    ("data.size=128", r"data.size=128: expected 2 values like 128x256"),
    ("train.steps=ten", r"train.steps='ten': expected an integer"),
    ("train.batch_size=0", r"train.batch_size=0: expected an integer >= 1"),
    ("train.amp=int8", r"expected one of auto, off, bf16, fp16"),
    ("distill.ce_resolution=quater", r"distill.ce_resolution='quater': expected one of label, quarter \(did you mean"),
    ("data.size=16x16", r"must be >= 32"),
    ("nonsense", r"expected key=value"),
    # choice lists come from the registries: datasets, variants, distillation methods, artifact contracts
    ("distill.method=transkd-e", r"distill.method='transkd-e': expected one of none, kd, .* \(did you mean transkd-ea"),
    ("student.variant=mit_b9", r"student.variant='mit_b9': expected one of mit_b0, mit_b1"),
    ("export.input=rgb", r"export.input='rgb': expected one of float, uint8"),
    ("export.output=mask", r"expected one of logits, labels"),
    ("export.calibration_method=percentile", r"expected one of entropy, max"),
    ("export.int8_backend=tensorrt", r"expected one of torch, modelopt, ort"),
    ("export.opset=16", r"export.opset=16: expected >= 17"),
    ("export.parity_max_diff=0", r"export.parity_max_diff=0.0: expected a number > 0"),
    ("export.parity_min_agreement=1.5", r"export.parity_min_agreement=1.5: expected a number within \[0, 1\]"),
    # quantization-aware distillation (the qad stage); qad.weights' terms are checked against the method (test_qad)
    ("qad.steps=0", r"qad.steps=0: expected a number >= 1"),
    ("qad.lr=0", r"qad.lr=0.0: expected a number > 0"),
    ("qad.warmup_steps=-1", r"qad.warmup_steps=-1: expected a number >= 0"),
    ("qad.calibration_frames=0", r"qad.calibration_frames=0: expected a number >= 1"),
    ("qad.calibration_method=percentile", r"qad.calibration_method='percentile': expected one of entropy, max"),
    ("qad.learn_ranges=sometimes", r"qad.learn_ranges='sometimes': expected true or false"),
    ("qad.weights=3", r"qad.weights=3: expected a mapping of names like \{pea: 1.0\}"),
    ("qad.weights.kd.x=1", r"unknown key 'qad.weights.kd.x'"),
    ("qad=3", r"qad=3: expected a mapping of the qad.\* keys"),
])
def test_bad_values_are_one_line_errors(item, match):
    with pytest.raises(ConfigError, match=match) as e:
        config.load(None, [item] if "=" in item else [item]) if "=" in item else config.parse_overrides([item])
    assert "\n" not in str(e.value)


def test_bad_yaml_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        config.load(f)
    f.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.stepz' \(in .*bad.yaml\)"):
        config.load(f)


def test_the_qad_section_reads_from_yaml_and_shows_in_the_resolved_config(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("qad:\n  steps: 7\n  learn_ranges: false\n  weights: {hcl: 0}\n")
    cfg = config.load(f, ["qad.weights.temperature=2"])
    assert cfg.qad.steps == 7 and cfg.qad.learn_ranges is False
    assert cfg.qad.weights == {"hcl": 0, "temperature": 2}  # a mapping replaces the default {kd: 1.0}
    assert config.Config().qad.weights == {"kd": 1.0}
    dumped = config.load(None, []).to_dict()["qad"]
    assert set(dumped) == {"steps", "lr", "warmup_steps", "eval_every", "weights", "calibration_frames",
                           "calibration_method", "learn_ranges", "float_ends", "bits"}


def test_shipped_dataset_configs_load():
    shipped = sorted((config.Path(__file__).resolve().parents[1] / "pipeline" / "configs").glob("*.yaml"))
    assert [p.stem for p in shipped] == ["acdc", "cityscapes", "nyuv2", "voc"]
    for path in shipped:
        cfg = config.load(path)
        assert cfg.data.dataset == path.stem and cfg.train.lr == 6e-5 and cfg.teacher.variant == "mit_b2"


def test_off_is_a_word_on_the_command_line_and_in_yaml(tmp_path):
    # YAML 1.1 reads `off` as false; for the keys whose choices include "off" it is the word
    cfg = config.load(None, ["export.engines=off", "bench.cuda=off", "train.amp=off"])
    assert (cfg.export.engines, cfg.bench.cuda, cfg.train.amp) == ("off", "off", "off")
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  amp: off\nexport:\n  engines: off\n")
    cfg = config.load(str(f), [])
    assert (cfg.train.amp, cfg.export.engines) == ("off", "off")
    assert config.load(None, ["data.flip=false"]).data.flip is False  # booleans stay booleans


def test_registries_are_the_choice_lists():
    from pipeline.artifacts import INPUTS, OUTPUTS
    from pipeline.data import DATASETS
    from pipeline.distill import METHODS
    from pipeline.models import VARIANTS

    assert config.choices("data.dataset") == tuple(DATASETS) and config.choices("distill.method") == tuple(METHODS)
    assert config.choices("teacher.variant") == config.choices("student.variant") == tuple(VARIANTS)
    assert config.choices("export.input") == tuple(INPUTS) and config.choices("export.output") == tuple(OUTPUTS)
    assert config.choices("train.steps") is None
    config.validate(config.Config())  # every default is one of its choices


def test_export_size_falls_back_to_the_data_size():
    assert config.export_size(config.load(None, ["data.size=96x160"])) == (96, 160)
    cfg = config.load(None, ["data.size=96x160", "export.size=64x128"])
    assert config.export_size(cfg) == (64, 128) and config.bench_size(cfg) == (64, 128)
    assert config.bench_size(config.load(None, ["export.size=64x128", "bench.size=256x512"])) == (256, 512)


# ------------------------------------------------------------------------------------------------ the command line
def test_help_lists_stages_their_flags_and_every_key_with_its_default():
    code, out, err = run_cli("--help")
    assert code == 0, err
    for name in STAGES:
        assert f"\n  {name} " in out
    for key, value in config.keys().items():
        assert f"  {key:<28} {json.dumps(value, default=list)}\n" in out, key
    assert "segment-bag (stage flags):\n  --bag BAG" in out and "eval, export (stage flags):\n  --checkpoint" in out


def test_flags_belong_to_their_stages():
    flags = {name: owners for name, (_, owners) in stage_flags().items()}
    assert flags["--checkpoint"] == ["qad", "eval", "export"] and flags["--quarter-res"] == ["eval"]
    assert all(flags[f] == ["segment-bag"] for f in ("--bag", "--topic", "--mask-topic", "--overlay-topic"))
    assert all(flags[f] == ["segment-bag", "segment"] for f in ("--artifact", "--out", "--video", "--fps",
                                                                 "--no-overlay", "--batch"))
    assert flags["--source"] == flags["--skip-bad"] == ["segment"]
    assert not STAGES["distill"].flags and not STAGES["bench"].flags


def test_debug_shows_the_traceback(tmp_path):
    args = ("distill", "train.stepz=3", "--run-dir", str(tmp_path / "run"))
    code, _, err = run_cli(*args)
    assert code == 2 and err.startswith("error: unknown key 'train.stepz'") and err.count("\n") == 1
    code, _, err = run_cli(*args, "--debug")
    assert code != 0 and "Traceback (most recent call last)" in err and "ConfigError: unknown key" in err


# ------------------------------------------------------------------------------------------------ the package
def test_the_package_declares_its_console_scripts_and_packages():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts = project["project"]["scripts"]
    assert {"transkd", "transkd-latency", "transkd-accuracy", "transkd-flops", "transkd-trt-build"} <= set(scripts)
    assert scripts["transkd"] == "pipeline.run:main"
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target
    setuptools = project["tool"]["setuptools"]
    assert setuptools["packages"]["find"]["include"] == ["pipeline*", "trt*", "benchmarks*"]
    assert setuptools["package-data"]["pipeline"] == ["configs/*.yaml"]
    dynamic = setuptools["dynamic"]
    assert dynamic["dependencies"]["file"] == ["requirements.txt", "requirements-quant.txt"]
    assert dynamic["optional-dependencies"]["dev"]["file"] == ["requirements-dev.txt"]
    extras = [f for extra in dynamic["optional-dependencies"].values() for f in extra["file"]]
    for name in [*dynamic["dependencies"]["file"], *extras]:
        lines = [x.strip() for x in (ROOT / name).read_text().splitlines()]
        assert not [x for x in lines if x.startswith("-")], f"{name}: setuptools reads no pip options"
    torch_lines = [x for x in (ROOT / "requirements.txt").read_text().splitlines() if x.startswith("torch")]
    assert torch_lines == ["torch==2.13.0"]


def test_pipeline_does_not_import_benchmarks_and_scripts_do_not_edit_sys_path():
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        assert not {m for m in imported_modules(path) if m.split(".")[0] == "benchmarks"}, path
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        assert "sys.path" not in path.read_text(), path


def test_one_place_prints_errors():
    printers = [p.relative_to(ROOT).as_posix() for folder in ("pipeline", "benchmarks", "trt", "ros")
                for p in sorted((ROOT / folder).rglob("*.py")) if 'print(f"error: ' in p.read_text()]
    assert printers == ["pipeline/cli.py"]
