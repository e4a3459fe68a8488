"""ROS 2 node (ros/): the processing loop, for one camera and for several in one batch, on real sensor_msgs /
vision_msgs types serialised to CDR with rosbags and real tiny Segmenters (batch 1 and a static batch 4); the rclpy
wiring is compiled and its imports checked (rclpy itself cannot be installed here)."""

import ast
import json
import logging
import os
import py_compile
import sys
import threading
import time
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest
import yaml

pytest.importorskip("rosbags")
from rosbags.typesys import Stores, get_types_from_msg, get_typestore  # noqa: E402

from pipeline import rosmsg  # noqa: E402
from pipeline.errors import InputError  # noqa: E402
from pipeline.infer import Segmenter  # noqa: E402
from pipeline.models import save_model  # noqa: E402
from tests.conftest import ROOT, export_tiny, imported_modules, run_cli, splits, spread_student  # noqa: E402

PKG = ROOT / "ros"
sys.path.append(str(PKG))
from transkd_segmentation.params import NodeParams, parameter_error_line, parse_size  # noqa: E402
from transkd_segmentation.pending import Waiting, best_group  # noqa: E402
from transkd_segmentation.processing import (  # noqa: E402
    ERROR,
    OK,
    WARN,
    CameraOutputs,
    SegmentationLoop,
    label_info_fields,
    scale_camera_info,
    stamp_ns,
)
from transkd_segmentation.stats import camera_health, loop_health, status_fields  # noqa: E402

SIZE = (64, 128)  # network
FRAME = (96, 192)  # camera
CHANNELS = {"bgr8": 3, "rgb8": 3, "mono8": 1, "bgra8": 4, "rgba8": 4}


@pytest.fixture(scope="module")
def ts():
    store = get_typestore(Stores.ROS2_HUMBLE)
    for name, text in rosmsg.VISION_MSGS.items():
        store.register(get_types_from_msg(text, name))
    return store


@pytest.fixture(scope="module")
def art(tmp_path_factory, synthetic):
    """A tiny student exported as a float/logits ONNX at 64x128, its checkpoint, and BGR camera frames."""
    train, val = splits(synthetic(4, 4, FRAME))
    model = spread_student()
    d = tmp_path_factory.mktemp("artifact")
    export_tiny(d, val, train, SIZE, model=model)
    d4 = tmp_path_factory.mktemp("artifact-b4")  # the same network, a static batch of 4
    export_tiny(d4, val, train, SIZE, model=model, batch=4)
    return {"onnx": Segmenter.open(d / "student.onnx", provider="cpu"),
            "onnx_b4": Segmenter.open(d4 / "student.onnx", provider="cpu"),
            "ckpt": Segmenter.open(save_model(model, d / "student.safetensors"), device="cpu", size=SIZE),
            "frames": [np.ascontiguousarray(val.read(i)[0][:, :, ::-1]) for i in range(4)]}


# ------------------------------------------------------------------------------------------------ messages
def header(ts, i: int, frame_id: str = "cam_front"):
    return ts.types["std_msgs/msg/Header"](stamp=ts.types["builtin_interfaces/msg/Time"](sec=1_700_000_000 + i,
                                                                                          nanosec=250_000 + i),
                                           frame_id=frame_id)


def cdr(ts, msg, msgtype: str):
    """Through the wire: serialised as a ROS 2 publisher would, deserialised as a subscriber would."""
    return ts.deserialize_cdr(ts.serialize_cdr(msg, msgtype), msgtype)


def image(ts, bgr: np.ndarray, encoding: str, i: int = 0, pad: int = 7, head=None):
    """A sensor_msgs/Image of `bgr` in `encoding` with `pad` bytes of row padding in `step` (header `head`, else
    frame i's); also the BGR frame the node should decode from it."""
    conv = {"bgr8": None, "rgb8": cv2.COLOR_BGR2RGB, "mono8": cv2.COLOR_BGR2GRAY, "bgra8": cv2.COLOR_BGR2BGRA,
            "rgba8": cv2.COLOR_BGR2RGBA}[encoding]
    pixels = bgr if conv is None else cv2.cvtColor(bgr, conv)
    h, w = bgr.shape[:2]
    row = w * CHANNELS[encoding]
    rows = np.full((h, row + pad), 0xAB, np.uint8)  # padding bytes that must not leak into the frame
    rows[:, :row] = pixels.reshape(h, row)
    msg = ts.types[rosmsg.IMAGE](header=head or header(ts, i), height=h, width=w, encoding=encoding, is_bigendian=0,
                                 step=row + pad, data=rows.reshape(-1))
    expected = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR) if encoding == "mono8" else bgr
    return cdr(ts, msg, rosmsg.IMAGE), expected


def compressed(ts, bgr: np.ndarray, fmt: str, i: int = 0):
    ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", bgr)
    assert ok
    # image_transport writes e.g. "bgr8; jpeg compressed bgr8"
    msg = ts.types[rosmsg.COMPRESSED_IMAGE](header=header(ts, i), format=f"bgr8; {fmt} compressed bgr8",
                                            data=np.frombuffer(buf, np.uint8).copy())
    return cdr(ts, msg, rosmsg.COMPRESSED_IMAGE), cv2.imdecode(buf, cv2.IMREAD_COLOR)


def camera_info(ts, i: int = 0):
    t = ts.types
    msg = t["sensor_msgs/msg/CameraInfo"](
        header=header(ts, i), height=FRAME[0], width=FRAME[1], distortion_model="plumb_bob",
        d=np.array([-0.3, 0.1, 0.001, -0.002, 0.0]), k=np.array([200.0, 0, 96, 0, 210, 48, 0, 0, 1]),
        r=np.eye(3).reshape(-1), p=np.array([200.0, 0, 96, -40, 0, 210, 48, 0, 0, 0, 1, 0]), binning_x=1,
        binning_y=1, roi=t["sensor_msgs/msg/RegionOfInterest"](x_offset=24, y_offset=12, height=48, width=96,
                                                                do_rectify=True))
    return cdr(ts, msg, "sensor_msgs/msg/CameraInfo")


class Sink:
    """Publish callbacks that build the outgoing messages with the typestore and send them through CDR."""

    def __init__(self, ts) -> None:
        self.ts, self.mask, self.overlay, self.info = ts, [], [], []

    def image(self, out: list):
        return lambda f: out.append(cdr(self.ts, self.ts.types[rosmsg.IMAGE](**f), rosmsg.IMAGE))

    def camera_info(self, f: dict) -> None:
        t = self.ts.types
        msg = t["sensor_msgs/msg/CameraInfo"](**{**f, "roi": t["sensor_msgs/msg/RegionOfInterest"](**f["roi"])})
        self.info.append(cdr(self.ts, msg, "sensor_msgs/msg/CameraInfo"))

    def outputs(self, overlay: bool = True, info: bool = False) -> CameraOutputs:
        return CameraOutputs(self.image(self.mask), self.image(self.overlay) if overlay else None,
                             self.camera_info if info else None)

    def loop(self, seg, overlay: bool = True, info: bool = False, **kwargs) -> SegmentationLoop:
        kwargs.setdefault("clock", time.time_ns)
        return SegmentationLoop(seg, self.outputs(overlay, info), **kwargs)


def counts(loop: SegmentationLoop, camera: str = "camera") -> tuple[int, ...]:
    """(received, processed, dropped, refused, errors) of one camera."""
    s = loop.stats[camera].snapshot()
    return s["received"], s["processed"], s["dropped"], s["refused"], s["errors"]


def ids_of(msg) -> np.ndarray:
    assert msg.encoding == "mono8" and msg.step == msg.width
    return np.asarray(msg.data, np.uint8).reshape(msg.height, msg.width)


def rgb_of(msg) -> np.ndarray:
    assert msg.encoding == "rgb8" and msg.step == 3 * msg.width
    return np.asarray(msg.data, np.uint8).reshape(msg.height, msg.width, 3)


def same_header(a, b) -> bool:
    return (a.stamp.sec, a.stamp.nanosec, a.frame_id) == (b.stamp.sec, b.stamp.nanosec, b.frame_id)


# ------------------------------------------------------------------------------------------------ the loop
@pytest.mark.parametrize("encoding", [*CHANNELS, "jpeg", "png"])
def test_every_encoding_gives_the_segmenters_mask_under_the_input_header(ts, art, encoding):
    seg = art["onnx"]
    frame = art["frames"][0]
    msg, bgr = compressed(ts, frame, encoding, 3) if encoding in ("jpeg", "png") else image(ts, frame, encoding, 3)
    sink = Sink(ts)
    loop = sink.loop(seg)
    loop.submit(msg)
    assert loop.step() and not loop.step()
    (mask,), (overlay,) = sink.mask, sink.overlay
    ids = ids_of(mask)
    assert ids.shape == FRAME and np.array_equal(ids, seg.predict(bgr))
    assert len(np.unique(ids)) > 1
    assert same_header(mask.header, msg.header) and same_header(overlay.header, msg.header)
    assert np.array_equal(rgb_of(overlay), seg.colorize(ids, bgr))
    assert counts(loop) == (1, 1, 0, 0, 0)


def test_checkpoint_segmenter_and_palette_colours(ts, art):
    seg = art["ckpt"]
    frame = art["frames"][1]
    msg, bgr = image(ts, frame, "rgb8", 1)
    sink = Sink(ts)
    loop = sink.loop(seg, overlay_alpha=1.0)  # colours only: every overlay pixel is its class's palette colour
    loop.submit(msg)
    assert loop.step()
    ids, rgb = ids_of(sink.mask[0]), rgb_of(sink.overlay[0])
    assert np.array_equal(ids, seg.predict(bgr))
    palette = np.asarray(seg.meta.palette, np.uint8)
    assert np.array_equal(rgb, palette[ids])
    # the ONNX export of the same weights agrees
    assert (ids == art["onnx"].predict(bgr)).mean() >= 0.999


def test_overlay_is_skipped_when_disabled(ts, art):
    sink = Sink(ts)
    loop = sink.loop(art["onnx"], overlay=False)
    loop.submit(image(ts, art["frames"][0], "bgr8")[0])
    assert loop.step()
    assert len(sink.mask) == 1 and sink.overlay == []


def test_network_resolution_and_camera_info_passthrough(ts, art):
    seg = art["onnx"]
    msg, bgr = image(ts, art["frames"][2], "bgra8", 2)
    sink = Sink(ts)
    loop = sink.loop(seg, info=True, output_resolution="network")
    loop.submit(msg)
    assert loop.step()
    assert sink.info == []  # no CameraInfo heard yet: none to pass through
    loop.set_camera_info(camera_info(ts, 0))
    loop.submit(msg)
    assert loop.step()
    mask, overlay, info = sink.mask[-1], sink.overlay[-1], sink.info[-1]
    ids = ids_of(mask)
    # the network's own resolution: the same resized input the network sees, no upsampling to the camera
    small = cv2.resize(bgr, SIZE[::-1], interpolation=cv2.INTER_LINEAR)
    assert ids.shape == SIZE and np.array_equal(ids, seg.predict(small))
    assert (ids == cv2.resize(seg.predict(bgr), SIZE[::-1], interpolation=cv2.INTER_NEAREST)).mean() >= 0.9
    assert rgb_of(overlay).shape == (*SIZE, 3)
    assert (info.height, info.width) == SIZE and same_header(info.header, msg.header)  # stamped like the mask
    assert np.allclose(info.k, [200 * 2 / 3, 0, 64, 0, 210 * 2 / 3, 32, 0, 0, 1])


def test_network_resolution_needs_a_fixed_size(ts, art, tmp_path):
    seg = Segmenter.open(art["ckpt"].path, device="cpu")  # a checkpoint opened without size=
    with pytest.raises(InputError, match="network_size"):
        Sink(ts).loop(seg, output_resolution="network")
    with pytest.raises(InputError, match="output_resolution"):
        Sink(ts).loop(art["onnx"], output_resolution="half")


def test_unsupported_encodings_are_refused_and_logged_once_each(ts, art, caplog):
    h, w = 4, 6
    Image = ts.types[rosmsg.IMAGE]

    def raw(encoding, step):
        return cdr(ts, Image(header=header(ts, 0), height=h, width=w, encoding=encoding, is_bigendian=0, step=step,
                             data=np.zeros(step * h, np.uint8)), rosmsg.IMAGE)

    tiff = cdr(ts, ts.types[rosmsg.COMPRESSED_IMAGE](header=header(ts, 0), format="tiff", data=np.zeros(8, np.uint8)),
               rosmsg.COMPRESSED_IMAGE)
    bad = [raw("16UC1", 2 * w), raw("yuv422", 2 * w), raw("16UC1", 2 * w), tiff, raw("rgb8", 2)]  # rgb8: step short
    sink = Sink(ts)
    loop = sink.loop(art["onnx"])
    with caplog.at_level(logging.WARNING, logger="transkd_segmentation"):
        for msg in bad:
            loop.submit(msg)
            assert loop.step()
        loop.submit(image(ts, art["frames"][0], "rgb8")[0])  # the loop goes on after them
        assert loop.step()
    assert counts(loop) == (6, 1, 0, 5, 0)
    assert len(sink.mask) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4  # 16UC1 once, yuv422, tiff, rgb8
    for name in ("'16UC1'", "'yuv422'", "'tiff'", "'rgb8'"):
        assert sum(name in line for line in lines) >= 1
    assert sum("'16UC1'" in line for line in lines) == 1


def test_a_failing_frame_is_counted_and_the_loop_goes_on(ts, art, caplog):
    sink = Sink(ts)

    def broken(f):
        raise RuntimeError("publisher gone")

    loop = SegmentationLoop(art["onnx"], CameraOutputs(broken), clock=time.time_ns)
    with caplog.at_level(logging.ERROR, logger="transkd_segmentation"):
        for i in range(2):
            loop.submit(image(ts, art["frames"][0], "bgr8", i)[0])
            assert loop.step()
    assert counts(loop)[4] == 2
    assert len(caplog.records) == 1 and "RuntimeError: publisher gone" in caplog.records[0].getMessage()
    loop = sink.loop(art["onnx"])
    loop.submit(image(ts, art["frames"][0], "bgr8")[0])
    assert loop.step() and len(sink.mask) == 1


class BlockingSegmenter:
    """The real Segmenter, held at the start of every predict until the test releases it."""

    def __init__(self, seg: Segmenter) -> None:
        self.seg, self.entered, self.release = seg, threading.Semaphore(0), threading.Semaphore(0)

    def __getattr__(self, name):
        return getattr(self.seg, name)

    def predict(self, bgr):
        self.entered.release()
        assert self.release.acquire(timeout=30)
        return self.seg.predict(bgr)


def test_newest_frame_wins_while_the_worker_is_busy(ts, art):
    seg = BlockingSegmenter(art["onnx"])
    sink = Sink(ts)
    loop = sink.loop(seg).start()
    try:
        msgs = [image(ts, art["frames"][i % 3], "rgb8", i)[0] for i in range(5)]
        loop.submit(msgs[0])
        assert seg.entered.acquire(timeout=30)  # the worker holds frame 0 in predict
        start = time.perf_counter()
        for m in msgs[1:]:
            loop.submit(m)  # never blocks on the busy worker; each replaces the one before
        assert time.perf_counter() - start < 0.5
        seg.release.release()
        assert seg.entered.acquire(timeout=30)  # ... then it takes the newest, frame 4
        seg.release.release()
        deadline = time.monotonic() + 30
        while len(sink.mask) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        loop.stop()
    assert [m.header.stamp.sec for m in sink.mask] == [msgs[0].header.stamp.sec, msgs[4].header.stamp.sec]
    assert np.array_equal(ids_of(sink.mask[1]), art["onnx"].predict(art["frames"][1]))
    assert counts(loop)[:3] == (5, 2, 3)
    assert loop.alive() is False


def test_stepped_loop_takes_only_the_newest(ts, art):
    sink = Sink(ts)
    loop = sink.loop(art["onnx"], overlay=False)
    for i in range(3):
        loop.submit(image(ts, art["frames"][i], "bgr8", i)[0])
    assert loop.step() and not loop.step()
    assert [m.header.stamp.sec for m in sink.mask] == [1_700_000_002]
    assert counts(loop)[2] == 2


class Clock:
    """A monotonic clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_latency_is_measured_stamp_to_publish_in_the_given_clock(ts, art):
    msgs = [image(ts, art["frames"][0], "bgr8", i)[0] for i in range(4)]
    delays = iter([10, 20, 30, 40])  # ms after each frame's stamp, as a ROS clock would say
    current = {}
    sink = Sink(ts)
    mono = Clock()
    loop = sink.loop(art["onnx"], overlay=False, window=3, monotonic=mono,
                     clock=lambda: stamp_ns(current["msg"].header) + next(delays) * 1_000_000)
    for m in msgs:
        current["msg"] = m
        loop.submit(m)
        assert loop.step()
    s = loop.stats["camera"].snapshot()
    assert s["latency_p50_ms"] == pytest.approx(30.0) and s["latency_max_ms"] == pytest.approx(40.0)  # last 3
    assert s["latency_p90_ms"] == pytest.approx(38.0)
    b = loop.batches.snapshot()
    assert (b["batches"], b["frames"], b["mean_batch"]) == (4, 4, 1.0)
    assert 0 < b["predict_p50_ms"] <= b["compute_p50_ms"]
    mono.t += 2.0
    report = loop.report("segmentation_node", "student.onnx")
    (cam_level, cam_line), (loop_level, loop_line) = report.lines
    assert cam_level == OK and loop_level == OK
    assert "processed 4" in cam_line and "2.0 Hz" in cam_line and "p50 30.0" in cam_line and "\n" not in cam_line
    assert "batches 4" in loop_line


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_ages_with_the_period_and_the_worker(ts, art):
    """The rate is the period's, never older frames'; frames that arrive and are not processed, a camera that goes
    quiet and a worker thread that ended each show at the next report."""
    sink = Sink(ts)
    mono = Clock()
    loop = sink.loop(art["onnx"], overlay=False, monotonic=mono)
    for i in range(4):
        loop.submit(image(ts, art["frames"][0], "bgr8", i)[0])
        assert loop.step()
    mono.t += 2.0
    first = loop.report("n", "student.onnx")
    values = {v["key"]: v["value"] for v in first.statuses[0]["values"]}
    assert first.statuses[0]["level"] == OK and values["rate_hz"] == "2.00" and values["processed"] == "4"
    assert first.statuses[0]["name"] == "n: camera" and first.statuses[1]["name"] == "n: loop"
    mono.t += 5.0  # nothing at all: the camera is quiet, its rate 0 (not the 2 Hz of the frames before)
    quiet = loop.report("n", "student.onnx")
    values = {v["key"]: v["value"] for v in quiet.statuses[0]["values"]}
    assert quiet.statuses[0]["level"] == WARN and "no frames received in the last 5.0 s" in quiet.statuses[0]["message"]
    assert values["rate_hz"] == "0.00" and quiet.statuses[1]["level"] == OK
    for i in range(3):  # frames arrive, the worker takes none
        loop.submit(image(ts, art["frames"][0], "bgr8", 10 + i)[0])
    mono.t += 5.0
    stalled = loop.report("n", "student.onnx")
    assert stalled.statuses[0]["level"] == WARN and "3 frames received and none published" in \
        stalled.statuses[0]["message"]
    assert stalled.statuses[1]["level"] == WARN and "no batch ran" in stalled.statuses[1]["message"]

    def ends_the_worker(f):
        raise SystemExit  # not an Exception: nothing inside the loop catches it, the thread ends

    dead = SegmentationLoop(art["onnx"], CameraOutputs(ends_the_worker), clock=time.time_ns, monotonic=mono).start()
    dead.submit(image(ts, art["frames"][0], "bgr8")[0])
    dead._thread.join(30)
    mono.t += 5.0
    gone = dead.report("n", "student.onnx")
    assert gone.statuses[1]["level"] == ERROR and "worker thread has ended" in gone.statuses[1]["message"]
    assert gone.lines[1][0] == ERROR


def test_health_levels_and_diagnostics_round_trip(ts):
    base = {"received": 10, "processed": 8, "dropped": 2, "refused": 0, "errors": 0}
    assert camera_health(base, None, 5.0) == (OK, "segmenting at 1.6 Hz, 2 frames dropped in the last 5.0 s")
    assert camera_health(base, base, 5.0) == (WARN, "no frames received in the last 5.0 s")
    assert camera_health(base, base, 5.0, others_running=True)[1].endswith("while other cameras send")
    assert camera_health({**base, "received": 12, "refused": 1, "processed": 9}, base, 5.0)[0] == WARN
    assert camera_health({**base, "received": 12, "errors": 1}, base, 5.0)[0] == ERROR
    loop = {"batches": 4, "frames": 10, "errors": 0}
    assert loop_health(loop, None, 5.0, 10, True) == (OK, "4 batches of 2.50 frames on average in the last 5.0 s")
    assert loop_health(loop, loop, 5.0, 3, True)[0] == WARN
    assert loop_health(loop, loop, 5.0, 0, None)[0] == OK  # nothing arrived, nothing to do
    assert loop_health({**loop, "errors": 1}, loop, 5.0, 0, True)[0] == ERROR
    assert loop_health(loop, None, 5.0, 10, False)[0] == ERROR
    f = status_fields("segmentation_node: front", "student.onnx", OK, "fine",
                      {**base, "rate_hz": 9.5, "latency_p90_ms": None})
    t = ts.types
    status = t["diagnostic_msgs/msg/DiagnosticStatus"](**{**f, "values": [t["diagnostic_msgs/msg/KeyValue"](**v)
                                                                          for v in f["values"]]})
    msg = cdr(ts, t["diagnostic_msgs/msg/DiagnosticArray"](header=header(ts, 0), status=[status]),
              "diagnostic_msgs/msg/DiagnosticArray")
    values = {v.key: v.value for v in msg.status[0].values}
    assert msg.status[0].level == OK and values["processed"] == "8" and values["latency_p90_ms"] == ""
    assert values["rate_hz"] == "9.50"


class RclpyLogger:
    """A logger that keeps rclpy's rule (rclpy/impl/rcutils_logger.py): a call site, the caller's function, file,
    line and bytecode offset, logs at one severity; another severity from it raises ValueError."""

    def __init__(self) -> None:
        self.sites: dict[tuple, str] = {}
        self.lines: list[tuple[str, str]] = []

    def _log(self, severity: str, message: str) -> None:
        frame = sys._getframe(2)  # the caller of warning() / error() / info()
        site = (frame.f_code.co_name, frame.f_code.co_filename, frame.f_lineno, frame.f_lasti)
        if self.sites.setdefault(site, severity) != severity:
            raise ValueError("Logger severity cannot be changed between calls.")
        self.lines.append((severity, message))

    def info(self, message: str) -> None:
        self._log("INFO", message)

    def warning(self, message: str) -> None:
        self._log("WARN", message)

    def error(self, message: str) -> None:
        self._log("ERROR", message)


def test_refused_then_failing_frame_under_rclpys_logging_rule_keeps_the_worker_publishing(ts, art):
    bad = 1_700_000_001  # the stamp of the frame whose publishing fails
    published = []

    def mask(f):
        if f["header"].stamp.sec == bad:
            raise RuntimeError("publisher gone")
        published.append(f["header"].stamp.sec)

    log = RclpyLogger()
    loop = SegmentationLoop(art["onnx"], CameraOutputs(mask), clock=time.time_ns, log=log).start()
    try:
        Image = ts.types[rosmsg.IMAGE]
        loop.submit(cdr(ts, Image(header=header(ts, 0), height=2, width=2, encoding="16UC1", is_bigendian=0, step=4,
                                  data=np.zeros(8, np.uint8)), rosmsg.IMAGE))
        wait_for(lambda: counts(loop)[3] == 1)
        loop.submit(image(ts, art["frames"][0], "bgr8", 1)[0])
        wait_for(lambda: counts(loop)[4] == 1)
        for i in (2, 3):
            loop.submit(image(ts, art["frames"][i - 1], "bgr8", i)[0])
            wait_for(lambda n=i - 1: len(published) == n)
    finally:
        loop.stop()
    assert published == [1_700_000_002, 1_700_000_003]
    assert [s for s, _ in log.lines] == ["WARN", "ERROR"]
    assert "'16UC1'" in log.lines[0][1] and "RuntimeError: publisher gone" in log.lines[1][1]
    assert counts(loop) == (4, 2, 0, 1, 1) and loop.batches.snapshot()["errors"] == 0
    # the node's periodic report logs each severity from a line of its own too
    node = (PKG / "transkd_segmentation" / "node.py").read_text()
    assert "log.error(line)" in node and "log.warning(line)" in node and "log.info(line)" in node


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_stop_waits_for_the_frame_in_flight_and_nothing_is_published_after(ts, art):
    seg = BlockingSegmenter(art["onnx"])
    sink = Sink(ts)
    loop = sink.loop(seg, overlay=False).start()
    loop.submit(image(ts, art["frames"][0], "bgr8", 0)[0])
    assert seg.entered.acquire(timeout=30)  # frame 0 is in predict
    stopper = threading.Thread(target=loop.stop)
    stopper.start()
    time.sleep(0.2)
    assert stopper.is_alive() and sink.mask == []  # stop() waits for the frame in flight ...
    seg.release.release()
    stopper.join(30)
    assert not stopper.is_alive() and len(sink.mask) == 1  # ... which is published before stop returns
    assert loop.alive() is False

    # a frame that outlives the wait publishes nothing: the node destroys its publishers right after stop()
    late = sink.loop(seg, overlay=False).start()
    late.submit(image(ts, art["frames"][1], "bgr8", 1)[0])
    assert seg.entered.acquire(timeout=30)
    late.stop(timeout=0.05)
    seg.release.release()
    late._thread.join(30)
    assert len(sink.mask) == 1 and counts(late)[1] == 0


# ------------------------------------------------------------------------------------------------ fields
def test_camera_info_scaling(ts):
    info = camera_info(ts, 5)
    f = scale_camera_info(info, FRAME, SIZE)  # 96x192 -> 64x128: 2/3 on both axes
    assert (f["height"], f["width"]) == SIZE
    assert np.allclose(f["k"], [200 * 2 / 3, 0, 64, 0, 140, 32, 0, 0, 1])
    assert np.allclose(f["p"], [200 * 2 / 3, 0, 64, -40 * 2 / 3, 0, 140, 32, 0, 0, 0, 1, 0])
    assert f["roi"] == {"x_offset": 16, "y_offset": 8, "height": 32, "width": 64, "do_rectify": True}
    assert np.array_equal(f["d"], info.d) and np.array_equal(f["r"], info.r)
    assert (f["distortion_model"], f["binning_x"], f["binning_y"]) == ("plumb_bob", 1, 1)
    wide = scale_camera_info(info, FRAME, (48, 192))  # per axis
    assert np.allclose(wide["k"], [200, 0, 96, 0, 105, 24, 0, 0, 1]) and (wide["height"], wide["width"]) == (48, 192)
    same = scale_camera_info(info, FRAME, FRAME)
    assert np.array_equal(same["k"], info.k) and np.array_equal(same["p"], info.p)
    sink = Sink(ts)
    sink.camera_info(f)  # builds with the typestore classes and crosses CDR
    back = sink.info[0]
    assert np.allclose(back.k, f["k"]) and back.roi.width == 64 and back.roi.do_rectify
    assert same_header(back.header, info.header)


def test_label_info_class_map(ts, art):
    seg = art["onnx"]
    f = label_info_fields(seg.classes, header(ts, 0, ""))
    t = ts.types
    msg = t["vision_msgs/msg/LabelInfo"](header=f["header"], threshold=f["threshold"],
                                         class_map=[t["vision_msgs/msg/VisionClass"](**c) for c in f["class_map"]])
    back = cdr(ts, msg, "vision_msgs/msg/LabelInfo")
    assert [(c.class_id, c.class_name) for c in back.class_map] == list(enumerate(seg.classes))
    assert len(back.class_map) == 19 and back.class_map[0].class_name == "road" and back.threshold == 0.0


def test_node_params(tmp_path):
    p = NodeParams(artifact="x.onnx", network_size="64x128", input_transport="compressed",
                   image_topic="cam/image_raw/")
    assert p.input_topic() == "cam/image_raw/compressed" and NodeParams().input_topic() == "image_raw"
    assert p.open_kwargs() == {"device": "auto", "provider": "auto", "threads": 0, "dtype": "fp32", "mode": "eager",
                               "deploy": False, "size": (64, 128)}
    assert parse_size("") is None and parse_size("512X1024") == (512, 1024)
    for bad in ({"network_size": "64"}, {"output_resolution": "half"}, {"input_transport": "theora"},
                {"overlay_alpha": 2.0}, {"qos_depth": 0}, {"sync_slop": -1.0}, {"cameras": ["front", "front"]},
                {"cameras": ["2nd"]}, {"camera_transports": ["raw"]},
                {"cameras": ["front"], "camera_transports": ["theora"]},
                {"cameras": ["front"], "mask_topic": "/segmentation/mask"}):
        with pytest.raises(InputError, match=next(reversed(bad)).split("_")[0]):
            NodeParams(**bad)
    assert all(NodeParams.descriptions().values())


def test_topics_are_relative_so_the_namespace_moves_them():
    params = yaml.safe_load((PKG / "config" / "segmentation.yaml").read_text())["/**"]["ros__parameters"]
    for source in (params, NodeParams.defaults()):
        topics = {k: v for k, v in source.items() if k.endswith("_topic")}
        assert len(topics) == 6 and not [v for v in topics.values() if v.startswith("/")]
    (only,) = NodeParams().camera_topics()
    assert (only.name, only.image, only.camera_info, only.mask, only.overlay, only.camera_info_out) == (
        "camera", "image_raw", "camera_info", "segmentation/mask", "segmentation/overlay", "segmentation/camera_info")
    node = (PKG / "transkd_segmentation" / "node.py").read_text()
    assert '"/diagnostics"' in node  # the one absolute topic, where diagnostic aggregators listen


def test_camera_topics_under_each_camera():
    p = NodeParams(cameras=["front", "left", "rigs/rear"], camera_transports=["raw", "compressed", "raw"],
                   camera_info_topic="")
    front, left, rear = p.camera_topics()
    assert (front.image, front.mask, front.overlay, front.camera_info_out) == (
        "front/image_raw", "front/segmentation/mask", "front/segmentation/overlay", "front/segmentation/camera_info")
    assert (left.transport, left.image) == ("compressed", "left/image_raw/compressed")
    assert rear.image == "rigs/rear/image_raw" and front.camera_info == "" and rear.camera_info == ""
    assert [c.transport for c in NodeParams(cameras=["a", "b"], input_transport="compressed").camera_topics()] == [
        "compressed", "compressed"]
    multicam = yaml.safe_load((PKG / "config" / "multicam.yaml").read_text())["/**"]["ros__parameters"]
    p = NodeParams.from_values(multicam)
    assert [c.name for c in p.camera_topics()] == ["front", "left", "right", "rear"]
    assert p.camera_topics()[3].image == "rear/image_raw/compressed" and p.sync_slop > 0


def test_wrong_parameter_types_are_one_line():
    with pytest.raises(InputError, match=r"^parameter stats_period: 5 \(integer\) given, expected double \(ROS "):
        NodeParams.from_values({"stats_period": 5})
    with pytest.raises(InputError, match=r"parameter warmup: 1 \(integer\) given, expected bool"):
        NodeParams.from_values({"warmup": 1})
    with pytest.raises(InputError, match=r"parameter threads: True \(bool\) given, expected integer"):
        NodeParams.from_values({"threads": True})
    with pytest.raises(InputError, match=r"parameter cameras: 'front' \(string\) given, expected string array"):
        NodeParams.from_values({"cameras": "front"})
    with pytest.raises(InputError, match="did you mean image_topic"):
        NodeParams.from_values({"image_topik": "x"})
    # rclpy's InvalidParameterTypeException while declaring: Humble's message, and Jazzy's (name appended)
    humble = "Trying to set parameter 'stats_period' to '5' of type 'INTEGER', expecting type 'DOUBLE'"
    line = parameter_error_line(humble, "stats_period")
    assert line.startswith("parameter stats_period: '5' (integer) given, expected double (ROS parameter types")
    assert parameter_error_line(humble + ": stats_period", "stats_period") == line
    jazzy = ("Trying to set parameter 'cameras' to '['front', 'left']' of type 'STRING_ARRAY', expecting type "
             "'BYTE_ARRAY': cameras")
    assert parameter_error_line(jazzy, "cameras") == ("parameter cameras: \"['front', 'left']\" (string array) "
                                                      "given, expected byte array")
    other = parameter_error_line("Invalid parameter value (x) for parameter. Reason: no\nmore", "mode")
    assert other == "parameter mode: Invalid parameter value (x) for parameter. Reason: no"


def test_the_loop_and_parameters_import_no_backend():
    """The node imports the Segmenter's backend only when it opens the artifact: an engine or ONNX file runs without
    torch, a ROS Python without onnxruntime can still start an engine."""
    code = ("import sys; sys.path.insert(0, 'ros'); import transkd_segmentation.params, "
            "transkd_segmentation.processing, pipeline.infer, pipeline.batching; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'tensorrt', 'onnx') if m in sys.modules))")
    rc, out, err = run_cli("-c", code, module=None)
    assert rc == 0, err
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------------ several cameras
CAMS = ("front", "left", "right", "rear")


def cam_header(ts, camera: str, ns: int):
    """A header stamped `ns` nanoseconds after 1_700_000_000 s, in the camera's frame."""
    t = 1_700_000_000 * 10**9 + ns
    return ts.types["std_msgs/msg/Header"](stamp=ts.types["builtin_interfaces/msg/Time"](sec=t // 10**9,
                                                                                          nanosec=t % 10**9),
                                           frame_id=camera)


def bayer(ts, head):
    """A raw frame in an encoding the node refuses."""
    return cdr(ts, ts.types[rosmsg.IMAGE](header=head, height=4, width=6, encoding="bayer_rggb8", is_bigendian=0,
                                          step=6, data=np.zeros(24, np.uint8)), rosmsg.IMAGE)


class RecordingSegmenter:
    """The real Segmenter; remembers how many frames each predict call got."""

    def __init__(self, seg: Segmenter) -> None:
        self.seg, self.calls = seg, []

    def __getattr__(self, name):
        return getattr(self.seg, name)

    def predict(self, frames):
        self.calls.append(len(frames))
        return self.seg.predict(frames)


def camera_frame(art, camera: str, tick: int) -> np.ndarray:
    """Each camera sees other frames each tick; the right camera a smaller image than the others."""
    bgr = art["frames"][(CAMS.index(camera) + tick) % 4]
    return cv2.resize(bgr, (144, 72), interpolation=cv2.INTER_AREA) if camera == "right" else bgr


@pytest.mark.parametrize("which", ["onnx", "onnx_b4"])
def test_four_cameras_at_different_rates_one_batch_per_tick(ts, art, which):
    """front every tick, left every second one, right stalls after two frames, rear sends a refused encoding: each
    tick is one predict over the cameras with a new frame, each result on its own camera's publishers under its
    frame's header, equal to predicting that frame alone; a batch-1 graph and a static batch-4 graph (padded by
    the Segmenter) alike."""
    seg = RecordingSegmenter(art[which])
    sinks = {c: Sink(ts) for c in CAMS}
    mono = Clock()
    loop = SegmentationLoop(seg, {c: sinks[c].outputs(info=c == "front") for c in CAMS}, clock=time.time_ns,
                            monotonic=mono)
    loop.set_camera_info(camera_info(ts), "front")
    plan = {"front": range(6), "left": (0, 2, 4), "right": (0, 1), "rear": (0, 3)}
    sent: dict[str, list] = {c: [] for c in CAMS}
    batches, reports = [], []
    for tick in range(6):
        before = {c: len(sinks[c].mask) for c in CAMS}
        for c in CAMS:
            if tick in plan[c]:
                head = cam_header(ts, c, tick * 100_000_000 + CAMS.index(c) * 1_000_000)
                if c == "rear":
                    loop.submit(bayer(ts, head), c)
                else:
                    msg, bgr = image(ts, camera_frame(art, c, tick), "rgb8", head=head)
                    loop.submit(msg, c)
                    sent[c].append((msg, bgr))
        assert loop.step() and not loop.step()
        batches.append([c for c in CAMS if len(sinks[c].mask) > before[c]])
        if tick in (1, 5):
            mono.t += 5.0
            reports.append(loop.report("segmentation_node", seg.path.name))
    assert batches == [["front", "left", "right"], ["front", "right"], ["front", "left"], ["front"],
                       ["front", "left"], ["front"]]
    assert seg.calls == [3, 2, 2, 1, 2, 1]  # one predict per tick, whatever the graph's batch
    for c in ("front", "left", "right"):
        sink = sinks[c]
        assert len(sink.mask) == len(sent[c]) == len(sink.overlay)  # nothing re-published, nothing lost
        for (msg, bgr), mask, overlay in zip(sent[c], sink.mask, sink.overlay):
            assert same_header(mask.header, msg.header) and same_header(overlay.header, msg.header)
            assert mask.header.frame_id == c
            ids = ids_of(mask)
            assert ids.shape == bgr.shape[:2] and np.array_equal(ids, art[which].predict(bgr))  # as if alone
            assert np.array_equal(rgb_of(overlay), art[which].colorize(ids, bgr))
    assert len(sinks["front"].info) == 6 and all(s.info == [] for c, s in sinks.items() if c != "front")
    assert sinks["rear"].mask == []
    assert counts(loop, "front") == (6, 6, 0, 0, 0) and counts(loop, "left") == (3, 3, 0, 0, 0)
    assert counts(loop, "right") == (2, 2, 0, 0, 0) and counts(loop, "rear") == (2, 0, 0, 2, 0)
    b = loop.batches.snapshot()
    assert (b["batches"], b["frames"], b["mean_batch"]) == (6, 11, pytest.approx(11 / 6))
    first, second = ({s["name"].split(": ")[1]: (s["level"], s["message"]) for s in r.statuses} for r in reports)
    assert {c: level for c, (level, _) in first.items()} == {"front": OK, "left": OK, "right": OK, "rear": WARN,
                                                             "loop": OK}
    assert {c: level for c, (level, _) in second.items()} == {"front": OK, "left": OK, "right": WARN, "rear": WARN,
                                                              "loop": OK}
    assert second["right"][1] == "no frames received in the last 5.0 s while other cameras send"
    assert "1 frames refused" in second["rear"][1] and "4 batches of 1.50 frames" in second["loop"][1]


def test_four_cameras_from_four_threads(ts, art):
    seg = art["onnx_b4"]
    sinks = {c: Sink(ts) for c in CAMS}
    loop = SegmentationLoop(seg, {c: sinks[c].outputs(overlay=False) for c in CAMS}, clock=time.time_ns).start()
    frames: dict[tuple[str, int], np.ndarray] = {}
    plan = {"front": (12, 0.004), "left": (6, 0.01), "right": (2, 0.004), "rear": (3, 0.004)}

    def camera(c: str) -> None:
        n, period = plan[c]
        for i in range(n):
            head = cam_header(ts, c, i * 10_000_000)
            if c == "rear":
                loop.submit(bayer(ts, head), c)
            else:
                msg, bgr = image(ts, camera_frame(art, c, i), "bgr8", head=head)
                frames[c, stamp_ns(head)] = bgr
                loop.submit(msg, c)
            time.sleep(period)

    threads = [threading.Thread(target=camera, args=(c,)) for c in CAMS]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        wait_for(lambda: all(sum(counts(loop, c)[1:]) == counts(loop, c)[0] for c in CAMS))
    finally:
        loop.stop()
    for c in CAMS:
        received, processed, dropped, refused, errors = counts(loop, c)
        assert received == plan[c][0] and errors == 0 and len(sinks[c].mask) == processed
        stamps = [stamp_ns(m.header) for m in sinks[c].mask]
        assert stamps == sorted(set(stamps))  # each frame once, in order
        for m in sinks[c].mask:
            assert m.header.frame_id == c and np.array_equal(ids_of(m), seg.predict(frames[c, stamp_ns(m.header)]))
    received, processed, dropped, refused, errors = counts(loop, "rear")  # a refused frame may be replaced first
    assert (received, processed, dropped + refused, errors) == (3, 0, 3, 0) and refused >= 1
    assert counts(loop, "front")[1] >= 1
    assert counts(loop, "left")[1] >= 1 and counts(loop, "right")[1] >= 1
    assert loop.batches.snapshot()["frames"] == sum(counts(loop, c)[1] for c in CAMS)


# ------------------------------------------------------------------------------------------------ time sync
def test_best_group_within_the_slop():
    ms = 1_000_000

    def q(*stamps):
        return [Waiting(None, s * ms, 0.0) for s in stamps]

    group = best_group({"a": q(0), "b": q(4), "c": q(30)}, 10 * ms)
    assert {c: w.stamp for c, w in group.items()} == {"a": 0, "b": 4 * ms}  # the most cameras
    assert list(best_group({"a": q(0), "b": q(30)}, 10 * ms)) == ["b"]  # a tie: the newest
    group = best_group({"a": q(0, 5), "b": q(6), "c": q()}, 10 * ms)  # per camera its newest inside the window
    assert {c: w.stamp for c, w in group.items()} == {"a": 5 * ms, "b": 6 * ms}
    group = best_group({"a": q(0, 20), "b": q(1), "c": q(2, 21)}, 10 * ms)  # all three at the older anchor
    assert {c: w.stamp for c, w in group.items()} == {"a": 0, "b": ms, "c": 2 * ms}
    assert best_group({"a": q(), "b": q()}, ms) == {}


def test_synchronised_batches_wait_for_missing_cameras_then_go_without_them(ts, art):
    ms = 1_000_000
    sinks = {c: Sink(ts) for c in CAMS}
    mono = Clock()
    loop = SegmentationLoop(art["onnx"], {c: sinks[c].outputs(overlay=False) for c in CAMS}, clock=time.time_ns,
                            sync_slop=0.01, sync_timeout=0.05, monotonic=mono)
    frame = art["frames"][0]

    def send(c: str, at_ms: int) -> None:
        loop.submit(image(ts, frame, "bgr8", head=cam_header(ts, c, at_ms * ms))[0], c)

    def published() -> dict[str, list[int]]:
        return {c: [(stamp_ns(m.header) - 1_700_000_000 * 10**9) // ms for m in s.mask] for c, s in sinks.items()
                if s.mask}

    for c, at in zip(CAMS, (0, 2, 4, 6)):  # all four within 10 ms: one batch at once
        send(c, at)
    assert loop.step() and published() == {"front": [0], "left": [2], "right": [4], "rear": [6]}
    send("front", 100)
    send("left", 103)
    assert not loop.step()  # right and rear may still come
    mono.t += 0.049
    assert not loop.step()
    mono.t += 0.002  # the timeout: the two go without them
    assert loop.step() and published()["front"] == [0, 100] and published()["left"] == [2, 103]
    send("rear", 95)  # older than the batch just published: it could only go out of order
    assert not loop.step() and counts(loop, "rear")[2] == 1
    send("front", 200)
    send("right", 250)  # 50 ms apart: never one batch; the newer waits first
    mono.t += 0.06
    assert loop.step() and published()["right"] == [4, 250]
    assert not loop.step() and published()["front"] == [0, 100]  # front's 200 ms is older than the batch: dropped
    assert [counts(loop, c)[2] for c in CAMS] == [1, 0, 0, 1]
    send("front", 300)
    send("left", 300)
    send("right", 305)
    send("front", 340)  # front runs ahead: its 300 ms frame waits in its queue
    send("rear", 309)
    assert loop.step() and published()["front"] == [0, 100, 300] and published()["rear"] == [6, 309]
    assert counts(loop, "front")[1:3] == (3, 1)  # 340 ms still waits
    for c in CAMS:  # the clock went back more than a second (a bag replayed from its start): a fresh start
        send(c, -5000 + CAMS.index(c))
    assert loop.step() and [published()[c][-1] for c in CAMS] == [-5000, -4999, -4998, -4997]
    assert counts(loop, "front")[1:3] == (4, 2) and not loop.step()  # its 340 ms frame went with the old time


# ------------------------------------------------------------------------------------------------ the package
def test_node_compiles_and_imports_only_ros_and_our_code(tmp_path):
    node = PKG / "transkd_segmentation" / "node.py"
    for path in (node, PKG / "launch" / "segmentation.launch.py", PKG / "setup.py"):
        py_compile.compile(str(path), cfile=str(tmp_path / (path.name + "c")), doraise=True)
    ros = ("rclpy", "sensor_msgs", "std_msgs", "vision_msgs", "diagnostic_msgs", "rcl_interfaces")
    ours = ("transkd_segmentation", "pipeline")
    stdlib = {"__future__", "array", "sys", "dataclasses", "collections.abc"}
    foreign = {m for m in imported_modules(node) if m.split(".")[0] not in ros + ours and m not in stdlib}
    assert not foreign, f"node.py imports {foreign}"
    # the Segmenter (and with it a backend's packages) only where the artifact is opened
    top = {a.name if isinstance(n, ast.Import) else n.module for n in ast.parse(node.read_text()).body
           if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert "pipeline.infer" in imported_modules(node) and "pipeline.infer" not in top
    # the processing loop and the parameters stay free of ROS
    for name in ("processing.py", "params.py", "pending.py", "stats.py"):
        found = {m for m in imported_modules(PKG / "transkd_segmentation" / name) if m.split(".")[0] in ros}
        assert not found, f"{name} imports {found}"


def test_node_imports_under_ros():
    pytest.importorskip("rclpy")
    import transkd_segmentation.node as node

    assert callable(node.main)


def test_package_manifest_setup_config_and_launch():
    root = ET.parse(PKG / "package.xml").getroot()
    assert root.get("format") == "3" and root.findtext("name") == "transkd_segmentation"
    deps = {e.text for e in root.findall("exec_depend")}
    assert {"rclpy", "sensor_msgs", "std_msgs", "vision_msgs", "diagnostic_msgs", "launch_ros"} <= deps
    assert root.find("export/build_type").text == "ament_python"
    assert (PKG / "resource" / "transkd_segmentation").is_file()
    setup = (PKG / "setup.py").read_text()
    assert "segmentation_node = {PACKAGE}.node:main" in setup and 'PACKAGE = "transkd_segmentation"' in setup
    assert "install_scripts=$base/lib/transkd_segmentation" in (PKG / "setup.cfg").read_text()
    # the params file sets every parameter the node declares, at the same defaults (artifact is left to the user),
    # except the lists: a ROS params file cannot hold an empty one (rcl cannot type it)
    params = yaml.safe_load((PKG / "config" / "segmentation.yaml").read_text())["/**"]["ros__parameters"]
    defaults = NodeParams.defaults()
    assert {k for k, v in defaults.items() if isinstance(v, list)} == {"cameras", "camera_transports"}
    assert params == {k: v for k, v in defaults.items() if not isinstance(v, list)}
    assert all(type(params[k]) is type(defaults[k]) for k in params)  # ROS parameter types are strict
    assert NodeParams.from_values(params) == NodeParams()
    multicam = yaml.safe_load((PKG / "config" / "multicam.yaml").read_text())["/**"]["ros__parameters"]
    assert all(type(v) is type(defaults[k]) for k, v in multicam.items())
    # every launch override names a parameter; lists come as comma-separated text, floats as floats
    source = (PKG / "launch" / "segmentation.launch.py").read_text()
    launch = ast.parse(source)
    (overrides,) = [n.value for n in launch.body if isinstance(n, ast.Assign) and n.targets[0].id == "OVERRIDES"]
    assert {k.value for k in overrides.keys} <= set(defaults)
    # the launch file's own conversion, run without the launch packages (not installable here)
    keep = [n for n in launch.body if isinstance(n, ast.FunctionDef) and n.name == "_value"
            or isinstance(n, ast.Assign) and n.targets[0].id in ("LISTS", "FLOATS")]
    scope: dict = {}
    exec(compile(ast.Module(keep, []), "segmentation.launch.py", "exec"), scope)
    value = scope["_value"]
    assert value("cameras", "front, left,right ,") == ["front", "left", "right"]
    assert value("sync_slop", "0.01") == 0.01 and value("image_topic", "image_raw") == "image_raw"
    values = {k.value: value(k.value, "raw" if k.value == "camera_transports" else "1.0" if k.value in
                             scope["FLOATS"] else "x") for k in overrides.keys}
    assert all(type(v) is type(defaults[k]) for k, v in values.items())


def test_multicam_benchmark_times_the_batched_loop_against_single_loops(tmp_path):
    out = tmp_path / "multicam.json"
    code, _, err = run_cli("benchmarks/multicam.py", "--size", "64x128", "--frame-size", "96x192", "--cameras", "2",
                           "--ticks", "2", "--rounds", "1", "--warmup", "1", "--json", str(out), module=None,
                           env={"PYTHONPATH": f"{ROOT}{os.pathsep}{PKG}"})
    assert code == 0, err
    rows = json.loads(out.read_text())["rows"]
    assert [(r["setup"], r["output_resolution"]) for r in rows] == [
        ("batched", "camera"), ("single x N", "camera"), ("batched", "network"), ("single x N", "network")]
    assert all(r["frames_per_s"] > 0 and 0 < r["network_ms_per_frame"] <= r["predict_ms_per_frame"] for r in rows)
    assert [r["mean_batch"] for r in rows] == [2, 1, 2, 1]
    code, _, err = run_cli("benchmarks/multicam.py", "--help", module=None)  # without the ROS package on the path
    assert code != 0 and "PYTHONPATH=ros" in err
