"""The frames waiting for the worker, per camera, and which of them go together into the next batch.

Without time synchronisation (slop 0) each camera holds only its newest frame and a batch is every camera's waiting
frame, at once. With a slop, the batch is the best group of frames whose stamps lie within the slop of each other
(`best_group`), waited for up to a timeout when some camera is missing from it; the policy is spelled out in
docs/ros-and-bags.md#time-synchronisation.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.rosmsg import stamp_ns

CLOCK_JUMP_NS = 1_000_000_000  # a stamp this much older than the last synchronised batch: the clock went back


@dataclass
class Waiting:
    """A frame in the queue: the message, its header stamp (ns) and when it arrived (monotonic seconds)."""

    msg: Any
    stamp: int
    arrived: float


def best_group(queues: dict[str, Sequence[Waiting]], slop_ns: int) -> dict[str, Waiting]:
    """The group a synchronised batch takes: for each waiting stamp as the anchor, per camera its newest frame in
    [anchor - slop, anchor] (so every two stamps of a group lie within the slop); the group with the most cameras
    wins, ties going to the newest anchor. Empty when nothing waits."""
    best: dict[str, Waiting] = {}
    for anchor in sorted({w.stamp for q in queues.values() for w in q}, reverse=True):
        group = {}
        for camera, q in queues.items():
            inside = [w for w in q if anchor - slop_ns <= w.stamp <= anchor]
            if inside:
                group[camera] = max(inside, key=lambda w: w.stamp)
        if len(group) > len(best):  # anchors newest first: an equal group later is an older one
            best = group
    return best


class PendingFrames:
    """Per camera the frames not yet processed: the newest one (slop 0; a newer frame replaces it) or, with a slop, up
    to `queue` frames (the oldest dropped beyond it). `put` never blocks; `take` hands the worker its next batch.
    Every frame that leaves without being taken is reported to `dropped(camera)`."""

    def __init__(self, cameras: Sequence[str], dropped: Callable[[str], None], *, slop: float = 0.0,
                 timeout: float = 0.05, queue: int = 5, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.cameras, self.dropped, self.monotonic = list(cameras), dropped, monotonic
        self.slop_ns, self.timeout = round(slop * 1e9), timeout
        depth = queue if slop > 0 else 1
        self._queues: dict[str, deque[Waiting]] = {c: deque(maxlen=depth) for c in self.cameras}
        self._cond = threading.Condition()
        self._closed = False
        self._floor: int | None = None  # oldest stamp of the last synchronised batch

    def put(self, camera: str, msg) -> None:
        w = Waiting(msg, stamp_ns(msg.header), self.monotonic())
        with self._cond:
            if self._floor is not None and w.stamp < self._floor - CLOCK_JUMP_NS:
                # time went back (a bag replayed in a loop, a restarted driver): what waits is from before, start afresh
                self._floor = None
                for c, q in self._queues.items():
                    for _ in q:
                        self.dropped(c)
                    q.clear()
            if self._floor is not None and w.stamp < self._floor:
                self.dropped(camera)  # older than a batch already published: it could only go out of order
                return
            q = self._queues[camera]
            if len(q) == q.maxlen:
                self.dropped(camera)  # the camera outran the network: its oldest waiting frame goes
            q.append(w)
            self._cond.notify()

    def _ready(self) -> tuple[dict[str, Waiting], float]:
        """The next batch and the monotonic time it is due (inf: nothing waits)."""
        if self.slop_ns <= 0:
            group = {c: q[-1] for c, q in self._queues.items() if q}
            return group, (-float("inf") if group else float("inf"))
        group = best_group(self._queues, self.slop_ns)
        if not group:
            return group, float("inf")
        if len(group) == len(self.cameras):
            return group, -float("inf")
        return group, min(w.arrived for w in group.values()) + self.timeout

    def take(self, timeout: float | None = None) -> list[tuple[str, Any]] | None:
        """The next batch as (camera, message) pairs in camera order, removed; None when none is due within `timeout`
        seconds (None: wait for one) or once closed."""
        give_up = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                group, due = self._ready()
                now = self.monotonic()
                if group and now >= due:
                    return self._pop(group)
                left = None if give_up is None else give_up - time.monotonic()
                if left is not None and left <= 0:
                    return None
                wait = None if due == float("inf") else due - now
                self._cond.wait(wait if left is None else (left if wait is None else min(wait, left)))
            return None

    def _pop(self, group: dict[str, Waiting]) -> list[tuple[str, Any]]:
        if self.slop_ns > 0:
            # frames older than the batch's oldest can never join a later batch without going out of order: dropped,
            # as message_filters drops them; so is a member camera's frame older than the one the batch took
            self._floor = min(w.stamp for w in group.values())
            for camera, q in self._queues.items():
                taken = group.get(camera)
                keep = [w for w in q if w.stamp >= self._floor and (taken is None or w.stamp > taken.stamp)]
                for _ in range(len(q) - len(keep) - (camera in group)):
                    self.dropped(camera)
                q.clear()
                q.extend(keep)
        else:
            for camera in group:
                self._queues[camera].clear()
        return [(c, group[c].msg) for c in self.cameras if c in group]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


__all__ = ["PendingFrames", "Waiting", "best_group"]
