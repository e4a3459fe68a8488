"""Segmentation datasets on their published on-disk layouts: Cityscapes, ACDC, NYUv2, Pascal VOC 2012, synthetic."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.data.classes import (
    CITYSCAPES_LABEL_IDS,
    IGNORE_INDEX,
    LABEL_SETS,
    VOC_IGNORE_COLOUR,
    VOC_PALETTE,
    cityscapes_label_to_train_lut,
)
from pipeline.data.transforms import EvalTransform
from pipeline.errors import DataError

log = logging.getLogger("pipeline.data")

DATASETS = ("synthetic", "cityscapes", "acdc", "nyuv2", "voc")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def sample_error(path: Path | str, problem: str) -> DataError:
    """A one-line DataError naming the file; `.path` and `.problem` let skip_bad record it."""
    problem = " ".join(str(problem).split())
    err = DataError(f"{path}: {problem}")
    err.path, err.problem = str(path), problem
    return err


def imread(path: Path, flags: int) -> np.ndarray:
    """cv2 decode that tells a missing file from an undecodable one (cv2.imread returns None for both)."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise sample_error(path, f"cannot read file ({e.strerror or e})") from None
    img = cv2.imdecode(data, flags) if data.size else None
    if img is None:
        raise sample_error(path, "unreadable or corrupt image")
    return img


def _values(values: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit].tolist())
    return shown + (f" (+{len(values) - limit} more)" if len(values) > limit else "")


class IdLabels:
    """Single-channel label PNGs of raw ids, mapped to train ids through a 256-entry lookup table; any raw value
    outside `valid` is an error that names the file and the values."""

    def __init__(self, lut: Sequence[int], valid: Iterable[int], what: str) -> None:
        self.lut = np.asarray(lut, np.uint8)
        self.valid = np.zeros(256, bool)
        self.valid[list(valid)] = True
        self.what = what

    def __call__(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if raw.ndim == 3 and raw.shape[2] > 1:
            raise sample_error(path, f"expected a single-channel label image of {self.what}, got {raw.shape[2]} "
                                     "channels")
        raw = raw.reshape(raw.shape[:2])
        if raw.dtype != np.uint8:
            # some exports store ids as 16-bit PNGs; the values, not the container, are what must be valid
            if raw.dtype.kind not in "ui":
                raise sample_error(path, f"label pixels are {raw.dtype}; expected integer {self.what}")
            out = (raw < 0) | (raw > 255)
            if out.any():
                raise sample_error(path, f"label values {_values(np.unique(raw[out]))} outside {self.what}")
            raw = raw.astype(np.uint8)
        bad = ~self.valid[raw]
        if bad.any():
            raise sample_error(path, f"label values {_values(np.unique(raw[bad]))} outside {self.what}")
        return self.lut[raw]


def _identity_lut() -> list[int]:
    return list(range(256))


_CITYSCAPES_VALID = [*range(34), IGNORE_INDEX]
CITYSCAPES_LABEL_IDS_CODEC = IdLabels(cityscapes_label_to_train_lut(), _CITYSCAPES_VALID,
                                      "Cityscapes labelIds 0..33 and 255")
CITYSCAPES_TRAIN_IDS_CODEC = IdLabels(_identity_lut(), [*range(len(CITYSCAPES_LABEL_IDS)), IGNORE_INDEX],
                                      "Cityscapes train ids 0..18 and 255")


class CityscapesLabels:
    """`*_labelTrainIds.png` are read as train ids, any other label file as Cityscapes labelIds."""

    def __call__(self, raw: np.ndarray, path: Path) -> np.ndarray:
        codec = CITYSCAPES_TRAIN_IDS_CODEC if path.name.endswith("_labelTrainIds.png") else CITYSCAPES_LABEL_IDS_CODEC
        return codec(raw, path)


# NYUv2-40 files store labels 1..40 and 0 for unlabeled: train id = label - 1, 0 -> ignore (TransKD does this).
_NYU_LUT = [IGNORE_INDEX] + [i - 1 for i in range(1, 41)] + [IGNORE_INDEX] * 215
NYUV2_CODEC = IdLabels(_NYU_LUT, [*range(41), IGNORE_INDEX], "NYUv2-40 labels 0..40 and 255")
VOC_INDEX_CODEC = IdLabels(_identity_lut(), [*range(len(VOC_PALETTE)), IGNORE_INDEX], "VOC class indices 0..20 and 255")


class VocLabels:
    """VOC label PNGs: palette PNGs (decoded by cv2 to colours, mapped back to indices through the VOC palette)
    or single-channel index PNGs such as SegmentationClassAug."""

    def __init__(self) -> None:
        colours = [*VOC_PALETTE, VOC_IGNORE_COLOUR]
        indices = [*range(len(VOC_PALETTE)), IGNORE_INDEX]
        keys = np.array([(r << 16) | (g << 8) | b for r, g, b in colours], np.int64)
        order = np.argsort(keys)
        self.keys, self.indices = keys[order], np.asarray(indices, np.uint8)[order]

    def __call__(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if raw.ndim == 2 or raw.shape[2] == 1:
            return VOC_INDEX_CODEC(raw, path)
        if raw.dtype != np.uint8:
            raise sample_error(path, f"expected an 8-bit palette or index PNG, got {raw.dtype}")
        bgr = raw[..., :3].astype(np.int64)  # a tRNS chunk makes cv2 add an alpha channel: colours are what count
        key = (bgr[..., 2] << 16) | (bgr[..., 1] << 8) | bgr[..., 0]
        pos = np.clip(np.searchsorted(self.keys, key), 0, len(self.keys) - 1)
        known = self.keys[pos] == key
        if not known.all():
            unknown = np.unique(key[~known])
            shown = [f"({k >> 16}, {(k >> 8) & 255}, {k & 255})" for k in unknown[:5].tolist()]
            more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise sample_error(path, f"colours {', '.join(shown)}{more} are not in the VOC palette")
        return self.indices[pos]


class SegDataset(torch.utils.data.Dataset):
    """(image, label) file pairs with one label set: `read(i)` gives RGB and train ids, `ds[i]` or
    `ds[(i, seed)]` the transformed sample as a dict of image, label, index and name."""

    def __init__(self, name: str, split: str, root: Path | str, files: Sequence[tuple[Path, Path]],
                 decode_label: Callable[[np.ndarray, Path], np.ndarray], transform: Callable | None = None,
                 skip_bad: bool = False, skip_log: Path | str | None = None, image_suffix: str = "") -> None:
        self.name, self.split, self.root = name, split, Path(root)
        classes, palette = LABEL_SETS[name]
        self.classes: list[str] = list(classes)
        self.palette: list[list[int]] = [list(c) for c in palette]
        self.num_classes = len(self.classes)
        self.ignore_index = IGNORE_INDEX
        self.files: list[tuple[Path, Path]] = [(Path(i), Path(lb)) for i, lb in files]
        self.decode_label = decode_label  # raw label image -> train ids, validated
        self.transform = transform if transform is not None else EvalTransform(size=None)
        self.skip_bad = skip_bad
        self.skip_log = Path(skip_log) if skip_log is not None else None
        self.skipped: set[str] = set()  # per process: DataLoader workers each keep their own, the log has all
        self.image_suffix = image_suffix

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"SegDataset({self.name!r}, split={self.split!r}, root='{self.root}', samples={len(self)})"

    def name_of(self, i: int) -> str:
        """A stable sample id: the Cityscapes-style `{city}_{seq}_{frame}` stem, or the file stem."""
        image = self.files[i][0]
        if self.image_suffix and image.name.endswith(self.image_suffix):
            return image.name[: -len(self.image_suffix)]
        return image.stem

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded sample i: RGB uint8 H x W x 3 and train ids uint8 H x W (255 = ignore), validated."""
        image_path, label_path = self.files[i]
        # EXIF rotation would turn a photo but not its label PNG: pixels must stay aligned with the label
        bgr = imread(image_path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        label = self.decode_label(imread(label_path, cv2.IMREAD_UNCHANGED), label_path)
        if bgr.shape[:2] != label.shape:
            raise sample_error(label_path, f"label is {label.shape[1]}x{label.shape[0]} but image {image_path.name} "
                                           f"is {bgr.shape[1]}x{bgr.shape[0]}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), label

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        index = int(index)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"{self}: index {index} out of range")
        index %= n
        # without a seed the index is the seed, so evaluation (no randomness anyway) and debugging repeat exactly
        rng = np.random.default_rng(index if seed is None else seed)
        i = index
        for _ in range(n):
            try:
                rgb, label = self.read(i)
                break
            except DataError as e:
                if not self.skip_bad:
                    raise
                self._skip(e)
                i = (i + 1) % n
        else:
            raise DataError(f"{self.root}: every sample of split {self.split!r} is unreadable (see the log)")
        image, target = self.transform(rgb, label, rng)
        return {"image": image, "label": target, "index": i, "name": self.name_of(i)}

    def _skip(self, err: DataError) -> None:
        path = getattr(err, "path", str(err))
        if path in self.skipped:
            return
        self.skipped.add(path)
        log.warning("skipping bad sample: %s", err)
        if self.skip_log is not None:
            # one short append per line: concurrent DataLoader workers do not interleave within a line
            with open(self.skip_log, "a") as f:
                f.write(f"{err}\n")


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
    return path


def _images(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def _no_samples(folder: Path | str, expected: str) -> DataError:
    return DataError(f"{folder}: no samples (expected {expected})")


def cityscapes_files(root: Path, split: str, image_dir: str = "leftImg8bit", label_dir: str = "gtFine",
                     image_suffix: str = "_leftImg8bit.png", label_prefix: str = "_gtFine",
                     groups: Sequence[str] = ("",)) -> list[tuple[Path, Path]]:
    """Cityscapes layout: `{root}/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png` with
    `{root}/gtFine/{split}/{city}/{stem}_gtFine_labelTrainIds.png` when it exists (train ids 0..18, 255), else
    `..._gtFine_labelIds.png` (labelIds 0..33, mapped to train ids). `groups` are extra folders between the
    image/label folder and the split (ACDC's conditions)."""
    files = []
    for group in groups:
        images = _require_dir(root / image_dir / group / split, f"{split} split")
        labels = _require_dir(root / label_dir / group / split, f"{split} label")
        for image in _images(images, f"*/*{image_suffix}"):
            stem = image.name[: -len(image_suffix)]
            folder = labels / image.parent.name
            train_ids = folder / f"{stem}{label_prefix}_labelTrainIds.png"
            files.append((image, train_ids if train_ids.is_file() else folder / f"{stem}{label_prefix}_labelIds.png"))
    if not files:
        raise _no_samples(root / image_dir / ("*" if groups != ("",) else "") / split,
                          f"*/*{image_suffix} in the {split} split")
    return files


def acdc_files(root: Path, split: str) -> list[tuple[Path, Path]]:
    """ACDC layout: `{root}/rgb_anon/{condition}/{split}/{sequence}/{stem}_rgb_anon.png` with
    `{root}/gt/{condition}/{split}/{sequence}/{stem}_gt_labelTrainIds.png` or `..._gt_labelIds.png` (Cityscapes
    ids); the conditions are whichever of fog, night, rain, snow (or others) have the split."""
    top = _require_dir(root / "rgb_anon", "ACDC rgb_anon")
    conditions = sorted(c.name for c in top.iterdir() if (c / split).is_dir())
    if not conditions:
        raise DataError(f"{top}/*/{split}: split folder not found in any condition")
    return cityscapes_files(root, split, "rgb_anon", "gt", "_rgb_anon.png", "_gt", conditions)


def nyuv2_files(root: Path, split: str) -> list[tuple[Path, Path]]:
    """NYUv2 (40 classes) exported as folders: `{root}/{split}/image/{stem}.png|jpg` with
    `{root}/{split}/label/{stem}.png`, or `{root}/image/{split}/...` with `{root}/label/{split}/...`. Labels are
    single-channel 1..40 with 0 = unlabeled (train id = label - 1, 0 -> 255)."""
    layouts = ((root / split / "image", root / split / "label"), (root / "image" / split, root / "label" / split))
    images, labels = next(((i, lb) for i, lb in layouts if i.is_dir()), (None, None))
    if images is None:
        raise DataError(f"{root / split / 'image'}: {split} split folder not found (nor {root / 'image' / split})")
    _require_dir(labels, f"{split} label")
    files = [(p, labels / f"{p.stem}.png") for p in _images(images, "*") if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise _no_samples(images, "*.png or *.jpg images")
    return files


def voc_files(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Pascal VOC 2012: ids from `{root}/ImageSets/Segmentation/{split}.txt`, images `{root}/JPEGImages/{id}.jpg`,
    labels `{root}/SegmentationClass/{id}.png` (palette PNGs; the (224, 224, 192) border is ignored). With the SBD
    augmentation, `{root}/SegmentationClassAug/{id}.png` (single-channel indices) is preferred per file, and the
    train split reads `ImageSets/Segmentation/train_aug.txt` when it exists."""
    images = _require_dir(root / "JPEGImages", "VOC JPEGImages")
    lists = _require_dir(root / "ImageSets" / "Segmentation", "VOC ImageSets/Segmentation")
    aug = root / "SegmentationClassAug"
    plain = root / "SegmentationClass"
    if not aug.is_dir():
        _require_dir(plain, "VOC SegmentationClass")
    listing = lists / f"{split}.txt"
    if split == "train" and aug.is_dir() and (lists / "train_aug.txt").is_file():
        listing = lists / "train_aug.txt"
    if not listing.is_file():
        raise DataError(f"{listing}: split list not found")
    ids = []
    for line in listing.read_text().splitlines():
        if line.strip():
            # DeepLab-style lists give "/JPEGImages/x.jpg /SegmentationClassAug/x.png": the stem is the id
            ids.append(Path(line.split()[0]).stem)
    if not ids:
        raise _no_samples(listing, "one image id per line")
    files = []
    for i in ids:
        label = aug / f"{i}.png" if (aug / f"{i}.png").is_file() else plain / f"{i}.png"
        files.append((images / f"{i}.jpg", label))
    return files


_READERS: dict[str, tuple[Callable[[Path, str], list], Callable, str]] = {
    "synthetic": (cityscapes_files, CityscapesLabels(), "_leftImg8bit.png"),
    "cityscapes": (cityscapes_files, CityscapesLabels(), "_leftImg8bit.png"),
    "acdc": (acdc_files, CityscapesLabels(), "_rgb_anon.png"),
    "nyuv2": (nyuv2_files, NYUV2_CODEC, ""),
    "voc": (voc_files, VocLabels(), ""),
}


def build_dataset(name: str, root: str | os.PathLike, split: str, transform: Callable | None = None,
                  skip_bad: bool = False, skip_log: str | os.PathLike | None = None) -> SegDataset:
    """The `split` of dataset `name` (one of DATASETS) under `root`, files sorted so the order is deterministic."""
    if name not in _READERS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: {name} dataset folder not found")
    reader, decode_label, suffix = _READERS[name]
    return SegDataset(name, split, root, reader(root, split), decode_label, transform, skip_bad, skip_log, suffix)
