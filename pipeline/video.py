"""The overlay video segment-bag and segment write: an mp4 (mp4v) opened at its first frame, at a clamped rate."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.errors import InputError

DEFAULT_FPS = 10.0  # where the source has no rate of its own


def video_rate(rate: float) -> float:
    """A source's frame rate as the video's: kept within 1..120 (MPEG-4 time bases allow no more), DEFAULT_FPS where
    it is unknown (0 or negative)."""
    return min(max(rate, 1.0), 120.0) if rate > 0 else DEFAULT_FPS


class OverlayVideo:
    """RGB overlays appended as the frames of an mp4; the file is opened at the first frame, which gives its size."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path, self.fps, self._writer = Path(path), fps, None

    def write(self, rgb: np.ndarray) -> None:
        if self._writer is None:
            h, w = rgb.shape[:2]
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self._writer.isOpened():
                self._writer = None
                raise InputError(f"{self.path}: OpenCV cannot open an mp4v video writer at {self.fps:g} frames/s here")
        self._writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))

    def release(self) -> bool:
        """Close the file; True when a frame was written to it."""
        if self._writer is None:
            return False
        self._writer.release()
        self._writer = None
        return True


__all__ = ["DEFAULT_FPS", "OverlayVideo", "video_rate"]
