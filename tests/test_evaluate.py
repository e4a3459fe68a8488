"""Evaluation: confusion-matrix mIoU, full-resolution scoring, distributed reduction, and the Cityscapes writer
checked against the official cityscapesscripts evaluator."""

import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Subset

from pipeline.data import EvalTransform, build_dataset
from pipeline.data.classes import CITYSCAPES_LABEL_IDS
from pipeline.errors import ConfigError, InputError
from pipeline.evaluate import ConfusionMatrix, evaluate, score, spread, write_cityscapes
from pipeline.infer import Segmenter, TorchBackend
from pipeline.models import build_model
from pipeline.models.checkpoints import checkpoint_metadata
from tests.conftest import free_port, spread_student


@pytest.fixture(scope="module")
def data(synthetic) -> Path:
    return synthetic(2, 5, (96, 192), 3)


def test_confusion_matrix_on_a_hand_counted_example():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 3]])
    cm = ConfusionMatrix(4)
    cm.update(pred, label)
    r = cm.result(["a", "b", "c", "d"])
    # class 0: tp 1, fn 1 (0->1), fp 1 (2->0): 1/3; class 1: tp 2, fp 1: 2/3; class 2: tp 1, fn 1: 1/2
    # class 3: predicted only on ignored pixels, so absent: NaN and left out of the mean
    assert r.iou[:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(r.iou[3])
    assert r.miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert r.pixel_acc == pytest.approx(4 / 6)
    assert r.mean_acc == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert r.pixels == [2, 2, 2, 0]
    d = r.to_dict()
    assert d["per_class"]["d"]["iou"] is None and d["confusion"][0] == [1, 1, 0, 0]
    table = r.table()
    assert "mIoU" in table and "50.00" in table and table.splitlines()[4].split()[1] == "-"


def test_confusion_matrix_matches_numpy_on_random_maps():
    rng = np.random.default_rng(0)
    cm = ConfusionMatrix(7)
    labels, preds = [], []
    for _ in range(3):
        label = rng.integers(0, 7, (2, 30, 40))
        label[rng.random(label.shape) < 0.2] = 255
        pred = rng.integers(0, 7, (2, 30, 40))
        cm.update(torch.from_numpy(pred), torch.from_numpy(label))
        labels.append(label.ravel())
        preds.append(pred.ravel())
    label, pred = np.concatenate(labels), np.concatenate(preds)
    keep = label != 255
    r = cm.result()
    for c in range(7):
        inter = np.sum((label == c) & (pred == c) & keep)
        union = np.sum(((label == c) | (pred == c)) & keep)
        assert r.iou[c] == pytest.approx(inter / union)
    assert r.pixel_acc == pytest.approx(np.mean(label[keep] == pred[keep]))


def test_confusion_matrix_refuses_bad_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(InputError, match="differ in shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(InputError, match="label id 5 is outside 0..2"):
        cm.update(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 5, 255]))


def test_evaluate_scores_logits_upsampled_to_the_full_label_resolution(data):
    val = build_dataset("synthetic", data, "val", EvalTransform(size=(64, 128)))
    model = spread_student(seed=1)
    result = evaluate(model, DataLoader(val, batch_size=1), num_classes=19, progress=False)
    # the labels stay at 96x192 while the images go in at 64x128: every non-ignored label pixel is counted
    labelled = sum(int((val.read(i)[1] != 255).sum()) for i in range(len(val)))
    assert sum(result.pixels) == labelled
    # the same score computed here from the model's logits, upsampled by hand
    expected = ConfusionMatrix(19)
    with torch.no_grad():
        for i in range(len(val)):
            s = val[i]
            logits = torch.nn.functional.interpolate(model(s["image"][None]), size=s["label"].shape,
                                                     mode="bilinear", align_corners=False)
            expected.update(logits.argmax(1)[0], s["label"])
    assert result.miou == pytest.approx(expected.result().miou)
    assert sum(not math.isnan(v) for v in result.iou) >= 4  # a real spread of classes, not one constant guess
    # the reference's shortcut scores against labels at the logits' 1/4 resolution instead
    quarter = evaluate(model, DataLoader(val, batch_size=1), num_classes=19, quarter_res=True, progress=False)
    assert sum(quarter.pixels) < labelled / 16 * 1.2
    assert model.training is False


def test_evaluate_runs_the_network_in_the_autocast_dtype_and_scores_as_float32_does(data):
    val = build_dataset("synthetic", data, "val", EvalTransform(size=(64, 128)))
    model = spread_student(seed=1)
    seen = []
    model.encoder.stages[0].embed.proj.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    ref = evaluate(model, DataLoader(val, batch_size=1), num_classes=19, progress=False)
    assert set(seen) == {torch.float32}
    seen.clear()
    bf16 = evaluate(model, DataLoader(val, batch_size=1), num_classes=19, amp_dtype=torch.bfloat16, progress=False)
    assert set(seen) == {torch.bfloat16} and len(seen) == len(val)
    assert bf16.pixels == ref.pixels  # the same pixels counted, argmax taken on float32 logits
    assert bf16.pixel_acc == pytest.approx(ref.pixel_acc, abs=0.01)  # bf16 moves few argmaxes


def test_score_counts_a_segmenters_frames_with_the_evaluators_core(data):
    """score(): any artifact through its Segmenter, raw BGR frames in, class ids at full label resolution out,
    counted like evaluate() counts a model over a DataLoader."""
    assert spread(5, 2) == [0, 4] and spread(5, 0) == spread(5, 9) == [0, 1, 2, 3, 4]
    val = build_dataset("synthetic", data, "val", EvalTransform(size=(64, 128)))
    model = spread_student(seed=1)
    seg = Segmenter(TorchBackend(model, "cpu"), checkpoint_metadata(model), "student", size=(64, 128))
    two = score(seg, val, frames=2, progress=False)
    assert sum(two.pixels) == sum(int((val.read(i)[1] != 255).sum()) for i in (0, 4))
    ours = score(seg, val, progress=False)
    ref = evaluate(model, DataLoader(val, batch_size=1), num_classes=19, classes=val.classes, progress=False)
    assert ours.pixels == ref.pixels and ours.classes == ref.classes
    assert ours.miou == pytest.approx(ref.miou, abs=2e-3)
    other = build_model("mit_b0", num_classes=21)
    with pytest.raises(InputError, match="predicts 21 classes"):
        score(Segmenter(TorchBackend(other, "cpu"), checkpoint_metadata(other), "other"), val, progress=False)


def _shard_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    val = build_dataset("synthetic", root, "val", EvalTransform(size=(64, 128)))
    shard = Subset(val, range(rank, len(val), world))
    result = evaluate(spread_student(seed=1), DataLoader(shard, batch_size=1), num_classes=19, progress=False)
    if rank == 0:
        torch.save(torch.tensor(result.confusion), out)
    torch.distributed.destroy_process_group()


def test_shards_of_two_gloo_processes_sum_to_the_whole_split(tmp_path, data):
    out = tmp_path / "cm.pt"
    mp.spawn(_shard_worker, args=(2, free_port(), str(data), str(out)), nprocs=2, join=True)
    val = build_dataset("synthetic", data, "val", EvalTransform(size=(64, 128)))
    whole = evaluate(spread_student(seed=1), DataLoader(val, batch_size=1), num_classes=19, progress=False)
    assert torch.equal(torch.load(out), torch.tensor(whole.confusion))


def test_cityscapesscripts_scores_our_written_predictions_as_we_do(tmp_path, data):
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    val = build_dataset("synthetic", data, "val", EvalTransform(size=(64, 128)))
    model = spread_student(seed=1)
    loader = DataLoader(val, batch_size=1)
    ours = evaluate(model, loader, num_classes=19, classes=val.classes, progress=False)
    files = write_cityscapes(model, loader, tmp_path / "results", progress=False)

    assert sorted(p.name for p in files) == sorted(f"{val.name_of(i)}_leftImg8bit.png" for i in range(len(val)))
    first = cv2.imread(str(files[0]), cv2.IMREAD_UNCHANGED)
    assert first.dtype == np.uint8 and first.shape == (96, 192)  # full label resolution, one channel
    assert set(np.unique(first)) <= set(CITYSCAPES_LABEL_IDS)  # labelIds, not train ids

    args = ev.args
    args.evalInstLevelScore, args.JSONOutput, args.quiet, args.colorized = False, False, True, False
    args.bold = args.nocol = ""
    args.predictionPath, args.predictionWalk = str(tmp_path / "results"), None
    ground_truth = sorted(str(p) for p in data.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    predictions = [ev.getPrediction(args, gt) for gt in ground_truth]  # the official filename matching
    theirs = ev.evaluateImgLists(predictions, ground_truth, args)

    assert theirs["averageScoreClasses"] == pytest.approx(ours.miou, abs=1e-9)
    for name, iou in zip(val.classes, ours.iou):
        their = theirs["classScores"][name]
        assert (math.isnan(iou) and math.isnan(their)) or their == pytest.approx(iou, abs=1e-9), name


def test_write_cityscapes_refuses_a_model_of_another_label_set(tmp_path, data):
    val = build_dataset("synthetic", data, "val", EvalTransform(size=(64, 128)))
    with pytest.raises(ConfigError, match="21 classes"):
        write_cityscapes(build_model("mit_b0", num_classes=21), DataLoader(val), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
