"""The segmentation node without rclpy: frames of one or several cameras in, one batched predict per tick, each
camera's mask, overlay and CameraInfo out, with per-camera statistics and health.

Messages are read by attribute and outputs leave as field dicts (pipeline/rosmsg.py), so the loop runs on rclpy's
classes in the node and on rosbags' typestore classes in the tests alike. A single camera is the case N = 1.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from pipeline import rosmsg
from pipeline.batching import CameraFrame, decode, segment_frames
from pipeline.errors import InputError
from pipeline.rosmsg import stamp_ns
from transkd_segmentation.pending import PendingFrames
from transkd_segmentation.stats import (
    ERROR,
    OK,
    WARN,
    BatchStats,
    CameraStats,
    camera_health,
    camera_line,
    loop_health,
    loop_line,
    rate,
    status_fields,
)

RESOLUTIONS = ("camera", "network")
SINGLE = "camera"  # the name of the one camera of a loop given bare outputs
Publish = Callable[[dict], None]


# ------------------------------------------------------------------------------------------------ outgoing fields
def scale_camera_info(info, src: tuple[int, int], dst: tuple[int, int]) -> dict:
    """CameraInfo fields for an image resized from `src` to `dst` (H, W): K, P and the ROI scaled per axis as
    image_proc's resize does (fx, cx, Tx by the width ratio; fy, cy, Ty by the height ratio), width and height
    likewise; D, R, the distortion model and binning are the same camera's and stay."""
    sy, sx = dst[0] / src[0], dst[1] / src[1]
    k = np.array(info.k, np.float64).reshape(3, 3)
    k[0] *= sx
    k[1] *= sy
    p = np.array(info.p, np.float64).reshape(3, 4)
    p[0] *= sx
    p[1] *= sy
    roi = info.roi
    return {"header": info.header, "height": round(int(info.height) * sy), "width": round(int(info.width) * sx),
            "distortion_model": str(info.distortion_model), "d": np.array(info.d, np.float64),
            "k": k.reshape(-1), "r": np.array(info.r, np.float64), "p": p.reshape(-1),
            "binning_x": int(info.binning_x), "binning_y": int(info.binning_y),
            "roi": {"x_offset": round(int(roi.x_offset) * sx), "y_offset": round(int(roi.y_offset) * sy),
                    "height": round(int(roi.height) * sy), "width": round(int(roi.width) * sx),
                    "do_rectify": bool(roi.do_rectify)}}


def label_info_fields(classes: list[str], header) -> dict:
    """vision_msgs/LabelInfo fields: the class ids the mask carries and their names. No confidence threshold is
    applied (the mask is an argmax), hence 0."""
    return {"header": header, "threshold": 0.0,
            "class_map": [{"class_id": i, "class_name": n} for i, n in rosmsg.label_info_classes(classes)]}


@dataclass
class CameraOutputs:
    """Where one camera's results go: publish callbacks taking field dicts (None: that output is off)."""

    mask: Publish
    overlay: Publish | None = None
    camera_info: Publish | None = None


@dataclass
class Report:
    """One period's health: a DiagnosticStatus field dict per camera and one for the loop, and a (level, line) per
    status for the log."""

    statuses: list[dict] = field(default_factory=list)
    lines: list[tuple[int, str]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ the loop
class SegmentationLoop:
    """Frames in through `submit` (the subscription callbacks: never blocks), results out through each camera's
    publish callbacks, from a worker thread (`start`) or one batch per `step` (tests, single-threaded use).

    Per tick the worker takes the waiting frame of every camera that has one (pending.PendingFrames: with
    `sync_slop` > 0 only frames within the slop of each other, waiting up to `sync_timeout` for the others), decodes
    them, runs one pipeline.batching.segment_frames call and publishes each result on its camera's outputs with its
    frame's header. A camera with nothing new is left out, never re-published. `clock` gives "now" in nanoseconds in
    the clock of the header stamps (the node passes its ROS clock). A frame that cannot be decoded is refused and
    logged once per encoding; any other failure is counted and logged once per kind, and the loop goes on."""

    def __init__(self, segmenter, outputs: CameraOutputs | dict[str, CameraOutputs], *, clock: Callable[[], int],
                 output_resolution: str = "camera", overlay_alpha: float = 0.5, window: int = 300,
                 sync_slop: float = 0.0, sync_timeout: float = 0.05, sync_queue: int = 5, log: Any = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if output_resolution not in RESOLUTIONS:
            raise InputError(f"output_resolution {output_resolution!r}: expected one of {', '.join(RESOLUTIONS)}")
        if output_resolution == "network" and segmenter.size is None:
            raise InputError(f"{segmenter.path.name}: output_resolution network needs a fixed network size and the "
                             "artifact has none; set network_size (HxW)")
        self.outputs = {SINGLE: outputs} if isinstance(outputs, CameraOutputs) else dict(outputs)
        if not self.outputs:
            raise InputError("the segmentation loop needs at least one camera")
        self.segmenter, self.clock, self.alpha, self.monotonic = segmenter, clock, overlay_alpha, monotonic
        self.network_size = segmenter.size if output_resolution == "network" else None
        self.log = log or logging.getLogger("transkd_segmentation")
        self.stats = {c: CameraStats(window) for c in self.outputs}
        self.batches = BatchStats(window)
        self.pending = PendingFrames(list(self.outputs), lambda c: self.stats[c].count("dropped"), slop=sync_slop,
                                     timeout=sync_timeout, queue=sync_queue, monotonic=monotonic)
        self._camera_info: dict[str, Any] = {}
        self._logged: set[tuple[str, str]] = set()
        self._thread: threading.Thread | None = None
        self._publishing = threading.Lock()
        self._closing = False
        self._last: tuple[float, dict, dict] = (monotonic(), {}, {})

    @property
    def cameras(self) -> list[str]:
        return list(self.outputs)

    def _camera(self, camera: str | None) -> str:
        if camera is None and len(self.outputs) == 1:
            return next(iter(self.outputs))
        if camera not in self.outputs:
            raise InputError(f"camera {camera!r}: expected one of {', '.join(self.outputs)}")
        return camera

    # ------------------------------------------------------------------ called from the subscriptions
    def submit(self, msg, camera: str | None = None) -> None:
        """Keep `msg` (Image or CompressedImage) as `camera`'s newest frame (the only camera's when None)."""
        camera = self._camera(camera)
        self.stats[camera].count("received")
        self.pending.put(camera, msg)

    def set_camera_info(self, msg, camera: str | None = None) -> None:
        """The camera's latest CameraInfo, republished with every mask (scaled to it)."""
        self._camera_info[self._camera(camera)] = msg

    # ------------------------------------------------------------------ the worker
    def start(self) -> SegmentationLoop:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="segmentation-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking frames, wait up to `timeout` seconds for the batch in flight to be published, then close the
        outputs: a batch that outlives the wait publishes nothing (the node destroys its publishers next)."""
        self.pending.close()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._publishing:
            self._closing = True

    def alive(self) -> bool | None:
        """Whether the worker thread runs; None when the loop is stepped by hand."""
        return None if self._thread is None else self._thread.is_alive()

    def _run(self) -> None:
        while (batch := self.pending.take()) is not None:
            try:
                self.process(batch)
            except Exception as e:  # whatever escapes a tick must not end the worker: count it, say it, go on
                self.batches.count("errors")
                try:
                    self._error_once(("loop", type(e).__name__), f"segmentation tick failed: {type(e).__name__}: "
                                                                 f"{e} (logged once per kind)")
                except Exception:
                    pass  # not even a failing logger may end the worker

    def step(self, timeout: float | None = 0.0) -> bool:
        """Process the next batch; False when none was due within `timeout` seconds."""
        batch = self.pending.take(timeout)
        if batch is None:
            return False
        self.process(batch)
        return True

    def warm_up(self) -> None:
        """One blank batch of as many frames as cameras through predict at the network size (or VGA where there is
        none): the first call allocates buffers, builds ONNX Runtime's or TensorRT's state, captures CUDA graphs."""
        h, w = self.segmenter.size or (480, 640)
        self.segmenter.predict([np.zeros((h, w, 3), np.uint8)] * len(self.outputs))

    def process(self, batch: Sequence[tuple[str, Any]]) -> None:
        """One tick: decode every (camera, message), one batched predict, each camera's outputs published."""
        start = time.perf_counter()
        frames, sources = [], []
        for camera, msg in batch:
            f = self._decode(camera, msg)
            if f is not None:
                sources.append(f.bgr.shape[:2])
                if self.network_size is not None and f.bgr.shape[:2] != self.network_size:
                    # the same INTER_LINEAR resize Segmenter.preprocess would apply, so the network sees the same
                    # input; the class ids then come at the network size straight from the logits (or a labels
                    # graph's own output), rather than upsampled to the camera and sampled back down
                    f.bgr = cv2.resize(f.bgr, self.network_size[::-1], interpolation=cv2.INTER_LINEAR)
                frames.append(f)
        if not frames:
            return
        t0 = time.perf_counter()
        try:
            segment_frames(self.segmenter, frames)
        except Exception as e:
            for f in frames:
                self.stats[f.camera].count("errors")
            self._error_once(("predict", type(e).__name__), f"predict on a batch of {len(frames)} failed: "
                                                            f"{type(e).__name__}: {e} (logged once per kind)")
            return
        predict_ms = (time.perf_counter() - t0) * 1e3
        for f, src in zip(frames, sources):
            self._publish(f, src)
        self.batches.batch(len(frames), predict_ms, (time.perf_counter() - start) * 1e3)

    def _decode(self, camera: str, msg) -> CameraFrame | None:
        try:
            return decode(camera, msg)
        except rosmsg.EncodingError as e:
            self.stats[camera].count("refused")
            key = str(getattr(msg, "encoding", None) or getattr(msg, "format", None) or type(msg).__name__)
            self._warn_once(("refused", key), f"refusing frames in encoding {key!r}: {e} (logged once per "
                                              "encoding, counted as refused)")
        except Exception as e:
            self.stats[camera].count("errors")
            self._error_once(("decode", type(e).__name__), f"{camera}: a frame failed to decode: "
                                                           f"{type(e).__name__}: {e} (logged once per kind)")
        return None

    def _publish(self, f: CameraFrame, src: tuple[int, int]) -> None:
        out = self.outputs[f.camera]
        try:
            sends = [(out.mask, rosmsg.mask_fields(f.ids, f.header))]
            if out.overlay is not None:
                sends.append((out.overlay, rosmsg.overlay_fields(self.segmenter.colorize(f.ids, f.bgr, self.alpha),
                                                                 f.header)))
            info = self._camera_info.get(f.camera)
            if out.camera_info is not None and info is not None:
                # stamped like the mask, so message_filters pairs them exactly
                sends.append((out.camera_info, {**scale_camera_info(info, src, f.ids.shape[:2]), "header": f.header}))
            with self._publishing:
                if self._closing:
                    return  # stopped while this batch ran: the publishers may be gone
                for publish, fields_ in sends:
                    publish(fields_)
        except Exception as e:  # one bad frame must never take the node down: count it, say it once per kind
            self.stats[f.camera].count("errors")
            self._error_once(("error", type(e).__name__), f"{f.camera}: frame at {f.stamp_ns} ns failed: "
                                                          f"{type(e).__name__}: {e} (logged once per kind)")
            return
        self.stats[f.camera].published(f.stamp_ns, self.clock())

    # rclpy's logger refuses two severities from one call site (ValueError 'Logger severity cannot be changed
    # between calls.'), so each severity is logged from a line of its own
    def _warn_once(self, key: tuple[str, str], message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            self.log.warning(message)

    def _error_once(self, key: tuple[str, str], message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            self.log.error(message)

    # ------------------------------------------------------------------ health
    def report(self, prefix: str, hardware_id: str) -> Report:
        """The statuses of the period since the last report (or since the loop was made): one per camera, named
        `prefix: camera`, and `prefix: loop`."""
        now = self.monotonic()
        then, cams_before, loop_before = self._last
        seconds = max(now - then, 1e-9)
        cams = {c: s.snapshot() for c, s in self.stats.items()}
        received = {c: cams[c]["received"] - cams_before.get(c, {}).get("received", 0) for c in cams}
        out = Report()
        for c, s in cams.items():
            values = {**s, "rate_hz": rate(s, cams_before.get(c), seconds)}  # the period's, never older frames'
            level, message = camera_health(s, cams_before.get(c), seconds,
                                           others_running=any(n for o, n in received.items() if o != c))
            out.statuses.append(status_fields(f"{prefix}: {c}", hardware_id, level, message, values))
            out.lines.append((level, f"{camera_line(c, values)} | {message}"))
        loop = self.batches.snapshot()
        level, message = loop_health(loop, loop_before or None, seconds, sum(received.values()), self.alive())
        out.statuses.append(status_fields(f"{prefix}: loop", hardware_id, level, message, loop))
        out.lines.append((level, f"{loop_line(loop)} | {message}"))
        self._last = (now, cams, loop)
        return out


__all__ = ["ERROR", "OK", "RESOLUTIONS", "WARN", "CameraOutputs", "Report", "SegmentationLoop", "label_info_fields",
           "scale_camera_info", "stamp_ns"]
