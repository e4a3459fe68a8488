"""Class names and colour palettes of the label sets the pipeline knows."""

from __future__ import annotations

# Cityscapes' 19 evaluation classes in train-id order, with the official colours.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# Normalisation on the 0..255 scale (ImageNet statistics, what pretrained SegFormer weights expect).
IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

# Cityscapes labelIds (the ids in *_gtFine_labelIds.png) of the 19 train ids above, in train-id order;
# every other label id (unlabeled, ego vehicle, ground, parking, guard rail, ...) is ignored (255).
CITYSCAPES_LABEL_IDS: tuple[int, ...] = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
IGNORE_INDEX = 255


def cityscapes_label_to_train_lut() -> list[int]:
    """A 256-entry lookup table: Cityscapes labelId -> train id (255 for ignored ids)."""
    lut = [IGNORE_INDEX] * 256
    for train_id, label_id in enumerate(CITYSCAPES_LABEL_IDS):
        lut[label_id] = train_id
    return lut


def default_classes(num_classes: int) -> list[str]:
    """Cityscapes names for 19 classes (the pipeline's default label set), generic names otherwise."""
    if num_classes == len(CITYSCAPES_CLASSES):
        return list(CITYSCAPES_CLASSES)
    return [f"class_{i}" for i in range(num_classes)]


def default_palette(num_classes: int) -> list[list[int]]:
    """Cityscapes colours for 19 classes, otherwise the VOC bit-interleaved colour map (distinct, deterministic)."""
    if num_classes == len(CITYSCAPES_PALETTE):
        return [list(c) for c in CITYSCAPES_PALETTE]
    palette = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append([r, g, b])
    return palette


# ACDC (adverse conditions: fog, night, rain, snow) is annotated with the Cityscapes label set and ids.
ACDC_CLASSES: tuple[str, ...] = CITYSCAPES_CLASSES
ACDC_PALETTE: tuple[tuple[int, int, int], ...] = CITYSCAPES_PALETTE

# NYUv2's 40-class mapping (Gupta et al. 2013), in label order 1..40; the files store 0 for unlabeled, so train
# id = label - 1. The original list spells "refridgerator"; we keep the correct spelling.
NYUV2_CLASSES: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat",
    "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel", "shower curtain", "box",
    "whiteboard", "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure",
    "otherfurniture", "otherprop",
)

# Pascal VOC 2012: background plus 20 object classes, coloured by the bit-interleaved map its palette PNGs use.
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# VOC draws a 5-pixel "don't care" band around objects in this colour (palette index 255).
VOC_IGNORE_COLOUR: tuple[int, int, int] = (224, 224, 192)


def _bit_interleaved(first: int, count: int) -> tuple[tuple[int, int, int], ...]:
    return tuple(tuple(c) for c in default_palette(first + count)[first:])


VOC_PALETTE: tuple[tuple[int, int, int], ...] = _bit_interleaved(0, len(VOC_CLASSES))
# Entry 0 of the bit-interleaved map is black, which reads as "nothing" in overlays; NYUv2 has no background
# class, so its colours start at entry 1 and wall gets a visible colour.
NYUV2_PALETTE: tuple[tuple[int, int, int], ...] = _bit_interleaved(1, len(NYUV2_CLASSES))

# Dataset name -> (classes, palette) in train-id order.
LABEL_SETS: dict[str, tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]] = {
    "synthetic": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
    "cityscapes": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
    "acdc": (ACDC_CLASSES, ACDC_PALETTE),
    "nyuv2": (NYUV2_CLASSES, NYUV2_PALETTE),
    "voc": (VOC_CLASSES, VOC_PALETTE),
}
