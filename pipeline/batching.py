"""Frames of several cameras through one network call: the batching the multi-camera node and segment-bag share.

Segmenter.predict already takes a list: frames are resized to a fixed network size (each keeps its own output size),
a static-batch network gets its batch filled, and more frames than the batch go in several calls. What is left here
is the case of a network without a fixed size, which takes one frame size per call, and the pairing of each result
with the camera and message it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import rosmsg


@dataclass
class CameraFrame:
    """One camera's frame in a batch: its name, the incoming message (whose header every output carries) and the
    decoded BGR image; `ids` is filled by `segment_frames`."""

    camera: str
    msg: Any
    bgr: np.ndarray
    ids: np.ndarray | None = None

    @property
    def header(self):
        return self.msg.header

    @property
    def stamp_ns(self) -> int:
        return rosmsg.stamp_ns(self.msg.header)


def decode(camera: str, msg) -> CameraFrame:
    """The frame of an Image or CompressedImage message; rosmsg.EncodingError where it cannot be decoded."""
    return CameraFrame(camera, msg, rosmsg.to_bgr(msg))


def size_groups(frames: Sequence[CameraFrame], fixed: bool) -> list[list[int]]:
    """Indices of `frames` per network call: all of them when the network size is fixed (Segmenter resizes each
    frame to it), else one group per frame size, in order of first appearance."""
    if fixed:
        return [list(range(len(frames)))] if frames else []
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, f in enumerate(frames):
        groups.setdefault(f.bgr.shape, []).append(i)
    return list(groups.values())


def segment_frames(seg, frames: Sequence[CameraFrame]) -> list[CameraFrame]:
    """Class ids for every frame (at its own size) in as few Segmenter calls as the network allows; fills and
    returns `frames`."""
    for group in size_groups(frames, seg.size is not None):
        ids = seg.predict([frames[i].bgr for i in group])
        for i, m in zip(group, ids):
            frames[i].ids = m
    return list(frames)


__all__ = ["CameraFrame", "decode", "segment_frames", "size_groups"]
