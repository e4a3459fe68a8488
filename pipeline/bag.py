"""Offline drives: segment the camera topic of a recorded ROS 1 or ROS 2 bag (sqlite3 or MCAP) with any artifact.

`python -m pipeline.run segment-bag --bag IN --topic /camera/image_raw --artifact student.int8.plan --out OUT`
writes a new bag of the same kind with every original message plus a mono8 class-id mask and an rgb8 overlay per
frame under the frame's own timestamp and header, and optionally an mp4 of the overlays.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipeline import rosmsg
from pipeline.errors import InputError
from pipeline.preflight import writable_folder

log = logging.getLogger("pipeline")
IMAGE_TYPES = (rosmsg.IMAGE, rosmsg.COMPRESSED_IMAGE)
MASK_TOPIC = "/segmentation/mask"  # the output topics segment_bag adds, by default
OVERLAY_TOPIC = "/segmentation/overlay"


def _open_reader(bag: Path):
    from rosbags.highlevel import AnyReader

    if not bag.exists():
        raise InputError(f"{bag}: no such bag (a ROS 1 .bag file or a ROS 2 bag directory)")
    try:
        reader = AnyReader([bag])
        reader.open()
    except Exception as e:  # rosbags raises its own reader errors for truncated, unindexed or foreign files
        first = (str(e) or type(e).__name__).strip().splitlines()[0]
        raise InputError(f"{bag}: not a readable ROS 1 or ROS 2 bag ({first}); a bag still being recorded or cut "
                         "short needs `rosbag reindex` (ROS 1) or `ros2 bag reindex` (ROS 2) first") from None
    return reader


def _storage(bag: Path):
    """The ROS 2 storage plugin the input uses, so the output is written the same way."""
    from rosbags.rosbag2 import StoragePlugin

    meta = bag / "metadata.yaml"
    text = meta.read_text() if meta.is_file() else ""
    return StoragePlugin.MCAP if "storage_identifier: mcap" in text else StoragePlugin.SQLITE3


def _writer(reader, bag: Path, tmp: Path):
    if reader.is2:
        from rosbags.rosbag2 import Writer as Writer2

        return Writer2(tmp, version=9, storage_plugin=_storage(bag))
    from rosbags.rosbag1 import Writer as Writer1

    return Writer1(tmp)


def _add_connection(writer, reader, conn, topic: str | None = None, msgtype: str | None = None):
    """A connection of the output bag: a copy of `conn` (same type, QoS or latching), or a new `topic`."""
    kwargs: dict = {"typestore": reader.typestore}
    if conn is not None:
        ext = conn.ext
        if reader.is2:
            kwargs.update(serialization_format=ext.serialization_format, offered_qos_profiles=ext.offered_qos_profiles)
        else:
            kwargs.update(callerid=ext.callerid, latching=ext.latching)
    return writer.add_connection(topic or conn.topic, msgtype or conn.msgtype, **kwargs)


def default_out(bag: Path, run_dir: Path) -> Path:
    """Where the segmented bag goes without --out: `<run dir>/<input name>.segmented[.bag]`."""
    return run_dir / (bag.name.removesuffix(".bag") + ".segmented" + (".bag" if bag.suffix == ".bag" else ""))


def check_outputs(out: Path, video: Path | None) -> None:
    """Refuse an output bag or video that cannot be written, before a frame is segmented: an existing `out`, a
    regular file or a read-only folder on its way, a video in a missing folder."""
    if out.exists() or out.is_symlink():
        raise InputError(f"{out}: already exists; choose another --out or remove it")
    writable_folder(out.parent, "--out")  # the staging folder beside `out` is made with its parents
    if video is not None:
        if video.is_dir():
            raise InputError(f"--video {video}: a folder; give the mp4 file's name")
        if not video.parent.exists():
            raise InputError(f"--video {video}: folder {video.parent} does not exist; create it or choose another "
                             "--video")
        writable_folder(video.parent, "--video")


def segment_bag(bag: Path, topic: str, seg, out: Path, video: Path | None = None, overlay: bool = True,
                mask_topic: str = MASK_TOPIC, overlay_topic: str = OVERLAY_TOPIC, fps: float = 0.0,
                progress: bool = True) -> dict:
    """Segment `topic` of `bag` into a new bag `out` (and `video`); returns the summary. Nothing is left at `out` or
    `video` when it fails."""
    bag, out = Path(bag), Path(out)
    check_outputs(out, Path(video) if video else None)
    reader = _open_reader(bag)
    try:
        conns = [c for c in reader.connections if c.topic == topic]
        if not conns:
            images = sorted({c.topic for c in reader.connections if c.msgtype in IMAGE_TYPES})
            raise InputError(f"{bag}: no topic {topic!r}; image topics in the bag: {', '.join(images) or 'none'}")
        if conns[0].msgtype not in IMAGE_TYPES:
            raise InputError(f"{bag}: topic {topic} carries {conns[0].msgtype}, not {' or '.join(IMAGE_TYPES)}")
        taken = {c.topic for c in reader.connections} & {mask_topic, overlay_topic}
        if taken:
            raise InputError(f"{bag}: already has {', '.join(sorted(taken))}; choose other output topics")
        topics = (mask_topic, overlay_topic if overlay else None)
        return _segment(reader, bag, conns, seg, out, video, topics, fps, progress)
    finally:
        reader.close()


def _segment(reader, bag: Path, conns, seg, out: Path, video: Path | None, topics: tuple[str, str | None],
             fps: float, progress: bool) -> dict:
    """Write the output bag (and video) into a staging folder, then move them into place."""
    # everything is written into a staging folder beside `out` under its final names (a ROS 2 bag records its
    # file names in metadata.yaml), then moved into place once complete
    stage = out.with_name(f".{out.name}.partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    tmp = stage / out.name
    clip = _Video(stage / video.name, fps or _bag_fps(reader, conns)) if video else None
    stats = {"frames": 0, "refused": 0, "copied": 0, "refused_encodings": {}}
    writer = _writer(reader, bag, tmp)
    start = time.perf_counter()
    try:
        writer.open()
        _copy_and_segment(reader, writer, bag, {c.id for c in conns}, seg, topics, clip, stats, progress)
        writer.close()
        if clip is not None and clip.release():
            shutil.move(clip.path, video)  # may be another file system
        tmp.replace(out)
    except BaseException:
        _close_quietly(writer)
        if clip is not None:
            clip.release()
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    seconds = time.perf_counter() - start
    stats.update(bag=str(bag), out=str(out), video=str(video) if video and stats["frames"] else None,
                 topic=conns[0].topic, mask_topic=topics[0], overlay_topic=topics[1], seconds=seconds,
                 frames_per_second=stats["frames"] / seconds if seconds > 0 else 0.0,
                 format="ros2" if reader.is2 else "ros1")
    return stats


def _image_type(reader):
    """sensor_msgs/Image's class in the reader's typestore and the bag's serializer for it."""
    if rosmsg.IMAGE not in reader.typestore.types:  # a bag of CompressedImage only: Image from a built-in store
        from rosbags.typesys import Stores, get_typestore

        store = get_typestore(Stores.ROS2_HUMBLE if reader.is2 else Stores.ROS1_NOETIC)
        needed = (rosmsg.IMAGE, "std_msgs/msg/Header", "builtin_interfaces/msg/Time")
        reader.typestore.register({n: store.fielddefs[n] for n in needed if n not in reader.typestore.types})
    serialize = reader.typestore.serialize_cdr if reader.is2 else reader.typestore.serialize_ros1
    return reader.typestore.types[rosmsg.IMAGE], serialize


def _copy_and_segment(reader, writer, bag: Path, ids_of_topic: set, seg, topics: tuple[str, str | None],
                      clip: _Video | None, stats: dict, progress: bool) -> None:
    """Every message of the bag copied to `writer`; each frame of the camera topic also segmented into a mask (and
    an overlay, and a video frame) under its own stamp and header. Frames of an unsupported encoding are counted
    and skipped."""
    image_cls, serialize = _image_type(reader)
    copies = {c.id: _add_connection(writer, reader, c) for c in reader.connections}
    mask_conn = _add_connection(writer, reader, None, topics[0], rosmsg.IMAGE)
    over_conn = _add_connection(writer, reader, None, topics[1], rosmsg.IMAGE) if topics[1] else None
    for conn, stamp, raw in tqdm(reader.messages(), total=reader.message_count, desc=bag.name,
                                 disable=not progress, unit="msg"):
        writer.write(copies[conn.id], stamp, raw)
        stats["copied"] += 1
        if conn.id not in ids_of_topic:
            continue
        msg = reader.deserialize(raw, conn.msgtype)
        try:
            bgr = rosmsg.to_bgr(msg)
        except rosmsg.EncodingError as e:
            key = getattr(msg, "encoding", None) or getattr(msg, "format", "?")
            if key not in stats["refused_encodings"]:
                log.warning("segment-bag: %s at %d refused: %s", conn.topic, stamp, e)
            stats["refused_encodings"][key] = stats["refused_encodings"].get(key, 0) + 1
            stats["refused"] += 1
            continue
        ids = seg.predict(bgr)
        writer.write(mask_conn, stamp, serialize(image_cls(**rosmsg.mask_fields(ids, msg.header)), rosmsg.IMAGE))
        if over_conn is not None or clip is not None:
            rgb = seg.colorize(ids, bgr)
            if over_conn is not None:
                writer.write(over_conn, stamp, serialize(image_cls(**rosmsg.overlay_fields(rgb, msg.header)),
                                                         rosmsg.IMAGE))
            if clip is not None:
                clip.write(rgb)
        stats["frames"] += 1


class _Video:
    """The overlay video, opened at its first frame (which gives its size)."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path, self.fps, self._writer = path, fps, None

    def write(self, rgb: np.ndarray) -> None:
        self._writer = self._writer or _video_writer(self.path, rgb.shape, self.fps)
        self._writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))

    def release(self) -> bool:
        """Close the file; True when a frame was written to it."""
        if self._writer is None:
            return False
        self._writer.release()
        self._writer = None
        return True


def _close_quietly(writer) -> None:
    try:
        writer.close()
    except Exception:  # closing a half-written bag may fail again; the file is removed anyway
        pass


def _bag_fps(reader, conns) -> float:
    """The topic's mean rate over the bag, kept within 1..120 (MPEG-4 time bases allow no more)."""
    count = sum(c.msgcount for c in conns)
    seconds = (reader.end_time - reader.start_time) / 1e9
    return min(max(count / seconds, 1.0), 120.0) if count > 1 and seconds > 0 else 10.0


def _video_writer(path: Path, shape: tuple, fps: float):
    h, w = shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not vw.isOpened():
        raise InputError(f"{path}: OpenCV cannot open an mp4v video writer at {fps:g} frames/s here")
    return vw
