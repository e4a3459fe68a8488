"""Configuration: defaults, YAML, key=value overrides, one-line errors."""

import pytest

from pipeline import config
from pipeline.errors import ConfigError


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
    ("data.size=16x16", r"must be >= 32"),
    ("nonsense", r"expected key=value"),
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
