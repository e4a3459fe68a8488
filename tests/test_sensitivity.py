"""pipeline/sensitivity.py and benchmarks/int8_sensitivity.py: the ranking of quantization groups, the mixed-precision
chooser and the curve, on a real fake-quantized student with one group miscalibrated. Its validation labels are its
own FP32 predictions, so the FP32 student scores exactly 100 % mIoU and a drop is exactly what INT8 costs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline import quant
from pipeline.config import Config, ExportConfig, apply, dump
from pipeline.errors import ExportError
from pipeline.evaluate import score
from pipeline.export import graph_inputs
from pipeline.infer import Segmenter, TorchBackend
from pipeline.models import save_model
from pipeline.models.checkpoints import checkpoint_metadata
from pipeline.sensitivity import Curve, Sensitivity, choose, curve, plot, rank, table
from tests.conftest import run_cli, splits, spread_student

SIZE = (64, 128)
RUINED = "encoder.stages.2.blocks.0.ffn"
BUDGET = 10.0  # mIoU points: all INT8 with the ruined range loses about 23, with that group float about 6


def self_labelled(source: Path, root: Path, model) -> None:
    """A copy of a synthetic set whose validation labels are `model`'s predictions (train ids, which the reader takes
    over the labelIds beside them)."""
    shutil.copytree(source, root)
    _, val = splits(root)
    seg = Segmenter(TorchBackend(model, "cpu"), checkpoint_metadata(model), Path("student"), size=SIZE)
    for i, (_, label) in enumerate(val.files):
        rgb, _ = val.read(i)
        ids = seg.predict(np.ascontiguousarray(rgb[:, :, ::-1]))
        assert cv2.imwrite(str(label).replace("_labelIds.png", "_labelTrainIds.png"), ids)


@pytest.fixture(scope="module")
def ruined(synthetic, tmp_path_factory):
    """(FP32 student, its fake-quant copy calibrated on 4 training frames with one activation range of RUINED set 100x
    too small, the self-labelled validation set of 4 frames)."""
    student = spread_student()
    root = tmp_path_factory.mktemp("self-labelled") / "synthetic"
    self_labelled(synthetic(), root, student)
    train, val = splits(root)
    qm = quant.quantize(student)
    frames = graph_inputs(train, 4, ExportConfig(size=SIZE), checkpoint_metadata(student).normalization)
    quant.calibrate(qm, [torch.from_numpy(x) for x in frames], "max")
    name, q = next((n, q) for n, q in quant.act_quantizers(qm) if quant.group_of(n) == RUINED)
    with torch.no_grad():
        q.amax.mul_(0.01)  # e.g. calibrated on frames that never light this channel up
    return student, qm, val


@pytest.fixture(scope="module")
def ranking(ruined):
    student, qm, val = ruined
    quant.set_float(qm, ["head.proj.0"])
    records = rank(qm, student, val, frames=2, sqnr_frames=2, size=SIZE)
    return records, quant.float_groups(qm)


def test_ranking_puts_the_miscalibrated_group_first_and_restores_the_float_groups(ruined, ranking):
    _, qm, _ = ruined
    records, after = ranking
    assert after == ["head.proj.0"]
    assert sorted(r.group for r in records) == sorted(quant.groups(qm))
    first, rest = records[0], records[1:]
    assert first.group == RUINED
    # alone in INT8 it is the noisiest by a wide margin, and floating it alone buys the most
    assert first.only_int8_sqnr_db < min(r.only_int8_sqnr_db for r in rest) - 3
    assert first.only_float_sqnr_gain_db > max(r.only_float_sqnr_gain_db for r in rest)
    assert first.only_int8_drop > 1 and first.only_float_gain > max(r.only_float_gain for r in rest)
    lines = table(records).splitlines()
    assert len(lines) == 2 + len(records) and lines[2].startswith(f"| 1 | {RUINED} |")


def test_chooser_keeps_the_miscalibrated_group_float_to_meet_the_budget(ruined):
    student, qm, val = ruined
    quant.set_float(qm, [])
    choice = choose(qm, student, val, BUDGET, sqnr_frames=2, size=SIZE)  # its own SQNR ranking, as export runs it
    assert choice.fp32_miou == 1.0 and choice.frames == len(val)
    k0, all_int8 = choice.trajectory[0]
    assert k0 == 0 and 100 * (1 - all_int8) > BUDGET  # the budget is not met without a float group
    assert choice.float_groups[0] == RUINED and choice.order[0] == RUINED
    assert choice.drop <= BUDGET and dict(choice.trajectory)[len(choice.float_groups)] == choice.miou
    # the model is left as chosen: scored again from scratch, it gives the measured mIoU
    assert sorted(quant.float_groups(qm)) == sorted(choice.float_groups)
    seg = Segmenter(TorchBackend(qm, "cpu"), checkpoint_metadata(qm), Path("mixed"), size=SIZE)
    assert score(seg, val, progress=False).miou == pytest.approx(choice.miou, abs=1e-12)
    record = json.loads(json.dumps(choice.record()))
    assert record["float_groups"] == choice.float_groups and record["drop"] == pytest.approx(choice.drop)

    none_needed = choose(qm, student, val, 100.0, ranking=[Sensitivity(RUINED, 0, 0, 0)], size=SIZE)
    assert none_needed.float_groups == [] and quant.float_groups(qm) == [] and len(none_needed.trajectory) == 1


def test_curve_runs_from_all_float_to_all_int8_and_plots(ruined, ranking, tmp_path):
    student, qm, val = ruined
    records, _ = ranking
    quant.set_float(qm, ["head.proj.1"])
    c = curve(qm, student, val, records, frames=2, sqnr_frames=2, size=SIZE)
    assert quant.float_groups(qm) == ["head.proj.1"]
    assert c.order == [r.group for r in records][::-1] and len(c.miou) == len(c.order) + 1 == len(c.sqnr_db)
    assert c.fp32_miou == 1.0 and c.miou[0] > 0.99 and c.sqnr_db[0] > 60  # all float: the deploy copy's rounding
    assert c.miou[-1] < c.miou[-2] and c.sqnr_db[-1] < c.sqnr_db[-2] - 3  # the ruined group goes INT8 last
    png = tmp_path / "curve.png"
    plot(c, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["curve.png"]
    with pytest.raises(OSError, match="curve.png"):
        plot(Curve(c.order, c.miou, c.fp32_miou, c.frames), tmp_path / "missing" / "curve.png")


@pytest.mark.parametrize("call, message", [
    (lambda s, q, v: choose(q, s, v, -1.0), "max_drop -1.0: expected mIoU points >= 0"),
    (lambda s, q, v: choose(q, s, v, math.nan), "max_drop nan"),
    (lambda s, q, v: choose(q, s, v, 1.0, [Sensitivity("encoder.stages.9.embed", 0, 0, 0)]),
     "groups ['encoder.stages.9.embed'] are not in the model"),
    (lambda s, q, v: curve(q, s, v, [Sensitivity(RUINED, 0, 0, 0)] * 2), "appears twice"),
    (lambda s, q, v: rank(s, s, v), "not fake-quantized"),
    (lambda s, q, v: rank(q, s, v, sqnr_frames=0), "sqnr_frames 0 must be >= 1"),
])
def test_bad_inputs_are_one_line_and_change_nothing(ruined, call, message):
    student, qm, val = ruined
    quant.set_float(qm, ["head.proj.2"])
    with pytest.raises(ExportError) as err:
        call(student, qm, val)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert quant.float_groups(qm) == ["head.proj.2"]


def test_benchmark_writes_its_table_json_and_plot(synthetic, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_model(spread_student(), run / "student.safetensors")
    data = tmp_path / "synthetic"  # a copy: the run's config must name its parameters, or it is regenerated
    shutil.copytree(synthetic(), data)
    cfg = apply(Config(), {"data.root": str(data), "data.size": list(SIZE), "data.synthetic_train": 4,
                           "data.synthetic_val": 4, "data.synthetic_size": [96, 192]})
    (run / "config.yaml").write_text(dump(cfg))
    out = tmp_path / "out"
    code, stdout, err = run_cli("benchmarks/int8_sensitivity.py", "--run-dir", str(run), "--frames", "1",
                                "--sqnr-frames", "1", "--calibration-frames", "1", "--method", "max",
                                "--max-drop", "100", "--out", str(out), module=None)
    assert code == 0, err
    assert stdout.startswith("| # | group |") and "max drop 100: float none" in stdout
    result = json.loads((out / "sensitivity.json").read_text())
    assert len(result["ranking"]) == 23 and len(result["curve"]["miou"]) == 24
    assert result["calibration"] == {"frames": 1, "method": "max", "split": "train", "size": list(SIZE)}
    assert "![mIoU against the number of INT8 groups](sensitivity.png)" in (out / "sensitivity.md").read_text()
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmark_refuses_a_folder_that_is_no_run_in_one_line(tmp_path):
    code, _, err = run_cli("benchmarks/int8_sensitivity.py", "--run-dir", str(tmp_path / "nope"), module=None)
    assert code == 2 and err.count("\n") == 1 and "nope/config.yaml: not found" in err, err
