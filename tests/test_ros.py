"""ROS 2 node (ros/): the processing loop on real sensor_msgs / vision_msgs types serialised to CDR with rosbags and
a real tiny Segmenter; the rclpy wiring is compiled and its imports checked (rclpy itself cannot be installed here)."""

import ast
import logging
import py_compile
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import fields

import cv2
import numpy as np
import pytest
import yaml

pytest.importorskip("rosbags")
from rosbags.typesys import Stores, get_types_from_msg, get_typestore  # noqa: E402

from pipeline import rosmsg  # noqa: E402
from pipeline.config import ExportConfig  # noqa: E402
from pipeline.errors import InputError  # noqa: E402
from pipeline.export import export_student  # noqa: E402
from pipeline.infer import Segmenter  # noqa: E402
from pipeline.models import save_model  # noqa: E402
from tests.conftest import ROOT, imported_modules, splits, spread_student  # noqa: E402

PKG = ROOT / "ros"
sys.path.append(str(PKG))
from transkd_segmentation.params import NodeParams, parse_size  # noqa: E402
from transkd_segmentation.processing import (  # noqa: E402
    ERROR,
    OK,
    WARN,
    SegmentationLoop,
    diagnostic_fields,
    health,
    label_info_fields,
    scale_camera_info,
    stamp_ns,
)

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
    export_student(model, d, ExportConfig(size=SIZE, fp16=False, int8=False, parity_frames=2, eval_frames=2), val,
                   train)
    return {"onnx": Segmenter.open(d / "student.onnx", provider="cpu"),
            "ckpt": Segmenter.open(save_model(model, d / "student.safetensors"), device="cpu", size=SIZE),
            "frames": [np.ascontiguousarray(val.read(i)[0][:, :, ::-1]) for i in range(3)]}


# ------------------------------------------------------------------------------------------------ messages
def header(ts, i: int, frame_id: str = "cam_front"):
    return ts.types["std_msgs/msg/Header"](stamp=ts.types["builtin_interfaces/msg/Time"](sec=1_700_000_000 + i,
                                                                                          nanosec=250_000 + i),
                                           frame_id=frame_id)


def cdr(ts, msg, msgtype: str):
    """Through the wire: serialised as a ROS 2 publisher would, deserialised as a subscriber would."""
    return ts.deserialize_cdr(ts.serialize_cdr(msg, msgtype), msgtype)


def image(ts, bgr: np.ndarray, encoding: str, i: int = 0, pad: int = 7):
    """A sensor_msgs/Image of `bgr` in `encoding` with `pad` bytes of row padding in `step`; also the BGR frame
    the node should decode from it."""
    conv = {"bgr8": None, "rgb8": cv2.COLOR_BGR2RGB, "mono8": cv2.COLOR_BGR2GRAY, "bgra8": cv2.COLOR_BGR2BGRA,
            "rgba8": cv2.COLOR_BGR2RGBA}[encoding]
    pixels = bgr if conv is None else cv2.cvtColor(bgr, conv)
    h, w = bgr.shape[:2]
    row = w * CHANNELS[encoding]
    rows = np.full((h, row + pad), 0xAB, np.uint8)  # padding bytes that must not leak into the frame
    rows[:, :row] = pixels.reshape(h, row)
    msg = ts.types[rosmsg.IMAGE](header=header(ts, i), height=h, width=w, encoding=encoding, is_bigendian=0,
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

    def loop(self, seg, overlay: bool = True, info: bool = False, **kwargs) -> SegmentationLoop:
        kwargs.setdefault("clock", time.time_ns)
        return SegmentationLoop(seg, self.image(self.mask), self.image(self.overlay) if overlay else None,
                                self.camera_info if info else None, **kwargs)


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
    s = loop.stats.snapshot()
    assert (s["received"], s["processed"], s["dropped"], s["refused"], s["errors"]) == (1, 1, 0, 0, 0)


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
    s = loop.stats.snapshot()
    assert (s["received"], s["refused"], s["processed"], s["errors"]) == (6, 5, 1, 0)
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

    loop = SegmentationLoop(art["onnx"], broken, clock=time.time_ns)
    with caplog.at_level(logging.ERROR, logger="transkd_segmentation"):
        for i in range(2):
            loop.submit(image(ts, art["frames"][0], "bgr8", i)[0])
            assert loop.step()
    assert loop.stats.snapshot()["errors"] == 2
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
    s = loop.stats.snapshot()
    assert (s["received"], s["processed"], s["dropped"]) == (5, 2, 3)
    assert not loop._thread.is_alive()


def test_stepped_loop_takes_only_the_newest(ts, art):
    sink = Sink(ts)
    loop = sink.loop(art["onnx"], overlay=False)
    for i in range(3):
        loop.submit(image(ts, art["frames"][i], "bgr8", i)[0])
    assert loop.step() and not loop.step()
    assert [m.header.stamp.sec for m in sink.mask] == [1_700_000_002]
    assert loop.stats.snapshot()["dropped"] == 2


def test_latency_is_measured_stamp_to_publish_in_the_given_clock(ts, art):
    msgs = [image(ts, art["frames"][0], "bgr8", i)[0] for i in range(4)]
    delays = iter([10, 20, 30, 40])  # ms after each frame's stamp, as a ROS clock would say
    current = {}
    sink = Sink(ts)
    loop = sink.loop(art["onnx"], overlay=False, window=3,
                     clock=lambda: stamp_ns(current["msg"].header) + next(delays) * 1_000_000)
    for m in msgs:
        current["msg"] = m
        loop.submit(m)
        assert loop.step()
    s = loop.stats.snapshot()
    assert s["latency_p50_ms"] == pytest.approx(30.0) and s["latency_max_ms"] == pytest.approx(40.0)  # last 3
    assert s["latency_p90_ms"] == pytest.approx(38.0)
    assert s["rate_hz"] == pytest.approx(1.0, rel=0.05)  # stamps one second apart
    assert s["compute_p50_ms"] > 0
    line = loop.summary()
    assert "processed 4" in line and "p50 30.0" in line and "\n" not in line


def test_health_and_diagnostics_round_trip(ts):
    base = {"received": 10, "processed": 8, "dropped": 2, "refused": 0, "errors": 0, "rate_hz": 9.5,
            "latency_p50_ms": 12.5, "latency_p90_ms": None, "latency_max_ms": None, "compute_p50_ms": 3.0,
            "compute_p90_ms": None, "compute_max_ms": None}
    assert health(base, None)[0] == OK
    assert health(base, base) == (WARN, "no frames received since the last report")
    assert health({**base, "received": 12, "refused": 1}, base)[0] == WARN
    assert health({**base, "received": 12, "errors": 1}, base)[0] == ERROR
    f = diagnostic_fields("segmentation_node: segmentation", "student.onnx", base, None)
    t = ts.types
    status = t["diagnostic_msgs/msg/DiagnosticStatus"](**{**f, "values": [t["diagnostic_msgs/msg/KeyValue"](**v)
                                                                          for v in f["values"]]})
    msg = cdr(ts, t["diagnostic_msgs/msg/DiagnosticArray"](header=header(ts, 0), status=[status]),
              "diagnostic_msgs/msg/DiagnosticArray")
    values = {v.key: v.value for v in msg.status[0].values}
    assert msg.status[0].level == OK and values["processed"] == "8" and values["latency_p90_ms"] == ""


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
                   image_topic="/cam/image_raw/")
    assert p.input_topic == "/cam/image_raw/compressed" and NodeParams().input_topic == "/camera/image_raw"
    assert p.open_kwargs() == {"device": "auto", "provider": "auto", "threads": 0, "dtype": "fp32", "mode": "eager",
                               "deploy": False, "size": (64, 128)}
    assert parse_size("") is None and parse_size("512X1024") == (512, 1024)
    for bad in ({"network_size": "64"}, {"output_resolution": "half"}, {"input_transport": "theora"},
                {"overlay_alpha": 2.0}, {"qos_depth": 0}):
        with pytest.raises(InputError, match=next(iter(bad)).split("_")[0]):
            NodeParams(**bad)
    assert all(NodeParams.descriptions().values())


# ------------------------------------------------------------------------------------------------ the package
def test_node_compiles_and_imports_only_ros_and_our_code(tmp_path):
    node = PKG / "transkd_segmentation" / "node.py"
    for path in (node, PKG / "launch" / "segmentation.launch.py", PKG / "setup.py"):
        py_compile.compile(str(path), cfile=str(tmp_path / (path.name + "c")), doraise=True)
    ros = ("rclpy", "sensor_msgs", "std_msgs", "vision_msgs", "diagnostic_msgs", "rcl_interfaces")
    ours = ("transkd_segmentation", "pipeline")
    stdlib = {"__future__", "array", "sys", "dataclasses"}
    foreign = {m for m in imported_modules(node) if m.split(".")[0] not in ros + ours and m not in stdlib}
    assert not foreign, f"node.py imports {foreign}"
    # the processing loop and the parameters stay free of ROS
    for name in ("processing.py", "params.py"):
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
    # the params file sets every parameter the node declares, at the same defaults (artifact is left to the user)
    params = yaml.safe_load((PKG / "config" / "segmentation.yaml").read_text())["/**"]["ros__parameters"]
    defaults = {f.name: f.default for f in fields(NodeParams)}
    assert params == defaults
    assert all(type(params[k]) is type(v) for k, v in defaults.items())  # ROS parameter types are strict
    # every launch override names a parameter
    launch = ast.parse((PKG / "launch" / "segmentation.launch.py").read_text())
    (overrides,) = [n.value for n in launch.body if isinstance(n, ast.Assign) and n.targets[0].id == "OVERRIDES"]
    assert {k.value for k in overrides.keys} <= set(defaults)
