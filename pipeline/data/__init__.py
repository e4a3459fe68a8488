"""Datasets, class tables and transforms: `build_dataset(name, root, split)` is the door in."""

from __future__ import annotations

import importlib

# name -> submodule, imported on first use: the deployed path (Segmenter's preprocessing, the ROS node) reads
# data.transforms and data.classes without importing torch, which the datasets need
_WHERE = {"IGNORE_INDEX": "classes", "LABEL_SETS": "classes", "DATASETS": "datasets", "SegDataset": "datasets",
          "build_dataset": "datasets", "ensure_synthetic": "synthetic", "generate_synthetic": "synthetic",
          "EvalTransform": "transforms", "TrainTransform": "transforms", "network_input": "transforms"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


__all__ = sorted(_WHERE)
