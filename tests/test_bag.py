"""segment-bag: real ROS 1 and ROS 2 (sqlite3, MCAP) bags written with rosbags, segmented, read back."""

from pathlib import Path

import cv2
import numpy as np
import pytest

rosbags = pytest.importorskip("rosbags")
from rosbags.highlevel import AnyReader  # noqa: E402
from rosbags.rosbag1 import Writer as Writer1  # noqa: E402
from rosbags.rosbag2 import StoragePlugin  # noqa: E402
from rosbags.rosbag2 import Writer as Writer2  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

from pipeline.config import ExportConfig  # noqa: E402
from pipeline.export import export_student  # noqa: E402
from pipeline.infer import Segmenter  # noqa: E402
from tests.conftest import run_cli, splits, spread_student  # noqa: E402

SIZE = (64, 128)


@pytest.fixture(scope="module")
def art(tmp_path_factory, synthetic):
    root = synthetic(4, 4, (96, 192))
    train, val = splits(root)
    d = tmp_path_factory.mktemp("artifact")
    export_student(spread_student(), d, ExportConfig(input="float", output="logits", size=SIZE, fp16=False,
                                                     int8=False, parity_frames=2, eval_frames=2), val, train)
    frames = [np.ascontiguousarray(val.read(i)[0][:, :, ::-1]) for i in range(3)]  # BGR
    return {"onnx": d / "student.onnx", "frames": frames, "root": root}


def _messages(ts, frames, ros1: bool):
    """(topic, msgtype, stamp ns, message): rgb8, bgr8 with row padding, an unsupported 16UC1, a jpeg, a string."""
    Image, Compressed = ts.types["sensor_msgs/msg/Image"], ts.types["sensor_msgs/msg/CompressedImage"]
    Header, Time, String = ts.types["std_msgs/msg/Header"], ts.types["builtin_interfaces/msg/Time"], \
        ts.types["std_msgs/msg/String"]

    def header(i):
        t = Time(sec=100 + i, nanosec=5)
        return Header(seq=i, stamp=t, frame_id="cam") if ros1 else Header(stamp=t, frame_id="cam")

    h, w = frames[0].shape[:2]
    rgb = frames[0][:, :, ::-1]
    padded = np.zeros((h, w * 3 + 8), np.uint8)
    padded[:, :w * 3] = frames[1].reshape(h, -1)
    out = [
        ("/cam/image", "sensor_msgs/msg/Image", 1_000, Image(header=header(0), height=h, width=w, encoding="rgb8",
                                                             is_bigendian=0, step=3 * w, data=rgb.reshape(-1).copy())),
        ("/cam/image", "sensor_msgs/msg/Image", 2_000, Image(header=header(1), height=h, width=w, encoding="bgr8",
                                                             is_bigendian=0, step=3 * w + 8, data=padded.reshape(-1))),
        ("/cam/image", "sensor_msgs/msg/Image", 3_000, Image(header=header(2), height=h, width=w, encoding="16UC1",
                                                             is_bigendian=0, step=2 * w,
                                                             data=np.zeros(2 * w * h, np.uint8))),
        ("/cam/jpeg", "sensor_msgs/msg/CompressedImage", 4_000,
         Compressed(header=header(3), format="jpeg", data=np.frombuffer(cv2.imencode(".png", frames[2])[1], np.uint8))),
        ("/note", "std_msgs/msg/String", 5_000, String(data="hello")),
    ]
    return out


def write_bag(path: Path, kind: str, frames, only: str | None = None) -> Path:
    """A bag of `_messages` (those of topic `only` alone when given: no Image type in the bag then)."""
    ros1 = kind == "ros1"
    ts = get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)
    writer = Writer1(path) if ros1 else Writer2(path, version=9, storage_plugin=StoragePlugin.MCAP if kind == "mcap"
                                                 else StoragePlugin.SQLITE3)
    serialize = ts.serialize_ros1 if ros1 else ts.serialize_cdr
    with writer:
        conns = {}
        for topic, msgtype, stamp, msg in _messages(ts, frames, ros1):
            if only is not None and topic != only:
                continue
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=ts)
            writer.write(conns[topic], stamp, serialize(msg, msgtype))
    return path


def cli(*args, cwd):
    return run_cli("segment-bag", *args, cwd=cwd)


def read_back(path: Path):
    with AnyReader([path]) as reader:
        return [(c.topic, c.msgtype, t, reader.deserialize(raw, c.msgtype)) for c, t, raw in reader.messages()]


@pytest.mark.parametrize("kind", ["ros1", "sqlite3", "mcap"])
def test_segment_bag_writes_masks_and_overlays_under_the_original_stamps(art, tmp_path, kind):
    bag = write_bag(tmp_path / ("drive.bag" if kind == "ros1" else "drive"), kind, art["frames"])
    out = tmp_path / ("out.bag" if kind == "ros1" else "out")
    code, stdout, err = cli("--run-dir", str(tmp_path / "run"), "--bag", str(bag), "--topic",
                            "/cam/image", "--artifact", str(art["onnx"]), "--out", str(out), "--video",
                            str(tmp_path / "overlay.mp4"), f"data.root={art['root']}", cwd=tmp_path)
    assert code == 0, err
    if kind != "ros1":  # the storage file carries the bag's final name, as ros2 bag tools expect
        assert (out / f"out.{'mcap' if kind == 'mcap' else 'db3'}").is_file()
    assert not list(tmp_path.glob(".*.partial"))
    msgs = read_back(out)
    original = [(t, ty, s) for t, ty, s, _ in _messages(get_typestore(Stores.ROS2_HUMBLE if kind != "ros1" else
                                                                       Stores.ROS1_NOETIC), art["frames"],
                                                          kind == "ros1")]
    assert [(t, ty, s) for t, ty, s, _ in msgs if not t.startswith("/segmentation")] == original
    masks = [(s, m) for t, _, s, m in msgs if t == "/segmentation/mask"]
    overlays = [(s, m) for t, _, s, m in msgs if t == "/segmentation/overlay"]
    assert [s for s, _ in masks] == [s for s, _ in overlays] == [1_000, 2_000]  # the 16UC1 frame refused
    seg = Segmenter.open(art["onnx"])
    for (_, mask), frame, i in zip(masks, art["frames"][:2], range(2)):
        assert mask.encoding == "mono8" and mask.header.frame_id == "cam" and mask.header.stamp.sec == 100 + i
        ids = np.asarray(mask.data, np.uint8).reshape(mask.height, mask.width)
        assert np.array_equal(ids, seg.predict(frame))  # both encodings decode to the same BGR frame
    over = overlays[0][1]
    assert over.encoding == "rgb8" and over.step == 3 * over.width
    assert "1 refused" in stdout and (tmp_path / "overlay.mp4").stat().st_size > 0
    cap = cv2.VideoCapture(str(tmp_path / "overlay.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 2
    cap.release()


@pytest.mark.parametrize("kind", ["sqlite3", "ros1"])
def test_compressed_topic(art, tmp_path, kind):
    bag = write_bag(tmp_path / ("drive.bag" if kind == "ros1" else "drive"), kind, art["frames"], only="/cam/jpeg")
    out = tmp_path / ("out.bag" if kind == "ros1" else "out")
    code, _, err = cli("--run-dir", str(tmp_path / "run"), "--bag", str(bag), "--topic", "/cam/jpeg",
                       "--artifact", str(art["onnx"]), "--out", str(out), "--no-overlay", cwd=tmp_path)
    assert code == 0, err
    masks = [m for t, _, _, m in read_back(out) if t == "/segmentation/mask"]
    assert len(masks) == 1 and not any(t == "/segmentation/overlay" for t, *_ in read_back(out))
    ids = np.asarray(masks[0].data, np.uint8).reshape(masks[0].height, masks[0].width)
    assert np.array_equal(ids, Segmenter.open(art["onnx"]).predict(art["frames"][2]))  # png is lossless


def test_bad_bags_and_topics_are_one_line(art, tmp_path):
    good = write_bag(tmp_path / "drive.bag", "ros1", art["frames"])
    truncated = tmp_path / "cut.bag"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    unindexed = write_bag(tmp_path / "drive2", "sqlite3", art["frames"])
    (unindexed / "metadata.yaml").unlink()  # a ROS 2 bag whose recorder died before writing its metadata
    cases = [
        (["--bag", str(truncated), "--topic", "/cam/image"], "not a readable ROS 1 or ROS 2 bag"),
        (["--bag", str(unindexed), "--topic", "/cam/image"], "ros2 bag reindex"),
        (["--bag", str(tmp_path / "nope.bag"), "--topic", "/cam/image"], "no such bag"),
        (["--bag", str(good), "--topic", "/lidar"],
         "no topic '/lidar'; image topics in the bag: /cam/image, /cam/jpeg"),
        (["--bag", str(good), "--topic", "/note"], "carries std_msgs/msg/String"),
        (["--bag", str(good), "--topic", "/cam/image", "--out", str(good)], "already exists"),
        (["--bag", str(good)], "give --bag IN and --topic"),
    ]
    for args, message in cases:
        out = [] if "--out" in args else ["--out", str(tmp_path / "o.bag")]
        code, _, err = cli("--run-dir", str(tmp_path / "run"), "--artifact", str(art["onnx"]), *args,
                           *out, cwd=tmp_path)
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("error:") and message in last and "Traceback" not in err, err
        assert not (tmp_path / "o.bag").exists() and not list(tmp_path.glob(".*.partial*"))
