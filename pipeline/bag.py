"""Offline drives: segment camera topics of a recorded ROS 1 or ROS 2 bag (sqlite3 or MCAP) with any artifact.

`python -m pipeline.run segment-bag --bag IN --topic /front/image_raw [--topic /rear/image_raw ...] --artifact X
--out OUT` writes a new bag of the same kind with every original message plus, for every frame of every camera topic,
a mono8 class-id mask and an rgb8 overlay under the frame's own timestamp and header (and optionally an mp4 of the
overlays per camera). Frames of several cameras go through the network together, batched as the multi-camera node
batches them (pipeline/batching.py); offline nothing is dropped.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline import rosmsg
from pipeline.batching import CameraFrame, decode, segment_frames
from pipeline.errors import InputError
from pipeline.preflight import writable_folder
from pipeline.video import OverlayVideo, video_rate

log = logging.getLogger("pipeline")
IMAGE_TYPES = (rosmsg.IMAGE, rosmsg.COMPRESSED_IMAGE)
MASK_TOPIC = "/segmentation/mask"  # the output topics segment_bag adds for one camera topic, by default
OVERLAY_TOPIC = "/segmentation/overlay"
CAMERA_MASK = "segmentation/mask"  # ... and, relative to each camera's namespace, for several
CAMERA_OVERLAY = "segmentation/overlay"


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


def camera_namespace(topic: str) -> str:
    """Where a camera's outputs go: the topic's parent (`/front/image_raw` -> `/front`, image_transport's
    `/compressed` dropped first), or the topic itself when it has no parent (`/image` -> `/image`)."""
    base = topic.rstrip("/")
    if base.endswith("/compressed") and base.count("/") > 1:
        base = base.removesuffix("/compressed")
    parent = base.rsplit("/", 1)[0]
    return parent if parent.strip("/") else base


def output_topics(topics: list[str], mask_topic: str | None = None,
                  overlay_topic: str | None = None) -> dict[str, tuple[str, str]]:
    """Each camera topic's (mask, overlay) topics. An absolute name is taken as given, a relative one is resolved in
    the camera's namespace, as ROS resolves names. Defaults: /segmentation/mask and /segmentation/overlay for one
    topic, <namespace>/segmentation/mask and <namespace>/segmentation/overlay for each of several."""
    several = len(topics) > 1
    names = (mask_topic or (CAMERA_MASK if several else MASK_TOPIC),
             overlay_topic or (CAMERA_OVERLAY if several else OVERLAY_TOPIC))
    return {t: tuple(n if n.startswith("/") else f"{camera_namespace(t).rstrip('/')}/{n}" for n in names)
            for t in topics}


def video_paths(video: Path | None, topics: list[str]) -> dict[str, Path | None]:
    """The overlay video of each camera: `video` itself for one topic, `<stem>_<topic, / as _><suffix>` beside it
    for each of several (drive.mp4 -> drive_front_image_raw.mp4)."""
    if video is None or len(topics) == 1:
        return {t: video for t in topics}
    return {t: video.with_name(f"{video.stem}_{t.strip('/').replace('/', '_')}{video.suffix}") for t in topics}


@dataclass
class _Camera:
    """One camera topic of the run: its output topics and video, and its counts."""

    topic: str
    mask_topic: str
    overlay_topic: str | None
    video: Path | None
    frames: int = 0
    refused: int = 0
    refused_encodings: dict[str, int] = field(default_factory=dict)


def _check_topics(reader, bag: Path, cams: list[_Camera]) -> None:
    """Every camera topic is an image topic of the bag; no two outputs share a topic, and none is in the bag."""
    present = {c.topic: c.msgtype for c in reader.connections}
    for cam in cams:
        if cam.topic not in present:
            images = sorted(t for t, ty in present.items() if ty in IMAGE_TYPES)
            raise InputError(f"{bag}: no topic {cam.topic!r}; image topics in the bag: {', '.join(images) or 'none'}")
        if present[cam.topic] not in IMAGE_TYPES:
            raise InputError(f"{bag}: topic {cam.topic} carries {present[cam.topic]}, not {' or '.join(IMAGE_TYPES)}")
    owner: dict[str, str] = {}
    for cam in cams:
        for kind, name in (("mask", cam.mask_topic), ("overlay", cam.overlay_topic)):
            if name is None:
                continue
            if name in owner:
                raise InputError(f"{bag}: the {owner[name]} and the {kind} of {cam.topic} would both be written to "
                                 f"{name}; give other (relative) --mask-topic/--overlay-topic, or segment these "
                                 "cameras in separate runs")
            owner[name] = f"{kind} of {cam.topic}"
    taken = sorted(set(owner) & set(present))
    if taken:
        raise InputError(f"{bag}: already has {', '.join(taken)}; choose other output topics")


def check_topics(topics: str | list[str] | None, batch: int | None) -> tuple[list[str], int]:
    """The camera topics as a list and the batch size (default: one frame per topic), or a one-line error for no
    topic, a topic given twice or a batch outside 1..number of topics; needs no bag (preflight calls it too)."""
    topics = [topics] if isinstance(topics, str) else list(topics or [])
    if not topics:
        raise InputError("segment-bag: give at least one --topic /camera/...")
    twice = sorted({t for t in topics if topics.count(t) > 1})
    if twice:
        raise InputError(f"--topic {', '.join(twice)} given twice; give each camera topic once")
    batch = len(topics) if batch is None else batch
    if not 1 <= batch <= len(topics):
        raise InputError(f"--batch {batch}: expected 1 to {len(topics)}, the number of --topic (a batch holds at "
                         "most one frame of each camera, as the multi-camera node's)")
    return topics, batch


def segment_bag(bag: Path, topics: str | list[str], seg, out: Path, video: Path | None = None, overlay: bool = True,
                mask_topic: str | None = None, overlay_topic: str | None = None, fps: float = 0.0,
                progress: bool = True, batch: int | None = None) -> dict:
    """Segment every frame of the camera `topics` of `bag` into a new bag `out` (and videos, see video_paths), in
    batches of at most `batch` frames (default and most: one per topic); returns the summary. Output topics: see
    output_topics. Nothing is left at `out` or a video when it fails."""
    bag, out = Path(bag), Path(out)
    topics, batch = check_topics(topics, batch)
    check_outputs(out, Path(video) if video else None)
    videos = video_paths(Path(video) if video else None, topics)
    cams = [_Camera(t, m, o if overlay else None, videos[t]) for t, (m, o) in
            output_topics(topics, mask_topic, overlay_topic).items()]
    reader = _open_reader(bag)
    try:
        _check_topics(reader, bag, cams)
        return _segment(reader, bag, cams, seg, out, fps, batch, progress)
    finally:
        reader.close()


def _segment(reader, bag: Path, cams: list[_Camera], seg, out: Path, fps: float, batch: int, progress: bool) -> dict:
    """Write the output bag (and videos) into a staging folder, then move them into place."""
    # everything is written into a staging folder beside `out` under its final names (a ROS 2 bag records its
    # file names in metadata.yaml), then moved into place once complete
    stage = out.with_name(f".{out.name}.partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    tmp = stage / out.name
    clips = {c.topic: OverlayVideo(stage / c.video.name, fps or _bag_fps(reader, c.topic)) for c in cams if c.video}
    writer = _writer(reader, bag, tmp)
    start = time.perf_counter()
    try:
        writer.open()
        run = _Batches(reader, writer, cams, seg, batch, clips)
        for conn, stamp, raw in tqdm(reader.messages(), total=reader.message_count, desc=bag.name,
                                     disable=not progress, unit="msg"):
            run.take(conn, stamp, raw)
        run.flush()
        writer.close()
        written = [c.video for c in cams if c.video and clips[c.topic].release()]
        for path in written:
            shutil.move(stage / path.name, path)  # may be another file system
        tmp.replace(out)
    except BaseException:
        _close_quietly(writer)
        for clip in clips.values():
            clip.release()
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return _summary(reader, bag, out, cams, run, written, time.perf_counter() - start)


def _summary(reader, bag: Path, out: Path, cams: list[_Camera], run: _Batches, videos: list[Path],
             seconds: float) -> dict:
    frames = sum(c.frames for c in cams)
    encodings: dict[str, int] = {}
    for c in cams:
        for k, n in c.refused_encodings.items():
            encodings[k] = encodings.get(k, 0) + n
    return {"bag": str(bag), "out": str(out), "format": "ros2" if reader.is2 else "ros1", "frames": frames,
            "refused": sum(c.refused for c in cams), "copied": run.copied, "refused_encodings": encodings,
            "batches": len(run.sizes), "mean_batch": frames / len(run.sizes) if run.sizes else 0.0,
            "topics": {c.topic: {"frames": c.frames, "refused": c.refused, "refused_encodings": c.refused_encodings,
                                 "mask_topic": c.mask_topic, "overlay_topic": c.overlay_topic,
                                 "video": str(c.video) if c.video in videos else None} for c in cams},
            "videos": [str(v) for v in videos], "video": str(videos[0]) if videos else None, "seconds": seconds,
            "frames_per_second": frames / seconds if seconds > 0 else 0.0}


def _image_type(reader):
    """sensor_msgs/Image's class in the reader's typestore and the bag's serializer for it."""
    if rosmsg.IMAGE not in reader.typestore.types:  # a bag of CompressedImage only: Image from a built-in store
        from rosbags.typesys import Stores, get_typestore

        store = get_typestore(Stores.ROS2_HUMBLE if reader.is2 else Stores.ROS1_NOETIC)
        needed = (rosmsg.IMAGE, "std_msgs/msg/Header", "builtin_interfaces/msg/Time")
        reader.typestore.register({n: store.fielddefs[n] for n in needed if n not in reader.typestore.types})
    serialize = reader.typestore.serialize_cdr if reader.is2 else reader.typestore.serialize_ros1
    return reader.typestore.types[rosmsg.IMAGE], serialize


class _Batches:
    """Every message of the bag copied to the output in bag order; camera frames wait for their batch, and so does
    every message read after the first waiting frame, so that each mask and overlay is written right after its frame
    and the output stays in timestamp order (rosbags' readers sort on reading, but an unindexed MCAP is read in
    file order and refused when it is out of order). A batch is segmented when a camera with a waiting frame sends
    another, when `batch` frames wait (at most one per camera), and at the end."""

    def __init__(self, reader, writer, cams: list[_Camera], seg, batch: int, clips: dict) -> None:
        self.reader, self.writer, self.seg, self.batch, self.clips = reader, writer, seg, batch, clips
        self.image_cls, self.serialize = _image_type(reader)
        self.copies = {c.id: _add_connection(writer, reader, c) for c in reader.connections}
        self.cams = {cam.topic: cam for cam in cams}
        self.camera_of = {c.id: self.cams[c.topic] for c in reader.connections if c.topic in self.cams}
        self.outs = {cam.topic: (_add_connection(writer, reader, None, cam.mask_topic, rosmsg.IMAGE),
                                 cam.overlay_topic and _add_connection(writer, reader, None, cam.overlay_topic,
                                                                       rosmsg.IMAGE)) for cam in cams}
        self.queue: list[tuple[int, int, bytes, CameraFrame | None]] = []  # (connection id, stamp, raw, frame)
        self.waiting: dict[str, CameraFrame] = {}  # camera topic -> its frame in the coming batch
        self.sizes: list[int] = []  # frames per batch
        self.copied = 0

    def take(self, conn, stamp: int, raw: bytes) -> None:
        cam = self.camera_of.get(conn.id)
        if cam is not None and cam.topic in self.waiting:
            self.flush()
        frame = self._decode(cam, conn, stamp, raw) if cam is not None else None
        self.queue.append((conn.id, stamp, raw, frame))
        if frame is not None:
            self.waiting[cam.topic] = frame
        if not self.waiting or len(self.waiting) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.waiting:
            self.sizes.append(len(segment_frames(self.seg, list(self.waiting.values()))))
        for cid, stamp, raw, frame in self.queue:
            self.writer.write(self.copies[cid], stamp, raw)
            self.copied += 1
            if frame is not None:
                self._write_outputs(frame, stamp)
        self.queue.clear()
        self.waiting.clear()

    def _decode(self, cam: _Camera, conn, stamp: int, raw: bytes) -> CameraFrame | None:
        """The decoded frame; None for an encoding rosmsg refuses (counted, logged once per camera and encoding)."""
        msg = self.reader.deserialize(raw, conn.msgtype)
        try:
            return decode(cam.topic, msg)
        except rosmsg.EncodingError as e:
            key = getattr(msg, "encoding", None) or getattr(msg, "format", "?")
            if key not in cam.refused_encodings:
                log.warning("segment-bag: %s at %d refused: %s", cam.topic, stamp, e)
            cam.refused_encodings[key] = cam.refused_encodings.get(key, 0) + 1
            cam.refused += 1
            return None

    def _write_outputs(self, frame: CameraFrame, stamp: int) -> None:
        """The frame's mask (and overlay, and video frame) under its own bag time and header."""
        mask_conn, over_conn = self.outs[frame.camera]
        msg = self.image_cls(**rosmsg.mask_fields(frame.ids, frame.header))
        self.writer.write(mask_conn, stamp, self.serialize(msg, rosmsg.IMAGE))
        clip = self.clips.get(frame.camera)
        if over_conn or clip is not None:
            rgb = self.seg.colorize(frame.ids, frame.bgr)
            if over_conn:
                msg = self.image_cls(**rosmsg.overlay_fields(rgb, frame.header))
                self.writer.write(over_conn, stamp, self.serialize(msg, rosmsg.IMAGE))
            if clip is not None:
                clip.write(rgb)
        self.cams[frame.camera].frames += 1


def _close_quietly(writer) -> None:
    try:
        writer.close()
    except Exception:  # closing a half-written bag may fail again; the file is removed anyway
        pass


def _bag_fps(reader, topic: str) -> float:
    """The topic's mean rate over the bag, as a video's (video_rate)."""
    count = sum(c.msgcount for c in reader.connections if c.topic == topic)
    seconds = (reader.end_time - reader.start_time) / 1e9
    return video_rate(count / seconds if count > 1 and seconds > 0 else 0.0)
