"""Data layer: dataset readers on real files, the synthetic generator, transforms and bad-data errors."""

import json
import logging
import pickle
import re
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.data import (
    DATASETS,
    EvalTransform,
    TrainTransform,
    build_dataset,
    ensure_synthetic,
    generate_synthetic,
    network_input,
)
from pipeline.data.classes import CITYSCAPES_CLASSES, NYUV2_CLASSES, VOC_CLASSES, VOC_PALETTE
from pipeline.errors import DataError, InputError
from pipeline.models.segformer import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(scope="module")
def root(synthetic) -> Path:
    return synthetic(8, 4, (64, 128))


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def write_palette_png(path: Path, indices: np.ndarray, palette) -> Path:
    """An 8-bit palette PNG, as VOC ships them (cv2 can read these but not write them)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = indices.shape
    rows = b"".join(b"\x00" + indices[y].astype(np.uint8).tobytes() for y in range(h))
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)  # 8-bit, colour type 3 = palette
    colours = bytes(np.asarray(palette, np.uint8).ravel())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"PLTE", colours)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def cityscapes_tree(root: Path, split: str = "train", label_ids=(7, 26, 0, 33), n: int = 3) -> list[Path]:
    """n samples of 8 x 16 in the Cityscapes layout, each label a band of `label_ids`; returns the image paths."""
    images = []
    for i in range(n):
        stem = f"aachen_{i:06d}_000019"
        rgb = np.full((8, 16, 3), 30 * i, np.uint8)
        images.append(write_png(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png", rgb))
        label = np.repeat(np.asarray(label_ids, np.uint8), 16 // len(label_ids))[None].repeat(8, 0)
        write_png(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png", label)
    return images


def one_line_error(fn, *fragments: str) -> str:
    with pytest.raises(DataError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --- synthetic set --------------------------------------------------------------------------------------------


def tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_is_deterministic_per_seed(tmp_path):
    a = tree_bytes(generate_synthetic(tmp_path / "a", 2, 1, (64, 128), seed=3, progress=False))
    b = tree_bytes(generate_synthetic(tmp_path / "b", 2, 1, (64, 128), seed=3, progress=False))
    c = tree_bytes(generate_synthetic(tmp_path / "c", 2, 1, (64, 128), seed=4, progress=False))
    assert a == b
    assert len([k for k in a if k.endswith(".png")]) == 6
    png = [k for k in a if k.endswith("_leftImg8bit.png")]
    assert all(a[k] != c[k] for k in png)
    assert json.loads(a["synthetic.json"]) == {**json.loads(a["synthetic.json"]), "train": 2, "val": 1,
                                               "size": [64, 128], "seed": 3}
    assert not list(tmp_path.glob(".*")), "the temp folder was left behind"


def test_synthetic_reads_as_cityscapes_with_every_class(root):
    train, val = build_dataset("synthetic", root, "train"), build_dataset("cityscapes", root, "val")
    assert (len(train), len(val)) == (8, 4)
    assert train.classes == list(CITYSCAPES_CLASSES) and train.num_classes == 19 and train.ignore_index == 255
    seen = set()
    for i in range(len(train)):
        rgb, label = train.read(i)
        assert rgb.shape == (64, 128, 3) and rgb.dtype == np.uint8 and label.shape == (64, 128)
        values = set(np.unique(label).tolist())
        assert values <= set(range(19)) | {255}
        seen |= values
    assert seen >= set(range(19)), f"classes never drawn: {sorted(set(range(19)) - seen)}"
    assert re.fullmatch(r"[a-z]+_000000_000019", train.name_of(0))
    sample = train[3]
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 64, 128)
    assert sample["label"].dtype == torch.int64 and sample["index"] == 3 and sample["name"] == train.name_of(3)


def test_ensure_synthetic_reuses_regenerates_and_refuses(tmp_path, root):
    stamp = (root / "synthetic.json").stat().st_mtime_ns
    assert ensure_synthetic(root, 8, 4, (64, 128), 0, progress=False) == root
    assert (root / "synthetic.json").stat().st_mtime_ns == stamp
    small = ensure_synthetic(tmp_path / "s", 2, 1, (64, 64), 0, progress=False)
    ensure_synthetic(small, 3, 1, (64, 64), 0, progress=False)
    assert len(build_dataset("synthetic", small, "train")) == 3
    mine = tmp_path / "mine"
    (mine / "keep.txt").parent.mkdir()
    (mine / "keep.txt").write_text("user data")
    one_line_error(lambda: ensure_synthetic(mine, 2, 1, (64, 64), 0, progress=False), str(mine), "refusing")
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]


# --- readers on hand-written fixtures -------------------------------------------------------------------------


def test_cityscapes_label_ids_mapped_and_train_ids_preferred(tmp_path):
    images = cityscapes_tree(tmp_path, n=2)
    ds = build_dataset("cityscapes", tmp_path, "train")
    assert np.unique(ds.read(0)[1]).tolist() == [0, 13, 18, 255]  # road, car, bicycle; 0 unlabeled is ignored
    train_ids = np.full((8, 16), 5, np.uint8)
    train_ids[:, :4] = 255
    write_png(tmp_path / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelTrainIds.png", train_ids)
    ds = build_dataset("cityscapes", tmp_path, "train")
    assert ds.files[1][1].name.endswith("_labelTrainIds.png") and ds.files[0][1].name.endswith("_labelIds.png")
    assert np.array_equal(ds.read(1)[1], train_ids)
    assert ds.name_of(1) == "aachen_000001_000019" and ds.files[1][0] == images[1]


def test_acdc_reader_walks_conditions(tmp_path):
    for condition in ("fog", "night"):
        for split in ("train", "train_ref"):
            stem = f"GOPR0{len(condition)}_frame_000041"
            write_png(tmp_path / "rgb_anon" / condition / split / "GOPR0" / f"{stem}_rgb_anon.png",
                      np.zeros((6, 10, 3), np.uint8))
        write_png(tmp_path / "gt" / condition / "train" / "GOPR0" / f"{stem}_gt_labelIds.png",
                  np.full((6, 10), 23, np.uint8))
    ds = build_dataset("acdc", tmp_path, "train")
    assert len(ds) == 2 and ds.classes == list(CITYSCAPES_CLASSES)
    assert [ds.name_of(i) for i in range(2)] == ["GOPR03_frame_000041", "GOPR05_frame_000041"]
    assert np.unique(ds.read(0)[1]).tolist() == [10]  # sky
    one_line_error(lambda: build_dataset("acdc", tmp_path, "val"), "rgb_anon/*/val", "not found")


@pytest.mark.parametrize("layout", ["{split}/image", "image/{split}"])
def test_nyuv2_reader_shifts_labels(tmp_path, layout):
    image_dir = tmp_path / layout.format(split="test")
    label_dir = tmp_path / layout.replace("image", "label").format(split="test")
    write_png(image_dir / "0003.png", np.zeros((4, 6, 3), np.uint8))
    assert cv2.imwrite(str(image_dir / "0001.jpg"), np.zeros((4, 6, 3), np.uint8))
    for stem in ("0001", "0003"):
        write_png(label_dir / f"{stem}.png", np.array([[0, 1, 2, 40, 40, 1]] * 4, np.uint8))
    ds = build_dataset("nyuv2", tmp_path, "test")
    assert len(ds) == 2 and ds.num_classes == 40 and ds.classes == list(NYUV2_CLASSES)
    assert [ds.name_of(i) for i in range(2)] == ["0001", "0003"]
    assert ds.read(1)[1][0].tolist() == [255, 0, 1, 39, 39, 0]
    write_png(label_dir / "0003.png", np.full((4, 6), 41, np.uint8))
    one_line_error(lambda: ds.read(1), str(label_dir / "0003.png"), "41")


def voc_tree(root: Path, ids=("2007_000032", "2007_000039")) -> None:
    palette = [list(c) for c in VOC_PALETTE] + [[0, 0, 0]] * (256 - len(VOC_PALETTE))
    palette[255] = [224, 224, 192]
    indices = np.zeros((6, 8), np.uint8)
    indices[1:5, 2:6], indices[0, :] = 15, 255  # a person with a "don't care" border row
    for i in ids:
        write_png(root / "JPEGImages" / f"{i}.jpg", np.zeros((6, 8, 3), np.uint8))
        write_palette_png(root / "SegmentationClass" / f"{i}.png", indices, palette)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text(ids[0] + "\n")


def test_voc_reader_decodes_palette_pngs(tmp_path):
    voc_tree(tmp_path)
    ds = build_dataset("voc", tmp_path, "train")
    assert len(ds) == 2 and ds.classes == list(VOC_CLASSES) and ds.name_of(0) == "2007_000032"
    label = ds.read(0)[1]
    assert label[0].tolist() == [255] * 8 and label[2, 3] == 15 and label[5, 0] == 0
    # a colour that is not in the VOC palette is refused with the file and the colour
    palette = [list(c) for c in VOC_PALETTE] + [[1, 2, 3]] * (256 - len(VOC_PALETTE))
    bad = write_palette_png(tmp_path / "SegmentationClass" / "2007_000039.png", np.full((6, 8), 30, np.uint8), palette)
    one_line_error(lambda: ds.read(1), str(bad), "(1, 2, 3)", "VOC palette")


def test_voc_prefers_segmentation_class_aug(tmp_path):
    voc_tree(tmp_path)
    write_png(tmp_path / "JPEGImages" / "2008_000001.jpg", np.zeros((6, 8, 3), np.uint8))
    write_png(tmp_path / "SegmentationClassAug" / "2008_000001.png", np.full((6, 8), 7, np.uint8))
    (tmp_path / "ImageSets/Segmentation/train_aug.txt").write_text(
        "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n/JPEGImages/2008_000001.jpg x\n")
    train, val = build_dataset("voc", tmp_path, "train"), build_dataset("voc", tmp_path, "val")
    assert [train.name_of(i) for i in range(len(train))] == ["2007_000032", "2008_000001"] and len(val) == 1
    assert train.files[1][1].parent.name == "SegmentationClassAug" and np.all(train.read(1)[1] == 7)
    assert train.files[0][1].parent.name == "SegmentationClass" and train.read(0)[1][2, 3] == 15


# --- transforms -----------------------------------------------------------------------------------------------


def two_halves(h: int = 40, w: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Red with label 1 on the left, blue with label 2 on the right: any flip must move both together."""
    rgb, label = np.zeros((h, w, 3), np.uint8), np.full((h, w), 2, np.uint8)
    rgb[:, : w // 3, 0], rgb[:, w // 3:, 2], label[:, : w // 3] = 255, 255, 1
    return rgb, label


@pytest.mark.parametrize("shape", [(40, 60), (20, 200), (90, 30)])
def test_train_transform_crops_exactly_with_valid_labels(shape):
    rgb, label = two_halves(*shape)
    t = TrainTransform(size=(32, 48), scale=(0.5, 2.0))
    for seed in range(6):
        image, target = t(rgb, label, np.random.default_rng(seed))
        assert image.shape == (3, 32, 48) and image.dtype == torch.float32
        assert target.shape == (32, 48) and target.dtype == torch.int64
        assert set(target.unique().tolist()) <= {1, 2, 255}


def test_train_transform_flips_image_and_label_together_and_repeats_per_seed():
    rgb, label = two_halves(32, 48)
    t = TrainTransform(size=(32, 48), scale=(1.0, 1.0), jitter=False)
    flipped = set()
    for seed in range(12):
        image, target = t(rgb, label, np.random.default_rng(seed))
        red = image[0] > image[2]
        assert torch.equal(red, target == 1)
        flipped.add(bool(target[0, 0] == 2))
    assert flipped == {True, False}
    jitter = TrainTransform(size=(24, 24))
    a, b = jitter(rgb, label, np.random.default_rng(5)), jitter(rgb, label, np.random.default_rng(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], jitter(rgb, label, np.random.default_rng(6))[0])


def test_eval_transform_keeps_full_resolution_label():
    rgb, label = two_halves(50, 101)
    image, target = EvalTransform(size=(32, 64))(rgb, label)
    assert image.shape == (3, 32, 65) and torch.equal(target, torch.from_numpy(label).long())
    mean = np.broadcast_to(np.round(IMAGENET_MEAN).astype(np.uint8), (2, 2, 3))
    assert np.abs(network_input(mean, None, IMAGENET_MEAN, IMAGENET_STD)).max() < 0.01


def test_network_input_is_one_preprocessing_for_rgb_bgr_float_and_uint8():
    """The one network-input function: RGB or BGR frames in, a float (normalised) or uint8 (camera BGR) network
    input out, at the size asked, into a caller's buffer when given."""
    rgb, _ = two_halves(50, 101)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    x = network_input(rgb, (32, 64), IMAGENET_MEAN, IMAGENET_STD)
    small = cv2.resize(rgb, (64, 32), interpolation=cv2.INTER_LINEAR)
    expected = (small.astype(np.float32) - np.float32(IMAGENET_MEAN)) * (1 / np.float32(IMAGENET_STD))
    assert x.shape == (3, 32, 64) and x.dtype == np.float32 and np.array_equal(x, expected.transpose(2, 0, 1))
    assert np.array_equal(network_input(bgr, (32, 64), IMAGENET_MEAN, IMAGENET_STD, bgr=True), x)
    buf = np.zeros((2, 3, 32, 64), np.float32)
    network_input(bgr, (32, 64), IMAGENET_MEAN, IMAGENET_STD, bgr=True, out=buf[1])
    assert np.array_equal(buf[1], x) and not buf[0].any()
    u8 = network_input(rgb, (32, 64), IMAGENET_MEAN, IMAGENET_STD, "uint8")
    assert u8.dtype == np.uint8 and np.array_equal(u8, small[:, :, ::-1])
    out = np.zeros((32, 64, 3), np.uint8)
    network_input(bgr, (32, 64), IMAGENET_MEAN, IMAGENET_STD, "uint8", bgr=True, out=out)
    assert np.array_equal(out, u8)
    with pytest.raises(InputError, match="H x W x 3"):
        network_input(rgb[:, :, 0], None, IMAGENET_MEAN, IMAGENET_STD)


def test_dataset_seeds_and_pickles(tmp_path):
    cityscapes_tree(tmp_path)
    ds = build_dataset("cityscapes", tmp_path, "train", TrainTransform(size=(8, 8), scale=(1.0, 2.0)))
    assert torch.equal(ds[(1, 42)]["image"], ds[(1, 42)]["image"])
    assert torch.equal(ds[1]["image"], ds[(1, 1)]["image"])
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers get a copy
    assert torch.equal(clone[(2, 7)]["label"], ds[(2, 7)]["label"])


# --- bad data -------------------------------------------------------------------------------------------------


def corrupt_image(root):
    image = cityscapes_tree(root)[1]
    image.write_bytes(b"not a png at all")
    return lambda: build_dataset("cityscapes", root, "train").read(1), str(image), "corrupt"


def size_mismatch(root):
    cityscapes_tree(root)
    label = root / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png"
    write_png(label, np.zeros((4, 16), np.uint8))
    return lambda: build_dataset("cityscapes", root, "train").read(1), str(label), "16x4 but image"


def label_out_of_range(root):
    cityscapes_tree(root, label_ids=(7, 40, 34, 255))
    return (lambda: build_dataset("cityscapes", root, "train")[0], "aachen_000000_000019_gtFine_labelIds.png",
            "label values 34, 40 outside")


def missing_split(root):
    cityscapes_tree(root)
    return lambda: build_dataset("cityscapes", root, "test"), str(root / "leftImg8bit" / "test"), "not found"


def empty_split(root):
    cityscapes_tree(root)
    (root / "leftImg8bit/val/aachen").mkdir(parents=True)
    (root / "gtFine/val").mkdir(parents=True)
    return lambda: build_dataset("cityscapes", root, "val"), str(root / "leftImg8bit" / "val"), "no samples"


def unknown_name(root):
    return lambda: build_dataset("kitti", root, "train"), "'kitti'", ", ".join(DATASETS)


def missing_root(root):
    return lambda: build_dataset("voc", root / "nowhere", "train"), str(root / "nowhere"), "not found"


@pytest.mark.parametrize("case", [corrupt_image, size_mismatch, label_out_of_range, missing_split, empty_split,
                                  unknown_name, missing_root])
def test_bad_data_is_one_line_naming_the_file(tmp_path, case):
    fn, where, problem = case(tmp_path)
    one_line_error(fn, where, problem)


def test_skip_bad_replaces_counts_and_logs(tmp_path, caplog):
    images = cityscapes_tree(tmp_path, n=3)
    images[1].write_bytes(b"\x89PNG truncated")
    images[2].write_bytes(b"")
    skip_log = tmp_path / "skipped.txt"
    ds = build_dataset("cityscapes", tmp_path, "train", skip_bad=True, skip_log=skip_log)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        assert ds[1]["name"] == "aachen_000000_000019"  # 1 and 2 are bad: wraps around to 0
        assert ds[2]["index"] == 0 and ds[0]["index"] == 0
    assert ds.skipped == {str(images[1]), str(images[2])}
    lines = skip_log.read_text().splitlines()
    assert lines == [f"{images[1]}: unreadable or corrupt image", f"{images[2]}: unreadable or corrupt image"]
    assert sum("skipping bad sample" in r.message for r in caplog.records) == 2
    strict = build_dataset("cityscapes", tmp_path, "train")
    one_line_error(lambda: strict[2], str(images[2]))
