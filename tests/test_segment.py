"""segment: images, folders, globs and videos written to disk, segmented through ONNX Runtime, read back."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import pipeline.stages
from pipeline.errors import InputError
from pipeline.infer import Segmenter
from pipeline.segment import Bad, check_outputs, check_sources, find_sources, read_image, segment
from tests.conftest import export_tiny, splits

SIZE = (64, 128)


@pytest.fixture(scope="module")
def art(tmp_path_factory, synthetic):
    """A tiny student exported twice (static 64x128 batch 1, and dynamic), and street-scene BGR frames."""
    root = synthetic(4, 4, (96, 192))
    train, val = splits(root)
    d = tmp_path_factory.mktemp("artifact")
    for name, dynamic in (("static", False), ("dynamic", True)):
        export_tiny(d / name, val, train, SIZE, dynamic=dynamic)
    frames = [cv2.resize(np.ascontiguousarray(val.read(i)[0][:, :, ::-1]), SIZE[::-1], interpolation=cv2.INTER_AREA)
              for i in range(4)]
    return {"onnx": d / "static" / "student.onnx", "seg": Segmenter.open(d / "static" / "student.onnx", provider="cpu"),
            "dynamic": Segmenter.open(d / "dynamic" / "student.onnx", provider="cpu"), "frames": frames, "root": root}


def write_images(folder: Path, frames, names) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / n for n in names]
    for p, f in zip(paths, frames):
        assert cv2.imwrite(str(p), f)
    return paths


def write_video(path: Path, frames, fps: float, fourcc: str = "mp4v") -> Path:
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert vw.isOpened()
    for f in frames:
        vw.write(f)
    vw.release()
    return path


def read_video(path: Path) -> tuple[list[np.ndarray], float]:
    cap = cv2.VideoCapture(str(path))
    frames, fps = [], cap.get(cv2.CAP_PROP_FPS)
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    return frames, fps


def ids_png(path: Path) -> np.ndarray:
    ids = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert ids is not None and ids.dtype == np.uint8 and ids.ndim == 2, path
    return ids


def assert_written(out: Path, seg, names, frames, overlay: bool = True) -> None:
    """Each frame's id PNG equals seg.predict on it and its overlay equals seg.colorize."""
    for name, frame in zip(names, frames):
        ids = seg.predict(frame)
        assert np.array_equal(ids_png(out / f"{name}.png"), ids), name
        if overlay:
            over = cv2.imread(str(out / "overlay" / f"{name}.png"))
            assert np.array_equal(over[:, :, ::-1], seg.colorize(ids, frame)), name


def no_leftovers(tmp_path: Path) -> bool:
    return not list(tmp_path.rglob(".*.partial")) and not list(tmp_path.rglob(".video*"))


# ------------------------------------------------------------------------------------------------ images
def test_one_image(art, tmp_path):
    (png,) = write_images(tmp_path / "in", art["frames"][:1], ["cam.png"])
    sources = find_sources(str(png))
    assert sources.kind == "images" and sources.paths == (png,)
    summary = segment(sources, art["seg"], tmp_path / "out", progress=False)
    assert_written(tmp_path / "out", art["seg"], ["cam"], art["frames"][:1])
    assert summary["frames"] == 1 and summary["refused"] == 0 and summary["video"] is None
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cam.png", "overlay", "summary.json"]
    assert no_leftovers(tmp_path)


def test_folder_in_natural_order_with_a_clip(art, tmp_path):
    names = ["frame_2.png", "frame_10.png", "frame_1.png", "frame_3.bmp"]
    write_images(tmp_path / "in", art["frames"], names)
    (tmp_path / "in" / "notes.txt").write_text("not a frame")
    (tmp_path / "in" / "._frame_4.png").write_bytes(b"AppleDouble")  # hidden: left out, never a bad file
    (tmp_path / "in" / "sub").mkdir()
    write_images(tmp_path / "in" / "sub", art["frames"][:1], ["deeper.png"])  # not recursive
    sources = find_sources(str(tmp_path / "in"))
    assert [p.name for p in sources.paths] == ["frame_1.png", "frame_2.png", "frame_3.bmp", "frame_10.png"]
    assert check_sources(sources, skip_bad=False, progress=False) == []
    clip = tmp_path / "clip.mp4"
    summary = segment(sources, art["seg"], tmp_path / "out", video=clip, progress=False)
    assert_written(tmp_path / "out", art["seg"], [Path(n).stem for n in names], art["frames"])
    assert summary["frames"] == 4 and summary["video"] == str(clip) and summary["fps"] == 10.0
    frames, fps = read_video(clip)
    assert len(frames) == 4 and frames[0].shape == (*SIZE, 3) and fps == 10.0
    assert no_leftovers(tmp_path)


def test_glob_and_jpeg(art, tmp_path):
    write_images(tmp_path / "a", art["frames"][:2], ["x0.jpg", "x1.jpg"])
    write_images(tmp_path / "b", art["frames"][2:3], ["x2.jpg"])
    write_images(tmp_path / "b" / "deep", art["frames"][3:], ["y3.png"])
    recursive = find_sources(str(tmp_path / "**" / "*.*g")).paths  # in natural order of the whole path
    assert [p.relative_to(tmp_path).as_posix() for p in recursive] == ["a/x0.jpg", "a/x1.jpg", "b/deep/y3.png",
                                                                       "b/x2.jpg"]
    sources = find_sources(str(tmp_path / "*" / "x*.jpg"))
    assert [p.name for p in sources.paths] == ["x0.jpg", "x1.jpg", "x2.jpg"]
    segment(sources, art["seg"], tmp_path / "out", overlay=False, progress=False)
    decoded = [cv2.imread(str(p)) for p in sources.paths]  # JPEG is lossy: ids of the decoded frames
    assert_written(tmp_path / "out", art["seg"], ["x0", "x1", "x2"], decoded, overlay=False)
    assert not (tmp_path / "out" / "overlay").exists()


def test_batches_of_mixed_sizes_give_the_ids_of_single_frames(art, tmp_path):
    big = [cv2.resize(f, (192, 96)) for f in art["frames"][:2]]
    frames = [art["frames"][0], big[0], art["frames"][1], art["frames"][2], big[1], art["frames"][3]]
    names = [f"f{i}" for i in range(len(frames))]
    write_images(tmp_path / "in", frames, [f"{n}.png" for n in names])
    sources = find_sources(str(tmp_path / "in"))
    for seg in (art["dynamic"], art["seg"]):  # no network size: one size per batch; fixed: any mix
        outs = {}
        for batch in (1, 3):
            out = tmp_path / f"out-{seg.size}-{batch}"
            assert segment(sources, seg, out, batch=batch, progress=False)["frames"] == len(frames)
            outs[batch] = [ids_png(out / f"{n}.png") for n in names]
        assert all(np.array_equal(a, b) for a, b in zip(outs[1], outs[3]))
        assert_written(tmp_path / f"out-{seg.size}-3", seg, names, frames)
        assert outs[3][1].shape == (96, 192)


# ------------------------------------------------------------------------------------------------ videos
def test_video_to_pngs_and_clip(art, tmp_path):
    src = write_video(tmp_path / "drive.mp4", art["frames"] * 2, fps=5)
    sources = find_sources(str(src))
    assert sources.kind == "video" and check_sources(sources, skip_bad=False) == []
    clip = tmp_path / "overlay.mp4"
    summary = segment(sources, art["seg"], tmp_path / "out", video=clip, batch=3, progress=False)
    decoded, _ = read_video(src)  # mp4v is lossy: ids of the frames read back from the same file
    names = [f"frame_{i:06d}" for i in range(8)]
    assert_written(tmp_path / "out", art["seg"], names, decoded)
    assert summary["frames"] == 8 and summary["fps"] == 5.0 and summary["kind"] == "video"
    frames, fps = read_video(clip)
    assert len(frames) == 8 and frames[0].shape == (*SIZE, 3) and fps == 5.0
    assert segment(sources, art["seg"], tmp_path / "out2", video=tmp_path / "fast.mp4", fps=25,
                   progress=False)["fps"] == 25
    assert read_video(tmp_path / "fast.mp4")[1] == 25.0


def test_video_cut_short(art, tmp_path):
    full = write_video(tmp_path / "full.avi", art["frames"] * 3, fps=10, fourcc="MJPG")
    cut = tmp_path / "cut.avi"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 6 // 10])  # its index still says 12 frames
    sources = find_sources(str(cut))
    assert check_sources(sources, skip_bad=False, progress=False) == []  # the first frame decodes
    with pytest.raises(InputError, match=r"cut.avi: frame \d+ of 12 cannot be decoded.*--skip-bad") as e:
        segment(sources, art["seg"], tmp_path / "out", video=tmp_path / "clip.mp4", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "clip.mp4").exists() and no_leftovers(tmp_path)
    summary = segment(sources, art["seg"], tmp_path / "out", video=tmp_path / "clip.mp4", skip_bad=True,
                      progress=False)
    got = summary["frames"]
    assert 0 < got < 12 and summary["refused"] == 12 - got
    assert summary["bad"] == [{"file": str(cut), "problem": f"{12 - got} of 12 frames cannot be decoded (cut short "
                               "or corrupt)", "frames": 12 - got}]
    assert sorted(p.name for p in (tmp_path / "out").glob("frame_*.png")) == [f"frame_{i:06d}.png" for i in range(got)]
    assert len(read_video(tmp_path / "clip.mp4")[0]) == got


# ------------------------------------------------------------------------------------------------ bad input
def test_corrupt_files(art, tmp_path):
    write_images(tmp_path / "in", art["frames"][:3], ["a.png", "b.jpg", "c.png"])
    jpeg = (tmp_path / "in" / "b.jpg").read_bytes()
    (tmp_path / "in" / "b.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # OpenCV decodes it, grey below the cut
    (tmp_path / "in" / "d.png").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "in" / "e.png").write_bytes(b"")
    assert cv2.imread(str(tmp_path / "in" / "b.jpg")) is not None
    sources = find_sources(str(tmp_path / "in"))
    with pytest.raises(InputError, match=r"b.jpg: JPEG cut short.*\(\+2 more: d.png, e.png\).*--skip-bad") as e:
        check_sources(sources, skip_bad=False, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="b.jpg: JPEG cut short"):
        segment(sources, art["seg"], tmp_path / "out", video=tmp_path / "clip.mp4", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "clip.mp4").exists() and no_leftovers(tmp_path)
    bad = check_sources(sources, skip_bad=True, progress=False)
    assert [Path(b.file).name for b in bad] == ["b.jpg", "d.png", "e.png"]
    summary = segment(sources, art["seg"], tmp_path / "out", skip_bad=True, progress=False)
    assert summary["frames"] == 2 and summary["refused"] == 3
    assert [Path(b["file"]).name for b in summary["bad"]] == ["b.jpg", "d.png", "e.png"]
    assert summary["bad"][2]["problem"] == "empty file"
    assert_written(tmp_path / "out", art["seg"], ["a", "c"], [art["frames"][0], art["frames"][2]])
    assert not (tmp_path / "out" / "b.png").exists() and not (tmp_path / "out" / "d.png").exists()
    with pytest.raises(InputError, match=r"--source .*: nothing readable \(.*b.jpg: JPEG cut short"):
        check_sources(find_sources(str(tmp_path / "in" / "[bde].*")), skip_bad=True, progress=False)


def test_complete_jpegs_pass(art, tmp_path):
    """The cut-short check reads markers, not bytes: data after the end marker and an EXIF-like APP1 segment holding
    an end marker of its own are fine."""
    ok, data = cv2.imencode(".jpg", art["frames"][0])
    data = data.tobytes()
    app1 = b"Exif\x00\x00" + b"\xff\xd8thumbnail\xff\xd9"
    with_app1 = data[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + data[2:]
    for name, blob in (("trailing.jpg", data + b"motion photo bytes"), ("app1.jpg", with_app1)):
        (tmp_path / name).write_bytes(blob)
        assert np.array_equal(read_image(tmp_path / name), cv2.imdecode(np.frombuffer(data, np.uint8), 1)), name
    (tmp_path / "cut.jpg").write_bytes(with_app1[: len(with_app1) - 40])
    cut = read_image(tmp_path / "cut.jpg")
    assert isinstance(cut, Bad) and cut.problem.startswith("JPEG cut short")


def test_bad_sources_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "vids").mkdir()
    (tmp_path / "vids" / "drive.mp4").write_bytes(b"")
    (tmp_path / "clip.gif").write_bytes(b"GIF89a")
    write_images(tmp_path / "twins", [np.zeros((8, 8, 3), np.uint8)] * 2, ["a.png", "a.jpg"])
    cases = {str(tmp_path / "empty" / "*.jpg"): r"\*\.jpg: no images; expected an image \(jpg",
             str(tmp_path / "missing"): "missing: no such file or folder; expected",
             str(tmp_path / "empty"): "empty: no images;",
             str(tmp_path / "vids"): r"no images \(it holds videos: drive.mp4; give one video as --source\)",
             str(tmp_path / "clip.gif"): "clip.gif: not an image",
             str(tmp_path / "twins"): "would both write a.png"}
    for source, pattern in cases.items():
        with pytest.raises(InputError, match=pattern) as e:
            find_sources(source)
        assert "\n" not in str(e.value) and "--source" in str(e.value)
    with pytest.raises(InputError, match="drive.mp4: OpenCV .*cannot open it"):
        check_sources(find_sources(str(tmp_path / "vids" / "drive.mp4")), skip_bad=True)


def test_outputs_are_checked_before_any_work(art, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.png").write_bytes(b"")
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    cases = [((tmp_path / "full", None), "not empty"), ((tmp_path / "file", None), "a file; give a new or empty"),
             ((tmp_path / "file" / "out", None), "is a file, not a folder"),
             ((out, tmp_path), "a folder; give the mp4"), ((out, tmp_path / "clip.txt"), "ending in .mp4"),
             ((out, out / "clip.mp4"), "inside --out"), ((out, tmp_path / "no" / "clip.mp4"), "does not exist")]
    for (o, v), pattern in cases:
        with pytest.raises(InputError, match=pattern):
            check_outputs(o, v)
    (png,) = write_images(tmp_path / "in", art["frames"][:1], ["cam.png"])
    with pytest.raises(InputError, match="not empty"):
        segment(find_sources(str(png)), art["seg"], tmp_path / "full", progress=False)
    with pytest.raises(InputError, match="--batch 0"):
        segment(find_sources(str(png)), art["seg"], out, batch=0, progress=False)
    assert not out.exists()
    segment(find_sources(str(png)), art["seg"], tmp_path / "empty", progress=False)  # an empty folder is taken
    assert (tmp_path / "empty" / "cam.png").is_file() and no_leftovers(tmp_path)


class Interrupted:
    """The artifact's Segmenter, with Ctrl-C pressed during its `after`-th predict call."""

    def __init__(self, seg, after: int) -> None:
        self.seg, self.size, self.path, self.calls, self.after = seg, seg.size, seg.path, 0, after

    def predict(self, frames):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return self.seg.predict(frames)

    def colorize(self, ids, bgr, alpha=0.5):
        return self.seg.colorize(ids, bgr, alpha)


def test_interrupt_leaves_nothing(art, tmp_path):
    write_images(tmp_path / "in", art["frames"], [f"{i}.png" for i in range(4)])
    with pytest.raises(KeyboardInterrupt):
        segment(find_sources(str(tmp_path / "in")), Interrupted(art["seg"], 3), tmp_path / "out",
                video=tmp_path / "clip.mp4", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "clip.mp4").exists() and no_leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.mark.skipif("segment" not in pipeline.stages.STAGES, reason="the segment stage is not wired yet")
def test_cli(art, tmp_path, capsys):
    from pipeline.run import main

    write_images(tmp_path / "in", art["frames"], [f"f{i}.png" for i in range(4)])
    (tmp_path / "in" / "g.png").write_bytes(b"not a png")
    common = ["--run-dir", str(tmp_path / "run"), "--artifact", str(art["onnx"]), f"data.root={art['root']}"]
    code = main(["segment", "--source", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *common])
    assert code == 2 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "g.png" in err[-1] and "--skip-bad" in err[-1]
    code = main(["segment", "--source", str(tmp_path / "in" / "*.png"), "--out", str(tmp_path / "out"), "--skip-bad",
                 "--batch", "2", "--video", str(tmp_path / "clip.mp4"), "--fps", "4", "--no-overlay", *common])
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["frames"] == 4 and [Path(b["file"]).name for b in summary["bad"]] == ["g.png"]
    assert summary["batch"] == 2 and summary["fps"] == 4 and not (tmp_path / "out" / "overlay").exists()
    assert_written(tmp_path / "out", art["seg"], [f"f{i}" for i in range(4)], art["frames"], overlay=False)
    assert len(read_video(tmp_path / "clip.mp4")[0]) == 4
