"""Datasets, class tables and transforms: `build_dataset(name, root, split)` is the door in."""

from pipeline.data.classes import IGNORE_INDEX, LABEL_SETS
from pipeline.data.datasets import DATASETS, SegDataset, build_dataset
from pipeline.data.synthetic import ensure_synthetic, generate_synthetic
from pipeline.data.transforms import EvalTransform, TrainTransform, network_input

__all__ = ["DATASETS", "IGNORE_INDEX", "LABEL_SETS", "EvalTransform", "SegDataset", "TrainTransform",
           "build_dataset", "ensure_synthetic", "generate_synthetic", "network_input"]
