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

from pipeline.errors import InputError  # noqa: E402
from pipeline.infer import Segmenter  # noqa: E402
from tests.conftest import export_tiny, run_cli, splits  # noqa: E402

SIZE = (64, 128)


@pytest.fixture(scope="module")
def art(tmp_path_factory, synthetic):
    root = synthetic(4, 4, (96, 192))
    train, val = splits(root)
    d = tmp_path_factory.mktemp("artifact")
    export_tiny(d, val, train, SIZE)
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


# ------------------------------------------------------------------------------------------ several cameras
CAMERAS = {"/front/image_raw": "/front/segmentation", "/left/image_raw/compressed": "/left/segmentation",
           "/rear_image": "/rear_image/segmentation"}  # camera topic -> namespace of its outputs (no parent: itself)


def _camera_messages(ts, frames, ros1: bool):
    """(topic, msgtype, bag time ns, message, BGR frame or None when refused) over 0.6 s of a drive: /front/image_raw
    rgb8 at 10 Hz, /left/image_raw/compressed png at 20 Hz and half size, /rear_image bgr8 at 5 Hz whose middle frame
    is 16UC1 (refused), and a String at 4 Hz. Header stamps differ from bag times and name each camera's frame."""
    Image, Compressed = ts.types["sensor_msgs/msg/Image"], ts.types["sensor_msgs/msg/CompressedImage"]
    Header, Time, String = ts.types["std_msgs/msg/Header"], ts.types["builtin_interfaces/msg/Time"], \
        ts.types["std_msgs/msg/String"]

    def header(ms, frame_id):
        t = Time(sec=7_000 + ms // 1000, nanosec=(ms % 1000) * 1_000_000 + 3)
        return Header(seq=ms, stamp=t, frame_id=frame_id) if ros1 else Header(stamp=t, frame_id=frame_id)

    def image(bgr, ms, frame_id, encoding):
        data = bgr[:, :, ::-1] if encoding == "rgb8" else bgr
        h, w = bgr.shape[:2]
        return Image(header=header(ms, frame_id), height=h, width=w, encoding=encoding, is_bigendian=0, step=3 * w,
                     data=np.ascontiguousarray(data).reshape(-1))

    out = []
    for i, ms in enumerate(range(0, 600, 100)):
        bgr = frames[i % 3]
        out.append(("/front/image_raw", "sensor_msgs/msg/Image", ms, image(bgr, ms, "front", "rgb8"), bgr))
    for i, ms in enumerate(range(25, 600, 50)):
        bgr = cv2.resize(frames[(i + 1) % 3], None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
        png = np.frombuffer(cv2.imencode(".png", bgr)[1], np.uint8)
        out.append(("/left/image_raw/compressed", "sensor_msgs/msg/CompressedImage", ms,
                    Compressed(header=header(ms, "left"), format="png", data=png), bgr))
    for i, ms in enumerate((10, 210, 410)):
        bgr = np.ascontiguousarray(frames[(i + 2) % 3][::-1])
        msg = image(bgr, ms, "rear", "bgr8")
        if i == 1:
            msg = Image(header=header(ms, "rear"), height=bgr.shape[0], width=bgr.shape[1], encoding="16UC1",
                        is_bigendian=0, step=2 * bgr.shape[1], data=np.zeros(2 * bgr.shape[1] * bgr.shape[0], np.uint8))
        out.append(("/rear_image", "sensor_msgs/msg/Image", ms, msg, None if i == 1 else bgr))
    out += [("/note", "std_msgs/msg/String", ms, String(data="hello"), None) for ms in (0, 250, 500)]
    return sorted(out, key=lambda m: m[2])  # a recorder writes in time order


def write_cameras_bag(path: Path, kind: str, frames) -> tuple[Path, list]:
    """A bag of `_camera_messages`; returns it and the messages."""
    ros1 = kind == "ros1"
    ts = get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)
    writer = Writer1(path) if ros1 else Writer2(path, version=9, storage_plugin=StoragePlugin.MCAP if kind == "mcap"
                                                 else StoragePlugin.SQLITE3)
    serialize = ts.serialize_ros1 if ros1 else ts.serialize_cdr
    messages = _camera_messages(ts, frames, ros1)
    with writer:
        conns = {}
        for topic, msgtype, stamp, msg, _ in messages:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=ts)
            writer.write(conns[topic], stamp, serialize(msg, msgtype))
    return path, messages


def written_order(out: Path, kind: str) -> list[int]:
    """The bag times in the order they were written to the file (rosbags' readers sort them on reading)."""
    if kind == "sqlite3":
        import sqlite3

        with sqlite3.connect(next(out.glob("*.db3"))) as db:
            return [t for (t,) in db.execute("SELECT timestamp FROM messages ORDER BY id")]
    from rosbags.rosbag2.storage_mcap import McapReader

    reader = McapReader(next(out.glob("*.mcap")))
    reader.open()
    try:
        return [t for _, t, _ in reader.messages_scan(reader.connections)]  # the file from start to end
    finally:
        reader.close()


@pytest.mark.parametrize("kind", ["ros1", "sqlite3", "mcap"])
def test_several_cameras_every_frame_segmented_once_in_batches(art, tmp_path, kind):
    from pipeline.bag import segment_bag

    bag, sent = write_cameras_bag(tmp_path / ("drive.bag" if kind == "ros1" else "drive"), kind, art["frames"])
    out = tmp_path / ("out.bag" if kind == "ros1" else "out")
    seg = Segmenter.open(art["onnx"])
    video = tmp_path / "drive.mp4" if kind == "sqlite3" else None
    summary = segment_bag(bag, list(CAMERAS), seg, out, video, progress=False)
    got = read_back(out)
    assert [(t, s) for t, _, s, _ in got if "/segmentation" not in t] == [(t, s) for t, _, s, _, _ in sent]
    assert [s for _, _, s, _ in got] == sorted(s for _, _, s, _ in got)
    if kind != "ros1":  # written in time order too: an unindexed MCAP is read from start to end
        assert written_order(out, kind) == sorted(written_order(out, kind))
    for topic, ns in CAMERAS.items():
        frames = [(s, m, bgr) for t, _, s, m, bgr in sent if t == topic and bgr is not None]
        masks = [(s, m) for t, _, s, m in got if t == f"{ns}/mask"]
        overlays = [(s, m) for t, _, s, m in got if t == f"{ns}/overlay"]
        assert [s for s, _ in masks] == [s for s, _ in overlays] == [s for s, _, _ in frames], topic
        for (_, mask), (_, over), (_, msg, bgr) in zip(masks, overlays, frames):
            assert (mask.header.stamp.sec, mask.header.stamp.nanosec, mask.header.frame_id) == \
                (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id) == \
                (over.header.stamp.sec, over.header.stamp.nanosec, over.header.frame_id)
            ids = np.asarray(mask.data, np.uint8).reshape(mask.height, mask.width)
            assert np.array_equal(ids, seg.predict(bgr)), (topic, msg.header)  # batched == the frame alone
            assert (over.height, over.width) == bgr.shape[:2]
        stats = summary["topics"][topic]
        assert (stats["frames"], stats["refused"]) == (len(frames), 1 if topic == "/rear_image" else 0)
        assert stats["mask_topic"] == f"{ns}/mask" and stats["overlay_topic"] == f"{ns}/overlay"
    assert summary["topics"]["/rear_image"]["refused_encodings"] == {"16UC1": 1}
    assert (summary["frames"], summary["refused"], summary["copied"]) == (20, 1, len(sent))
    # worked out by hand from the rates: a batch goes when a camera sends again or all three wait
    assert summary["batches"] == 12 and summary["mean_batch"] == pytest.approx(20 / 12)
    if video is not None:
        counts = {}
        for topic in CAMERAS:
            path = tmp_path / f"drive_{topic.strip('/').replace('/', '_')}.mp4"
            cap = cv2.VideoCapture(str(path))
            counts[topic] = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            cap.release()
        assert counts == {"/front/image_raw": 6, "/left/image_raw/compressed": 12, "/rear_image": 2}
        assert sorted(summary["videos"]) == sorted(str(p) for p in tmp_path.glob("drive_*.mp4"))


def test_batch_of_one_gives_the_same_bag(art, tmp_path):
    from pipeline.bag import segment_bag

    bag, _ = write_cameras_bag(tmp_path / "drive", "sqlite3", art["frames"])
    seg = Segmenter.open(art["onnx"])
    one = segment_bag(bag, list(CAMERAS), seg, tmp_path / "one", overlay=False, batch=1, progress=False)
    two = segment_bag(bag, list(CAMERAS), seg, tmp_path / "two", overlay=False, batch=2, progress=False)
    assert one["batches"] == 20 and one["mean_batch"] == 1.0 and 1.0 < two["mean_batch"] <= 2.0
    a, b = read_back(tmp_path / "one"), read_back(tmp_path / "two")
    assert [(t, s) for t, _, s, _ in a] == [(t, s) for t, _, s, _ in b]
    assert not any(t.endswith("/overlay") for t, *_ in a)
    assert all(bytes(m.data) == bytes(n.data) for (t, _, _, m), (_, _, _, n) in zip(a, b) if t.endswith("/mask"))


def test_output_topics():
    from pipeline.bag import camera_namespace, output_topics, video_paths

    assert [camera_namespace(t) for t in ("/front/image_raw", "/front/image_raw/compressed", "/image",
                                          "/image/compressed", "/car/left/image")] == \
        ["/front", "/front", "/image", "/image", "/car/left"]
    assert output_topics(["/cam/image"]) == {"/cam/image": ("/segmentation/mask", "/segmentation/overlay")}
    assert output_topics(["/a/image", "/b"], "seg/ids", "/all") == {"/a/image": ("/a/seg/ids", "/all"),
                                                                     "/b": ("/b/seg/ids", "/all")}
    assert video_paths(Path("v/drive.mp4"), ["/a/image", "/b"]) == {"/a/image": Path("v/drive_a_image.mp4"),
                                                                    "/b": Path("v/drive_b.mp4")}


def test_several_cameras_refused_before_any_work(art, tmp_path):
    from pipeline.bag import segment_bag

    bag = write_bag(tmp_path / "drive.bag", "ros1", art["frames"])
    seg = Segmenter.open(art["onnx"])
    cases = [
        (["/cam/image", "/cam/image"], {}, "--topic /cam/image given twice"),
        (["/cam/image", "/lidar"], {}, "no topic '/lidar'; image topics in the bag: /cam/image, /cam/jpeg"),
        (["/cam/image", "/note"], {}, "topic /note carries std_msgs/msg/String"),
        (["/cam/image", "/cam/jpeg"], {}, "the mask of /cam/image and the mask of /cam/jpeg would both be written to "
                                          "/cam/segmentation/mask"),
        (["/cam/image"], {"mask_topic": "/note"}, "already has /note"),
        (["/cam/image"], {"mask_topic": "/x", "overlay_topic": "/x"}, "the mask of /cam/image and the overlay of "
                                                                     "/cam/image would both be written to /x"),
        (["/cam/image"], {"batch": 2}, "--batch 2: expected 1 to 1"),
        ([], {}, "give at least one --topic"),
    ]
    for topics, kwargs, message in cases:
        with pytest.raises(InputError) as e:
            segment_bag(bag, topics, seg, tmp_path / "o.bag", tmp_path / "v.mp4", progress=False, **kwargs)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert not list(tmp_path.glob("o.bag*")) and not list(tmp_path.glob(".*.partial*"))
        assert not list(tmp_path.glob("*.mp4"))


def _repeatable_topic() -> bool:
    """Whether the CLI's --topic takes several cameras (an append flag) yet."""
    from pipeline.run import build_parser

    args = build_parser().parse_intermixed_args(["segment-bag", "--topic", "/a", "--topic", "/b"])
    return getattr(args, "topic", None) == ["/a", "/b"]


@pytest.mark.skipif(not _repeatable_topic(), reason="--topic takes one camera in this CLI")
def test_cli_with_two_topics(art, tmp_path):
    from pipeline.run import main

    bag, sent = write_cameras_bag(tmp_path / "drive", "mcap", art["frames"])
    out = tmp_path / "out"
    code = main(["segment-bag", "--run-dir", str(tmp_path / "run"), "--bag", str(bag), "--topic", "/front/image_raw",
                 "--topic", "/left/image_raw/compressed", "--artifact", str(art["onnx"]), "--out", str(out),
                 f"data.root={art['root']}"])
    assert code == 0
    topics = [t for t, *_ in read_back(out)]
    assert topics.count("/front/segmentation/mask") == 6 and topics.count("/left/segmentation/overlay") == 12
    assert not any(t.startswith("/rear_image/") for t in topics)
