"""Offline images and videos: segment an image, a folder, a glob or a video with any artifact into PNGs and an mp4.

`python -m pipeline.run segment --source PATH --artifact X --out DIR [--video out.mp4]` writes one class-id PNG
(uint8, lossless) and one palette overlay PNG per frame, `summary.json`, and optionally an mp4 of the overlays;
everything is staged beside `out` and renamed into place only when complete.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.errors import InputError
from pipeline.io import progress_interval, write_json, writing
from pipeline.preflight import writable_folder
from pipeline.video import DEFAULT_FPS, OverlayVideo, video_rate

log = logging.getLogger("pipeline")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # what cv2.imdecode reads here
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")  # what OpenCV's FFmpeg VideoCapture reads
MAX_MISSES = 50  # consecutive undecodable frames after which the rest of a video counts as lost
OVERLAY = "overlay"  # the subfolder of `out` holding the overlay PNGs
EXPECTED = (f"an image ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}), a folder of images, a quoted glob such as "
            f"\"drive/*.jpg\", or a video ({', '.join(s[1:] for s in VIDEO_SUFFIXES)})")


@dataclass(frozen=True)
class Sources:
    """What --source names: `kind` images (`paths` in order) or video (one path)."""

    source: str
    kind: str
    paths: tuple[Path, ...]

    @property
    def name(self) -> str:
        """A name for the whole input: the video's or image's stem, the folder's name."""
        p = Path(self.source)
        if self.kind == "video" or p.is_file():
            return p.stem
        return p.name if p.is_dir() else self.paths[0].parent.name or "images"


@dataclass(frozen=True)
class Bad:
    """A file (or a video's frames) that could not be read, and why; `frames`: how many frames it cost."""

    file: str
    problem: str
    frames: int = 1


# ------------------------------------------------------------------------------------------------ inputs
def _natural(path: Path) -> list:
    """Sort key with digit runs compared as numbers: frame_2 before frame_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _is(path: Path, suffixes: tuple[str, ...]) -> bool:
    return path.suffix.lower() in suffixes and not path.name.startswith(".")


def find_sources(source: str) -> Sources:
    """The frames --source names: an image file, the images directly in a folder (not its subfolders; hidden files
    left out), the images a glob matches (`**` recursive), each list in natural order, or one video file.
    InputError when nothing matches or two images would write the same `<stem>.png`."""
    path = Path(source)
    if path.is_file():  # named on its own, a hidden file is taken too
        if path.suffix.lower() in VIDEO_SUFFIXES:
            return Sources(source, "video", (path,))
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"--source {source}: not {EXPECTED}")
        return Sources(source, "images", (path,))
    if path.is_dir():
        found = [p for p in path.iterdir() if p.is_file()]
    elif any(c in source for c in "*?["):
        found = [Path(p) for p in glob.glob(source, recursive=True) if os.path.isfile(p)]
    else:
        raise InputError(f"--source {source}: no such file or folder; expected {EXPECTED}")
    images = sorted((p for p in found if _is(p, IMAGE_SUFFIXES)), key=_natural)
    if not images:
        videos = sorted(p.name for p in found if _is(p, VIDEO_SUFFIXES))
        hint = f" (it holds videos: {', '.join(videos[:3])}; give one video as --source)" if videos else ""
        raise InputError(f"--source {source}: no images{hint}; expected {EXPECTED}")
    seen: dict[str, Path] = {}
    for p in images:
        if p.stem in seen:
            raise InputError(f"--source {source}: {seen[p.stem]} and {p} would both write {p.stem}.png; rename one "
                             "or narrow the glob")
        seen[p.stem] = p
    return Sources(source, "images", tuple(images))


def _jpeg_cut_short(data: bytes) -> bool:
    """A JPEG with no end-of-image marker after its scan data: libjpeg decodes it anyway, the missing rows grey, with
    only a warning. The marker walk skips APP segments (an EXIF thumbnail holds an end marker of its own); inside
    scan data 0xFF is always stuffed, so FF D9 after the first scan is the image's end."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xDA:
            return data.find(b"\xff\xd9", i) < 0
        i += 1 if marker == 0xFF else 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return True


def read_image(path: Path) -> np.ndarray | Bad:
    """The BGR uint8 frame of an image file (its stored pixel grid: EXIF orientation ignored, as training reads
    images), or why it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return Bad(str(path), f"cannot read file ({e.strerror or e})")
    if not data:
        return Bad(str(path), "empty file")
    if data[:2] == b"\xff\xd8" and _jpeg_cut_short(data):
        return Bad(str(path), "JPEG cut short (no end marker after its image data)")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return Bad(str(path), "not an image OpenCV can decode (corrupt, cut short or another format)") if bgr is None \
        else bgr


def _refuse(sources: Sources, bad: list[Bad], skip_bad: bool, total: int) -> None:
    """One line for the bad files met, unless --skip-bad lets the rest go on; never when nothing is left."""
    if not bad or (skip_bad and len(bad) < total):
        return
    first = f"{bad[0].file}: {bad[0].problem}"
    if len(bad) == total:
        raise InputError(f"--source {sources.source}: nothing readable ({first})" if total > 1 else first)
    more = f" (+{len(bad) - 1} more: {', '.join(Path(b.file).name for b in bad[1:4])}" \
           f"{', ...' if len(bad) > 4 else ''})" if len(bad) > 1 else ""
    raise InputError(f"{first}{more}; remove it or pass --skip-bad to segment the rest")


def check_sources(sources: Sources, skip_bad: bool, progress: bool = True) -> list[Bad]:
    """Every image decoded (read_image: a full decode, about the cost of the segmentation's own decode, so a folder
    is read twice), a video opened with a first frame; InputError naming the first bad file unless `skip_bad`
    (then the bad files are returned). Frames deeper in a video are checked as they are segmented."""
    if sources.kind == "video":
        bad = [] if _first_frame(sources.paths[0]) else \
            [Bad(str(sources.paths[0]), "OpenCV (FFmpeg) cannot open it or decode its first frame")]
        _refuse(sources, bad, skip_bad, 1)
        return bad
    bad = []
    for p in tqdm(sources.paths, desc="checking", unit="image", disable=not progress,
                  mininterval=progress_interval()):
        found = read_image(p)
        if isinstance(found, Bad):
            bad.append(found)
    _refuse(sources, bad, skip_bad, len(sources.paths))
    return bad


def _first_frame(path: Path) -> bool:
    cap = cv2.VideoCapture(str(path))
    try:
        return cap.isOpened() and cap.read()[0]
    finally:
        cap.release()


# ------------------------------------------------------------------------------------------------ outputs
def default_out(sources: Sources, run_dir: Path) -> Path:
    """Where the PNGs go without --out: `<run dir>/<source name>.segmented`."""
    return Path(run_dir) / f"{sources.name}.segmented"


def check_outputs(out: Path, video: Path | None) -> None:
    """`out` is a new or empty folder that can be made; `video` an mp4 (or avi, mov, mkv) name in an existing,
    writable folder outside `out`. An existing `video` file is replaced at the end, as segment-bag does."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise InputError(f"--out {out}: a file; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"--out {out}: a folder that is not empty; choose another --out or remove it")
    writable_folder(out.absolute().parent, "--out")  # the staging folder beside `out` is renamed onto it
    if video is None:
        return
    video = Path(video)
    if video.is_dir():
        raise InputError(f"--video {video}: a folder; give the mp4 file's name")
    if video.suffix.lower() not in VIDEO_SUFFIXES:
        raise InputError(f"--video {video}: expected a file name ending in {', '.join(VIDEO_SUFFIXES)}")
    if video.absolute().is_relative_to(out.absolute()):
        raise InputError(f"--video {video}: inside --out {out}; put the video beside it")
    if not video.parent.exists():
        raise InputError(f"--video {video}: folder {video.parent} does not exist; create it or choose another --video")
    writable_folder(video.parent, "--video")


def check_settings(batch: int, fps: float) -> None:
    """--batch and --fps values segment() can take."""
    if batch < 1:
        raise InputError(f"--batch {batch}: expected 1 or more frames per predict call")
    if fps < 0:
        raise InputError(f"--fps {fps:g}: expected a positive frame rate (0: the source's)")


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise InputError(f"{path}: OpenCV cannot encode a {image.dtype} {image.shape} PNG")
    path.write_bytes(data.tobytes())


class _Outputs:
    """Each segmented frame's files in the staging folder: `<name>.png` ids, `overlay/<name>.png`, a video frame
    (resized to the first frame's size, since an mp4 has one size)."""

    def __init__(self, stage: Path, seg, overlay: bool, clip: OverlayVideo | None, alpha: float) -> None:
        self.stage, self.seg, self.overlay, self.clip, self.alpha = stage, seg, overlay, clip, alpha
        self.frames, self.size = 0, None
        if overlay:
            (stage / OVERLAY).mkdir()

    def write(self, name: str, bgr: np.ndarray, ids: np.ndarray) -> None:
        _write_png(self.stage / f"{name}.png", ids)
        if self.overlay or self.clip is not None:
            rgb = self.seg.colorize(ids, bgr, self.alpha)
            if self.overlay:
                _write_png(self.stage / OVERLAY / f"{name}.png", rgb[:, :, ::-1])
            if self.clip is not None:
                self.size = self.size or rgb.shape[:2]
                if rgb.shape[:2] != self.size:
                    rgb = cv2.resize(rgb, self.size[::-1], interpolation=cv2.INTER_AREA)
                self.clip.write(rgb)
        self.frames += 1


# ------------------------------------------------------------------------------------------------ frames
def _met(bad: list[Bad], found: Bad, skip_bad: bool) -> None:
    if not skip_bad:
        raise InputError(f"{found.file}: {found.problem}; remove it or pass --skip-bad to segment the rest")
    log.warning("segment: %s: %s (skipped)", found.file, found.problem)
    bad.append(found)


def _image_frames(sources: Sources, bad: list[Bad], skip_bad: bool, progress: bool) -> Iterator[tuple]:
    for p in tqdm(sources.paths, desc=sources.name, unit="image", disable=not progress,
                  mininterval=progress_interval()):
        found = read_image(p)
        if isinstance(found, Bad):
            _met(bad, found, skip_bad)
            continue
        yield p.stem, found


def _video_frames(path: Path, bad: list[Bad], skip_bad: bool, progress: bool) -> Iterator[tuple]:
    """(frame_NNNNNN, BGR) by position in the video. A read that fails before the container's frame count is an
    undecodable frame (its number is left unused); a count of 0 (unknown) reads to the first failure."""
    cap = cv2.VideoCapture(str(path))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
    pos = failed = misses = 0
    try:
        with tqdm(total=total if total > 0 else None, desc=path.name, unit="frame", disable=not progress,
                  mininterval=progress_interval()) as bar:
            while True:
                ok, frame = cap.read()
                if ok:
                    misses = 0
                    yield f"frame_{pos:06d}", frame
                elif pos >= total:
                    break
                elif not skip_bad:
                    raise InputError(f"{path}: frame {pos} of {total} cannot be decoded (cut short or corrupt); "
                                     "pass --skip-bad to segment the rest")
                else:
                    failed, misses = failed + 1, misses + 1
                    if misses >= MAX_MISSES:  # FFmpeg gives nothing more: the rest of the file is lost
                        failed += total - pos - 1
                        break
                pos += 1
                bar.update()
    finally:
        cap.release()
    if failed:
        _met(bad, Bad(str(path), f"{failed} of {total} frames cannot be decoded (cut short or corrupt)", failed),
             skip_bad)


def _batches(frames: Iterator[tuple[str, np.ndarray]], batch: int, one_size: bool) -> Iterator[list]:
    """Runs of up to `batch` frames in order; with `one_size` (no fixed network size) a run also ends where the frame
    size changes, since a batch is one tensor."""
    run: list = []
    for item in frames:
        if run and (len(run) == batch or (one_size and item[1].shape != run[0][1].shape)):
            yield run
            run = []
        run.append(item)
    if run:
        yield run


# ------------------------------------------------------------------------------------------------ the run
def _clip_fps(sources: Sources, fps: float) -> float:
    """--fps, else the video's own rate (video_rate), else DEFAULT_FPS for images."""
    if fps > 0 or sources.kind != "video":
        return fps or DEFAULT_FPS
    cap = cv2.VideoCapture(str(sources.paths[0]))
    rate = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return video_rate(rate)


def segment(sources: Sources, seg, out: Path, *, video: Path | None = None, overlay: bool = True,
            skip_bad: bool = False, batch: int = 1, fps: float = 0.0, alpha: float = 0.5,
            progress: bool = True) -> dict:
    """Segment every frame of `sources` with `seg` (a Segmenter), `batch` frames per predict call, into `out` (and
    `video`); returns the summary, also written as `out/summary.json`. Nothing is left at `out` or `video` when it
    fails or is interrupted."""
    check_settings(batch, fps)
    out, video = Path(out), Path(video) if video else None
    check_outputs(out, video)
    stage = out.absolute().with_name(f".{out.absolute().name}.partial")
    shutil.rmtree(stage, ignore_errors=True)  # what a killed run left
    clip, moved = None, False
    try:
        with writing(out, stage):  # OS errors name the file under `out`, not the staged one
            stage.mkdir(parents=True)
            clip = OverlayVideo(stage / f".video{video.suffix}", _clip_fps(sources, fps)) if video else None
            summary = _run(sources, seg, stage, _Outputs(stage, seg, overlay, clip, alpha), skip_bad, batch, progress)
            summary.update(out=str(out), video=str(video) if video else None, overlay=overlay, batch=batch,
                           fps=clip.fps if clip else None)
            write_json(stage / "summary.json", summary)
            if clip is not None and clip.release():
                shutil.move(clip.path, video)  # may be another file system
                moved = True
            os.replace(stage, out)  # onto a missing or empty folder
    except BaseException:
        if clip is not None:
            clip.release()
        if moved:
            video.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary


def _run(sources: Sources, seg, stage: Path, outputs: _Outputs, skip_bad: bool, batch: int, progress: bool) -> dict:
    bad: list[Bad] = []
    frames = _video_frames(sources.paths[0], bad, skip_bad, progress) if sources.kind == "video" else \
        _image_frames(sources, bad, skip_bad, progress)
    start = time.perf_counter()
    for run in _batches(frames, batch, seg.size is None):
        ids = seg.predict([bgr for _, bgr in run])
        for (name, bgr), m in zip(run, ids):
            outputs.write(name, bgr, m)
    seconds = time.perf_counter() - start
    if outputs.frames == 0:
        raise InputError(f"--source {sources.source}: no frame could be read ({bad[0].file}: {bad[0].problem})"
                         if bad else f"--source {sources.source}: no frames")
    return {"source": sources.source, "kind": sources.kind, "artifact": str(seg.path), "frames": outputs.frames,
            "refused": sum(b.frames for b in bad), "bad": [asdict(b) for b in bad], "seconds": seconds,
            "frames_per_second": outputs.frames / seconds if seconds > 0 else 0.0}


__all__ = ["IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "Bad", "Sources", "check_outputs", "check_settings", "check_sources",
           "default_out", "find_sources", "read_image", "segment"]
