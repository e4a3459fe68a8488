"""The segmentation node without rclpy: the newest-frame slot, the worker loop, its statistics and outgoing fields.

Messages are read by attribute and outputs leave as field dicts (pipeline/rosmsg.py), so the loop runs on rclpy's
classes in the node and on rosbags' typestore classes in the tests alike.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from pipeline import rosmsg
from pipeline.errors import InputError

RESOLUTIONS = ("camera", "network")
OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels
Publish = Callable[[dict], None]


def stamp_ns(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


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


# ------------------------------------------------------------------------------------------------ statistics
class LoopStats:
    """Counters and a window of per-frame times; written by the subscriber and the worker thread."""

    COUNTERS = ("received", "processed", "dropped", "refused", "errors")

    def __init__(self, window: int = 300) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.COUNTERS, 0)
        self._latency_ms: deque[float] = deque(maxlen=window)  # header stamp -> outputs published
        self._compute_ms: deque[float] = deque(maxlen=window)  # decode + predict + outputs built
        self._published_ns: deque[int] = deque(maxlen=window)

    def count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def published(self, stamp: int, now: int, compute_ms: float) -> None:
        with self._lock:
            self._counts["processed"] += 1
            if stamp > 0:  # a driver that leaves stamps at zero has no latency to speak of
                self._latency_ms.append((now - stamp) / 1e6)
            self._compute_ms.append(compute_ms)
            self._published_ns.append(now)

    def snapshot(self) -> dict[str, float | int | None]:
        """Counters, the publish rate and p50/p90/max of latency and compute over the window (None: no frames)."""
        with self._lock:
            out: dict[str, float | int | None] = dict(self._counts)
            times = list(self._published_ns)
            for name, values in (("latency", self._latency_ms), ("compute", self._compute_ms)):
                v = np.asarray(values, np.float64)
                p50, p90, top = (*np.percentile(v, (50, 90)).tolist(), float(v.max())) if v.size else (None,) * 3
                out.update({f"{name}_p50_ms": p50, f"{name}_p90_ms": p90, f"{name}_max_ms": top})
        span = (times[-1] - times[0]) / 1e9 if len(times) > 1 else 0.0
        out["rate_hz"] = (len(times) - 1) / span if span > 0 else None
        return out


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def summary(s: dict) -> str:
    """One line for the periodic log."""
    rate = "-" if s["rate_hz"] is None else f"{s['rate_hz']:.1f}"
    return (f"received {s['received']}, processed {s['processed']}, dropped {s['dropped']}, refused {s['refused']}, "
            f"errors {s['errors']} | {rate} Hz | stamp->publish p50 {_ms(s['latency_p50_ms'])} p90 "
            f"{_ms(s['latency_p90_ms'])} max {_ms(s['latency_max_ms'])} ms | compute p50 {_ms(s['compute_p50_ms'])} "
            f"p90 {_ms(s['compute_p90_ms'])} ms")


def health(now: dict, before: dict | None) -> tuple[int, str]:
    """(level, message) for the period between two snapshots: ERROR when frames failed, WARN when none arrived or
    some were refused, else OK."""
    before = before or dict.fromkeys(LoopStats.COUNTERS, 0)
    new = {k: now[k] - before[k] for k in LoopStats.COUNTERS}
    if new["errors"]:
        return ERROR, f"{new['errors']} frames failed since the last report (see the node's log)"
    if not new["received"]:
        return WARN, "no frames received since the last report"
    if new["refused"]:
        return WARN, f"{new['refused']} frames refused since the last report (unsupported encoding, see the log)"
    rate = "-" if now["rate_hz"] is None else f"{now['rate_hz']:.1f}"
    return OK, f"segmenting at {rate} Hz, {new['dropped']} frames dropped since the last report"


def diagnostic_fields(name: str, hardware_id: str, now: dict, before: dict | None) -> dict:
    """diagnostic_msgs/DiagnosticStatus fields (level as an int; values as (key, value) string pairs)."""
    level, message = health(now, before)
    values = [(k, "" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))) for k, v in now.items()]
    return {"level": level, "name": name, "message": message, "hardware_id": hardware_id,
            "values": [{"key": k, "value": v} for k, v in values]}


# ------------------------------------------------------------------------------------------------ the loop
class FrameSlot:
    """The newest unprocessed frame: `put` replaces one still waiting (the camera outran the network), `take`
    hands it to the worker."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._closed = False

    def put(self, item) -> bool:
        """Keep `item`; True when it replaced a frame that was never processed."""
        with self._cond:
            replaced = self._item is not None
            self._item = item
            self._cond.notify()
        return replaced

    def take(self, timeout: float | None = None):
        """The waiting frame, removed; None after `timeout` seconds (None: wait) or once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self._closed, timeout)
            if self._closed:
                return None
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class SegmentationLoop:
    """Frames in through `submit` (the subscriber callback: never blocks), masks, overlays and CameraInfo out through
    the publish callbacks, from a worker thread (`start`) or one frame per `step` (tests, single-threaded use).

    `clock` gives "now" in nanoseconds in the clock of the header stamps (the node passes its ROS clock, so a bag
    played with use_sim_time measures against the bag's time). Outputs carry the input's header; a frame that cannot
    be decoded is refused and logged once per encoding; any other failure of a frame is counted and logged once per
    kind, and the loop goes on."""

    def __init__(self, segmenter, publish_mask: Publish, publish_overlay: Publish | None = None,
                 publish_camera_info: Publish | None = None, *, clock: Callable[[], int],
                 output_resolution: str = "camera", overlay_alpha: float = 0.5, window: int = 300,
                 log: Any = None) -> None:
        if output_resolution not in RESOLUTIONS:
            raise InputError(f"output_resolution {output_resolution!r}: expected one of {', '.join(RESOLUTIONS)}")
        if output_resolution == "network" and segmenter.size is None:
            raise InputError(f"{segmenter.path.name}: output_resolution network needs a fixed network size and the "
                             "artifact has none; set network_size (HxW)")
        self.segmenter, self.clock, self.alpha = segmenter, clock, overlay_alpha
        self.network_size = segmenter.size if output_resolution == "network" else None
        self.publish_mask, self.publish_overlay, self.publish_camera_info = publish_mask, publish_overlay, \
            publish_camera_info
        self.log = log or logging.getLogger("transkd_segmentation")
        self.slot = FrameSlot()
        self.stats = LoopStats(window)
        self._camera_info = None
        self._logged: set[tuple[str, str]] = set()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ called from the subscriptions
    def submit(self, msg) -> None:
        """Keep `msg` (Image or CompressedImage) as the newest frame; an older one not yet taken is dropped."""
        self.stats.count("received")
        if self.slot.put(msg):
            self.stats.count("dropped")

    def set_camera_info(self, msg) -> None:
        """The camera's latest CameraInfo, republished with every mask (scaled to it)."""
        self._camera_info = msg

    # ------------------------------------------------------------------ the worker
    def start(self) -> SegmentationLoop:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="segmentation-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.slot.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while (msg := self.slot.take()) is not None:
            self.process(msg)

    def step(self, timeout: float | None = 0.0) -> bool:
        """Process the newest waiting frame; False when none came within `timeout` seconds."""
        msg = self.slot.take(timeout)
        if msg is None:
            return False
        self.process(msg)
        return True

    def warm_up(self) -> None:
        """One blank frame through predict at the network size (or VGA where there is none): the first call
        allocates buffers, builds ONNX Runtime's or TensorRT's state, captures CUDA graphs."""
        h, w = self.segmenter.size or (480, 640)
        self.segmenter.predict(np.zeros((h, w, 3), np.uint8))

    def process(self, msg) -> None:
        start = time.perf_counter()
        try:
            bgr = rosmsg.to_bgr(msg)
        except rosmsg.EncodingError as e:
            self.stats.count("refused")
            key = str(getattr(msg, "encoding", None) or getattr(msg, "format", None) or type(msg).__name__)
            self._once(("refused", key), f"refusing frames in encoding {key!r}: {e} (logged once per encoding, "
                                         "counted as refused)")
            return
        try:
            outputs = self._outputs(msg.header, bgr)
            compute_ms = (time.perf_counter() - start) * 1e3
            for publish, fields_ in outputs:
                publish(fields_)
        except Exception as e:  # one bad frame must never take the node down: count it, say it once per kind
            self.stats.count("errors")
            self._once(("error", type(e).__name__), f"frame at {stamp_ns(msg.header)} ns failed: "
                                                    f"{type(e).__name__}: {e} (logged once per kind)", error=True)
            return
        self.stats.published(stamp_ns(msg.header), self.clock(), compute_ms)

    def _outputs(self, header, bgr: np.ndarray) -> list[tuple[Publish, dict]]:
        src = bgr.shape[:2]
        if self.network_size is not None and src != self.network_size:
            # the same INTER_LINEAR resize Segmenter.preprocess would apply, so the network sees the same input; the
            # class ids then come at the network size straight from the logits (or a labels graph's own output),
            # rather than upsampled to the camera and sampled back down
            h, w = self.network_size
            bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_LINEAR)
        ids = self.segmenter.predict(bgr)
        out: list[tuple[Publish, dict]] = [(self.publish_mask, rosmsg.mask_fields(ids, header))]
        if self.publish_overlay is not None:
            rgb = self.segmenter.colorize(ids, bgr, alpha=self.alpha)
            out.append((self.publish_overlay, rosmsg.overlay_fields(rgb, header)))
        info = self._camera_info
        if self.publish_camera_info is not None and info is not None:
            # stamped like the mask, so message_filters pairs them exactly
            out.append((self.publish_camera_info, {**scale_camera_info(info, src, ids.shape[:2]), "header": header}))
        return out

    def _once(self, key: tuple[str, str], message: str, error: bool = False) -> None:
        if key not in self._logged:
            self._logged.add(key)
            (self.log.error if error else self.log.warning)(message)

    def summary(self) -> str:
        return summary(self.stats.snapshot())


__all__ = ["FrameSlot", "LoopStats", "SegmentationLoop", "diagnostic_fields", "health", "label_info_fields",
           "scale_camera_info", "stamp_ns", "summary"]
