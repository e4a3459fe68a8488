"""The segmentation loop's statistics: per-camera counters and latency, the batches, and their health per period.

Every figure a report gives is about the period since the report before (counters as differences, the rate as frames
over seconds), so a camera or a worker that stopped shows at the next report instead of hiding behind old numbers;
latency and compute percentiles are over the last `window` frames or batches.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels
CAMERA_COUNTERS = ("received", "processed", "dropped", "refused", "errors")
LOOP_COUNTERS = ("batches", "frames", "errors")


def _percentiles(values, name: str) -> dict[str, float | None]:
    v = np.asarray(values, np.float64)
    p50, p90, top = (*np.percentile(v, (50, 90)).tolist(), float(v.max())) if v.size else (None,) * 3
    return {f"{name}_p50_ms": p50, f"{name}_p90_ms": p90, f"{name}_max_ms": top}


class CameraStats:
    """One camera's counters and its stamp-to-publish latencies; written by the subscription and the worker."""

    def __init__(self, window: int = 300) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(CAMERA_COUNTERS, 0)
        self._latency_ms: deque[float] = deque(maxlen=window)

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def published(self, stamp: int, now: int) -> None:
        with self._lock:
            self._counts["processed"] += 1
            if stamp > 0:  # a driver that leaves stamps at zero has no latency to speak of
                self._latency_ms.append((now - stamp) / 1e6)

    def snapshot(self) -> dict[str, float | int | None]:
        with self._lock:
            return {**self._counts, **_percentiles(self._latency_ms, "latency")}


class BatchStats:
    """The worker's batches: how many, how many frames, failures outside any one frame, and per batch the time of
    the whole tick (decode, predict, outputs, publish) and of predict alone."""

    def __init__(self, window: int = 300) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(LOOP_COUNTERS, 0)
        self._sizes: deque[int] = deque(maxlen=window)
        self._compute_ms: deque[float] = deque(maxlen=window)
        self._predict_ms: deque[float] = deque(maxlen=window)

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def batch(self, size: int, predict_ms: float, compute_ms: float) -> None:
        with self._lock:
            self._counts["batches"] += 1
            self._counts["frames"] += size
            self._sizes.append(size)
            self._predict_ms.append(predict_ms)
            self._compute_ms.append(compute_ms)

    def snapshot(self) -> dict[str, float | int | None]:
        with self._lock:
            mean = float(np.mean(self._sizes)) if self._sizes else None
            return {**self._counts, "mean_batch": mean, **_percentiles(self._compute_ms, "compute"),
                    **_percentiles(self._predict_ms, "predict")}


# ------------------------------------------------------------------------------------------------ health
def _new(now: dict, before: dict | None, keys) -> dict[str, int]:
    return {k: now[k] - (before or {}).get(k, 0) for k in keys}


def camera_health(now: dict, before: dict | None, seconds: float, others_running: bool = False) -> tuple[int, str]:
    """(level, message) of one camera over the period of `seconds` between two snapshots: ERROR when frames failed;
    WARN when none arrived (the camera stalls, or all do), when some were refused, or when frames arrived and none
    was published; else OK with the rate of the period."""
    new = _new(now, before, CAMERA_COUNTERS)
    span = f"in the last {seconds:.1f} s"
    if new["errors"]:
        return ERROR, f"{new['errors']} frames failed {span} (see the node's log)"
    if not new["received"]:
        return WARN, f"no frames received {span}" + (" while other cameras send" if others_running else "")
    if new["refused"]:
        return WARN, f"{new['refused']} frames refused {span} (unsupported encoding, see the node's log)"
    if not new["processed"]:
        return WARN, f"{new['received']} frames received and none published {span}"
    return OK, f"segmenting at {rate(now, before, seconds):.1f} Hz, {new['dropped']} frames dropped {span}"


def loop_health(now: dict, before: dict | None, seconds: float, received: int, alive: bool | None) -> tuple[int, str]:
    """(level, message) of the worker over the period: ERROR when its thread has ended (`alive` False; None: stepped
    by hand) or something outside any frame failed; WARN when frames arrived (`received`, all cameras) and no batch
    ran; else OK with the batches of the period."""
    new = _new(now, before, LOOP_COUNTERS)
    span = f"in the last {seconds:.1f} s"
    if alive is False:
        return ERROR, "the worker thread has ended: no frame is segmented any more (see the node's log)"
    if new["errors"]:
        return ERROR, f"{new['errors']} failures in the worker loop {span} (see the node's log)"
    if received and not new["batches"]:
        return WARN, f"{received} frames received and no batch ran {span}"
    mean = new["frames"] / new["batches"] if new["batches"] else 0.0
    return OK, f"{new['batches']} batches of {mean:.2f} frames on average {span}"


def rate(now: dict, before: dict | None, seconds: float) -> float:
    """Frames published per second in the period of `seconds` between two snapshots."""
    return (now["processed"] - (before or {}).get("processed", 0)) / seconds if seconds > 0 else 0.0


def _text(v) -> str:
    return "" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def status_fields(name: str, hardware_id: str, level: int, message: str, values: dict) -> dict:
    """diagnostic_msgs/DiagnosticStatus fields (level as an int; values as key/value strings, "" for none)."""
    return {"level": level, "name": name, "message": message, "hardware_id": hardware_id,
            "values": [{"key": k, "value": _text(v)} for k, v in values.items()]}


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def camera_line(camera: str, s: dict) -> str:
    """One log line for a camera's status values."""
    return (f"{camera}: received {s['received']}, processed {s['processed']}, dropped {s['dropped']}, refused "
            f"{s['refused']}, errors {s['errors']} | {s['rate_hz']:.1f} Hz | stamp->publish p50 "
            f"{_ms(s['latency_p50_ms'])} p90 {_ms(s['latency_p90_ms'])} max {_ms(s['latency_max_ms'])} ms")


def loop_line(s: dict) -> str:
    """One log line for the loop's status values."""
    mean = "-" if s["mean_batch"] is None else f"{s['mean_batch']:.2f}"
    return (f"loop: batches {s['batches']}, frames {s['frames']}, mean batch {mean}, errors {s['errors']} | compute "
            f"p50 {_ms(s['compute_p50_ms'])} p90 {_ms(s['compute_p90_ms'])} ms, predict p50 "
            f"{_ms(s['predict_p50_ms'])} ms")


__all__ = ["BatchStats", "CAMERA_COUNTERS", "CameraStats", "ERROR", "LOOP_COUNTERS", "OK", "WARN", "camera_health",
           "camera_line", "loop_health", "loop_line", "rate", "status_fields"]
