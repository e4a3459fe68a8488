"""Fuzz: 1,000 seeded mutations of the files a user hands the pipeline: our safetensors checkpoints (header and body
bytes), the sidecar records of a checkpoint, an ONNX export and an engine (fields dropped, retyped and renamed at
every depth, garbage text), the exported ONNX bytes, the image and label files of a dataset, and config YAML and
key=value overrides. Every case ends in one outcome:

  ok          it still loads and computes what the unmutated input computes (a change to an unused byte or field)
  refused     a PipelineError in one line naming the file or the key
  unverified  it loads and computes something else, and nothing records what it should compute: the bytes of an
              artifact without its sidecar (what a reader cannot check; the sidecar's sha256 exists for this), or a
              flipped byte in a sidecar that leaves valid JSON with another value
  traceback   any other exception, a refusal that is not one line naming the file or key, or a dead interpreter
  silent      it loads without error but computes something else although its record says what it should

traceback and silent fail the test. The counts per outcome are printed (pytest -s) and put in the assertion
message. Every case has its own seed, `{FUZZ_SEED}/{target}/{index}`, printed on failure: FUZZ_SEED=n runs another
thousand, FUZZ_CASE=target:index replays one case, FUZZ_VERBOSE=1 prints every case. The ONNX byte group runs in a
child process (a native crash in ONNX Runtime is then a failed case, not a dead test run).
Run: python -m pytest -q -s tests/test_fuzz.py
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import yaml

from pipeline import artifacts, config
from pipeline.errors import PipelineError
from tests.conftest import ROOT, splits, spread_student

SEED = int(os.environ.get("FUZZ_SEED", "12"))
ONLY = os.environ.get("FUZZ_CASE", "")  # "target:index": replay one case
VERBOSE = bool(os.environ.get("FUZZ_VERBOSE"))  # print every case with its outcome
COUNTS = {"safetensors": 200, "checkpoint-sidecar": 100, "onnx-sidecar": 75, "engine-sidecar": 75, "onnx": 150,
          "dataset": 200, "config": 200}  # 1,000 in all
OUTCOMES = ("ok", "refused", "unverified", "traceback", "silent")
FAILURES = ("traceback", "silent")
SIZE = (64, 128)


# ------------------------------------------------------------------------------------------------ cases, outcomes
@dataclass
class Case:
    target: str
    index: int
    mutation: str = ""
    outcome: str = ""
    detail: str = ""

    @property
    def seed(self) -> str:
        return f"{SEED}/{self.target}/{self.index}"


def rng_of(target: str, index: int) -> random.Random:
    return random.Random(f"{SEED}/{target}/{index}")  # a str seed is hashed with sha512: the same on every run


def indices(target: str) -> list[int]:
    if ONLY:
        name, _, i = ONLY.partition(":")
        return [int(i)] if name == target else []
    return list(range(COUNTS[target]))


def judge(case: Case, run: Callable[[], str | None], names: Sequence[str], unverified: bool = False) -> Case:
    """Run one case: `run` returns None when what loaded computes what the unmutated input does, else what
    differs; a refusal must be one line naming one of `names` (the file, or the key)."""
    try:
        differs = run()
    except PipelineError as e:
        message = str(e)
        if "\n" in message or not any(n in message for n in names):
            case.outcome, case.detail = "traceback", f"refusal not one line naming {names[0]!r}: {message!r}"
        else:
            case.outcome, case.detail = "refused", message
        return case
    except Exception as e:  # noqa: BLE001 (any other exception is what the fuzz looks for)
        case.outcome, case.detail = "traceback", crash_line(e)
        return case
    case.outcome = "ok" if differs is None else "unverified" if unverified else "silent"
    case.detail = differs or ""
    return case


def crash_line(e: BaseException) -> str:
    """The exception's type and first line, and the deepest frame of this repository's code it passed."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if f.filename.startswith(str(ROOT)) and "/.venv/" not in f.filename
            and "/tests/" not in f.filename]
    at = (ours or frames)[-1] if frames else None
    where = f" (at {Path(at.filename).relative_to(ROOT) if ours else at.filename}:{at.lineno})" if at else ""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}{where}"


def check(target: str, cases: list[Case]) -> None:
    counts = Counter(c.outcome for c in cases)
    line = f"{target}: {len(cases)} cases, " + ", ".join(f"{counts[o]} {o}" for o in OUTCOMES)
    print(line)
    for c in cases if VERBOSE else ():
        print(f"  {c.index:3d} {c.outcome:10s} {c.mutation} -> {c.detail[:200]}")
    bad = [c for c in cases if c.outcome in FAILURES]
    assert not bad, line + "".join(f"\n  seed {c.seed} (replay: FUZZ_CASE={c.target}:{c.index}) {c.mutation}: "
                                   f"{c.outcome}: {c.detail[:400]}" for c in bad[:20])


# ------------------------------------------------------------------------------------------------ byte mutations
def mutate_bytes(data: bytes, rng: random.Random, regions: Sequence[tuple[int, int]],
                 ops: Sequence[str] = ("flip", "truncate", "extend", "zero")) -> tuple[bytes, str]:
    """One of `ops` at a place drawn from one of `regions` ([start, end) byte ranges)."""
    op = rng.choice(ops)
    lo, hi = rng.choice(regions)
    at = rng.randrange(lo, hi)
    if op == "flip":
        out, spots = bytearray(data), sorted(rng.randrange(lo, hi) for _ in range(rng.choice((1, 1, 2, 8))))
        for p in spots:
            out[p] ^= 1 << rng.randrange(8)
        return bytes(out), f"flip {len(spots)} bit(s) at {spots[:4]}"
    if op == "truncate":
        return data[:at], f"truncate to {at} of {len(data)} bytes"
    if op == "extend":
        extra = rng.randbytes(rng.choice((1, 16, 4096)))
        at = rng.choice((at, len(data)))
        return data[:at] + extra + data[at:], f"insert {len(extra)} random bytes at {at} of {len(data)}"
    n = rng.choice((1, 8, 64, 4096))
    if op == "zero":
        return data[:at] + bytes(len(data[at:at + n])) + data[at + n:], f"zero {n} bytes at {at}"
    src = rng.randrange(len(data))  # splice: a chunk of the file copied over another place
    chunk = data[src:src + n]
    return data[:at] + chunk + data[at + len(chunk):], f"splice {len(chunk)} bytes from {src} over {at}"


# ------------------------------------------------------------------------------------------------ seed artifacts
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: hundreds of small loads and forward passes on a shared 2-core machine run several times
    faster than with threads that wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, synthetic):
    """A tiny B0 student at 64x128: its checkpoint, its FP32 ONNX export (both with sidecars), a tiny synthetic
    set, and what they compute (the references every mutation is compared with)."""
    from pipeline.config import ExportConfig
    from pipeline.export import export_student
    from pipeline.models import save_model

    d = tmp_path_factory.mktemp("fuzz-seeds")
    root = synthetic(2, 2, SIZE)
    train, val = splits(root)
    model = spread_student()
    ckpt = save_model(model, d / "student.safetensors")
    e = ExportConfig(size=SIZE, fp16=False, int8=False, parity_frames=1, eval_frames=1)
    export_student(model, d / "export", e, val, train)  # no source: a temporary path would move the graph's bytes
    probe = torch.randn(1, 3, SIZE[0] // 2, SIZE[1] // 2)  # any size goes: the logits of a small one say as much
    return SimpleNamespace(dir=d, ckpt=ckpt, export=d / "export", root=root, x=probe)


# ------------------------------------------------------------------------------------------------ checkpoints
def model_view(path: Path, x: torch.Tensor) -> tuple:
    """What a checkpoint computes: its architecture, its label set and normalisation, its logits on `x`."""
    from pipeline.models import load_model

    model = load_model(path)
    m = model.meta
    with torch.no_grad():
        logits = model(x)
    return asdict(model.config), (m.classes, m.palette, m.mean, m.std, m.input_size), logits


def model_change(path: Path, ref: tuple, x: torch.Tensor) -> str | None:
    config_, meta, logits = model_view(path, x)
    if config_ != ref[0]:
        return f"config {[k for k in config_ if config_[k] != ref[0].get(k)]} differs"
    if meta != ref[1]:
        return "label set, palette, normalisation or input size differs"
    if not torch.equal(logits, ref[2]):
        return f"logits differ (max {float((logits - ref[2]).abs().max()):.3g})"
    return None


def header_edit(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A safetensors header changed as JSON and written back with its length: a tensor's dtype, shape or offsets,
    two same-sized tensors' offsets swapped, an entry renamed or dropped, or the file's own metadata."""
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry, what = header[name], rng.choice(("dtype", "shape", "offsets", "swap", "rename", "drop", "metadata"))
    if what == "dtype":
        entry["dtype"] = rng.choice(("F16", "BF16", "F64", "I64", "U8", "BOOL", "f32", "F32 "))
    elif what == "shape":
        s = entry["shape"]
        entry["shape"] = rng.choice((s[::-1], [math.prod(s)], [*s, 1], [s[0] + 1, *s[1:]], [], [-1, *s[1:]]))
    elif what == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice(([a + 4, b + 4], [a - 4, b - 4], [b, a], [a, b + 1], [0, b - a]))
    elif what == "swap":
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        same = sorted(k for k, v in header.items() if k not in ("__metadata__", name) and v["dtype"] == entry["dtype"]
                      and v["data_offsets"][1] - v["data_offsets"][0] == size)
        if same:
            other = rng.choice(same)
            entry["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], entry["data_offsets"]
            name = f"{name} and {other}"
    elif what == "rename":
        header[name + rng.choice(("x", "_", ".0"))] = header.pop(name)
    elif what == "drop":
        del header[name]
    else:
        header["__metadata__"] = rng.choice(({}, {"format": "other"}, {"format": ""}))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body, f"header edit: {what} of {name}"


def test_safetensors_checkpoints(seeds, tmp_path):
    """Header and body bytes of our checkpoint, with its sidecar beside it (even cases: every change is refused,
    by the parser or by the sha256) and without (odd: the parser and the loader's own checks alone)."""
    pristine = seeds.ckpt.read_bytes()
    n = struct.unpack("<Q", pristine[:8])[0]
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(pristine)
    refs = {True: model_view(seeds.ckpt, seeds.x), False: model_view(bare, seeds.x)}
    path = tmp_path / "student.safetensors"
    cases = []
    for i in indices("safetensors"):
        rng, with_sidecar = rng_of("safetensors", i), i % 2 == 0
        part = rng.choice(("header", "body"))
        if part == "header" and rng.random() < 0.4:
            data, mutation = header_edit(pristine, rng)
        else:
            data, mutation = mutate_bytes(pristine, rng, [(0, 8 + n)] if part == "header" else [(8 + n, len(pristine))])
        path.write_bytes(data)
        side = artifacts.sidecar_path(path)
        if with_sidecar:
            shutil.copyfile(artifacts.sidecar_path(seeds.ckpt), side)
        else:
            side.unlink(missing_ok=True)
        case = Case("safetensors", i, f"{part}: {mutation} ({'with' if with_sidecar else 'no'} sidecar)")
        cases.append(judge(case, lambda ref=refs[with_sidecar]: model_change(path, ref, seeds.x), [path.name],
                           unverified=not with_sidecar))
    check("safetensors", cases)


# ------------------------------------------------------------------------------------------------ sidecar JSON
RETYPES = (None, True, False, 0, -1, 7, 2 ** 70, 1.5, float("nan"), float("inf"), "", "text", "19", [], [1], ["a"],
           [[1, 2, 3]], {}, {"a": 1})


def json_kind(v: object) -> str:
    """A value's type as a record's reader sees it: an integer where a fraction is expected is the same number (a
    value change, not a retype), a fraction where an integer is expected, or NaN and infinity, are another type."""
    if isinstance(v, float):
        return "fraction" if math.isfinite(v) else "non-finite"
    return "integer" if isinstance(v, int) and not isinstance(v, bool) else type(v).__name__


def json_paths(obj, prefix: tuple = ()) -> list[tuple]:
    """The path (keys and list indices) of every value inside `obj`, at every depth."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    out = []
    for k, v in items:
        out += [(*prefix, k), *json_paths(v, (*prefix, k))]
    return out


def dotted(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def garbage_text(text: str, rng: random.Random) -> tuple[bytes, str, bool]:
    """A text-level change of a JSON or YAML file: (bytes, what, whether the content is unchanged)."""
    what = rng.choice(("truncate", "flip", "bytes", "empty", "other", "reformat", "bom", "nul"))
    raw = text.encode()
    if what == "truncate":
        at = rng.randrange(len(raw))
        return raw[:at], f"text cut at {at} of {len(raw)}", False
    if what == "flip":
        at = rng.randrange(len(raw))
        return raw[:at] + bytes([raw[at] ^ (1 << rng.randrange(8))]) + raw[at + 1:], f"text byte {at} flipped", False
    if what == "bytes":
        return rng.randbytes(rng.choice((1, 64, 2048))), "random bytes", False
    if what == "empty":
        return b"", "empty file", False
    if what == "other":
        return rng.choice((b"null", b"[]", b"42", b'"text"', b"[{}]", b"{", b"{}")), "another JSON value", False
    if what == "reformat":  # whitespace only: the same document
        same = json.dumps(json.loads(text), indent=rng.choice((None, 1, 4))) + rng.choice(("", "\n", "\r\n"))
        return same.encode(), "reformatted (whitespace)", True
    if what == "bom":
        return b"\xef\xbb\xbf" + raw, "UTF-8 BOM in front", False
    return raw[:len(raw) // 2] + b"\x00" + raw[len(raw) // 2:], "NUL byte in the middle", False


def mutate_json(record: dict, rng: random.Random) -> tuple[bytes, str, bool]:
    """Drop, retype or rename a field at any depth (drawn evenly over the record's field paths, list indices
    folded, so the classes and palette entries do not crowd out the rest), or garbage text: (bytes, what, whether a
    reader can tell; a flipped byte that leaves valid JSON with another value, a class name or a palette entry, is a
    change of the record itself, which nothing records)."""
    op = rng.choice(("drop", "retype", "rename", "drop", "retype", "rename", "text"))
    if op == "text":
        data, what, _ = garbage_text(json.dumps(record, indent=2), rng)
        return data, what, "flipped" not in what
    paths = [p for p in json_paths(record) if op != "rename" or isinstance(p[-1], str)]
    templates: dict[str, list[tuple]] = {}
    for p in paths:
        templates.setdefault(dotted(tuple(0 if isinstance(k, int) else k for k in p)), []).append(p)
    path = rng.choice(templates[rng.choice(sorted(templates))])
    doc = copy.deepcopy(record)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if op == "drop":
        del parent[key]
    elif op == "rename":
        parent[rng.choice((key + "_", key.upper(), key[:-1], "x" + key))] = parent.pop(key)
    else:
        old = parent[key]
        parent[key] = rng.choice([v for v in RETYPES if json_kind(v) != json_kind(old)
                                  and (json_kind(old), json_kind(v)) != ("fraction", "integer")])
        op = f"retype ({type(old).__name__} -> {parent[key]!r})"
    return json.dumps(doc, indent=2).encode(), f"{op} {dotted(path)}", True


def sidecar_cases(target: str, artifact: Path, change: Callable[[], str | None], part: int = 0,
                  parts: int = 1) -> list[Case]:
    """The cases of `target` (those with index % parts == part) on the sidecar of `artifact`, each judged by
    `change` (what the reader computes now against what it computed from the unmutated sidecar)."""
    side = artifacts.sidecar_path(artifact)
    pristine = side.read_bytes()
    record = json.loads(pristine)
    cases = []
    for i in [i for i in indices(target) if i % parts == part]:
        data, mutation, checkable = mutate_json(record, rng_of(target, i))
        side.write_bytes(data)
        cases.append(judge(Case(target, i, mutation), change, [artifact.name], unverified=not checkable))
        side.write_bytes(pristine)
    return cases


def test_checkpoint_sidecars(seeds, tmp_path):
    path = tmp_path / "student.safetensors"
    shutil.copyfile(seeds.ckpt, path)
    shutil.copyfile(artifacts.sidecar_path(seeds.ckpt), artifacts.sidecar_path(path))
    ref = model_view(path, seeds.x)
    check("checkpoint-sidecar", sidecar_cases("checkpoint-sidecar", path, lambda: model_change(path, ref, seeds.x)))


FRAME = np.random.default_rng(0).integers(0, 256, (*SIZE, 3), dtype=np.uint8)


def onnx_view(path: Path) -> tuple:
    """What an exported graph computes through the Segmenter: its record (less the sidecar's own fields), the
    class ids of a frame and every raw output."""
    from pipeline.infer import Segmenter

    seg = Segmenter.open(path, provider="cpu", threads=1)
    record = {k: v for k, v in seg.meta.to_dict().items() if k not in ("file", "sha256", "bytes", "measured")}
    return record, seg.predict(FRAME), seg.backend.infer(seg.preprocess(FRAME)[0])


def onnx_change(path: Path, ref: tuple) -> str | None:
    record, ids, outputs = onnx_view(path)
    if record != ref[0]:
        return f"record fields {[k for k in record if record[k] != ref[0].get(k)]} differ"
    if not np.array_equal(ids, ref[1]):
        return f"class ids differ on {(ids != ref[1]).mean():.1%} of the pixels"
    for name, value in outputs.items():
        if name not in ref[2] or not np.array_equal(value, ref[2][name], equal_nan=True):
            return f"output {name!r} differs"
    return None


def test_onnx_sidecars(seeds, tmp_path):
    path = tmp_path / "student.onnx"
    shutil.copyfile(seeds.export / "student.onnx", path)
    shutil.copyfile(artifacts.sidecar_path(seeds.export / "student.onnx"), artifacts.sidecar_path(path))
    ref = onnx_view(path)
    check("onnx-sidecar", sidecar_cases("onnx-sidecar", path, lambda: onnx_change(path, ref)))


ENVIRONMENTS = (("10.13.3.9", "NVIDIA H200", "9.0"), ("10.14.1.48", "NVIDIA H200", "9.0"),
                ("10.13.3.9", "NVIDIA A100-SXM4-80GB", "8.0"), ("10.13.3.9", "NVIDIA GeForce RTX 4090", "8.9"),
                ("11.0.0.1", "NVIDIA H200", "9.0"), ("10.13.0.35", "NVIDIA GeForce RTX 4090", "8.9"),
                ("10.13.0.35", "Tesla T4", "7.5"))
SHAPES = ((1, 3, 128, 256), (2, 3, 128, 256), (1, 3, 256, 512), (4, 3, 1024, 2048), (1, 128, 256, 3), (1, 3, 128))


ENGINE_VIEW = ("contract", "classes", "palette", "mean", "std", "compatibility verdicts", "shape verdicts")


def engine_view(plan: Path) -> tuple:
    """What the runtime makes of an engine's record before TensorRT reads the plan: the contract, label set and
    normalisation the Segmenter uses, the verdict on each TensorRT version and GPU, and on each input shape."""
    from trt.runtime import check_shape, load_sidecar, sidecar_mismatch

    meta = load_sidecar(plan)
    verdicts = []
    for shape in SHAPES:
        try:
            check_shape(meta, shape)
            verdicts.append("fits")
        except PipelineError:
            verdicts.append("refused")
    n = meta.normalization
    return (asdict(meta.contract), meta.classes, meta.palette, n.mean, n.std,
            [sidecar_mismatch(meta, *env) for env in ENVIRONMENTS], verdicts)


def test_engine_sidecars(tmp_path):
    """Two engine records as trt.build writes them (the golden static INT8 plan; a dynamic, version-compatible,
    Ampere+ one): their sidecars mutated, read by trt.runtime.load_sidecar and the checks it feeds."""
    from pipeline.artifacts import Metadata, write_sidecar
    from tests.test_trt_runtime import sidecar as dynamic_record

    golden = Metadata.from_dict(json.loads((ROOT / "tests/golden/plan-int8.json").read_text()), "golden")
    dynamic = dynamic_record(version_compatible=True, hardware_compat="ampere+")
    cases = []
    for part, (name, meta) in enumerate((("static", golden), ("dynamic", dynamic))):
        plan = tmp_path / name / "student.int8.plan"
        plan.parent.mkdir()
        plan.write_bytes(b"a plan's bytes: TensorRT never reads them here")
        write_sidecar(plan, meta)
        ref = engine_view(plan)

        def change(plan=plan, ref=ref) -> str | None:
            view = engine_view(plan)
            return next((f"{what} differ" for what, a, b in zip(ENGINE_VIEW, view, ref) if a != b), None)

        for c in sidecar_cases("engine-sidecar", plan, change, part, 2):
            c.mutation = f"{name} engine: {c.mutation}"
            cases.append(c)
    check("engine-sidecar", sorted(cases, key=lambda c: c.index))


# ------------------------------------------------------------------------------------------------ ONNX bytes
def onnx_child(seed_dir: Path, work: Path, start: int, out: Path) -> None:
    """The ONNX byte cases from `start` on, in this (child) process, each result appended to `out` as it is known
    (a `begin` line first, so the parent can name a case that took the interpreter down)."""
    pristine = (seed_dir / "student.onnx").read_bytes()
    side = artifacts.sidecar_path(seed_dir / "student.onnx").read_bytes()
    ref = onnx_view(seed_dir / "student.onnx")
    regions = [(0, 1 << 15), (len(pristine) - (1 << 15), len(pristine)), (0, len(pristine))]
    path = work / "student.onnx"
    with open(out, "a") as log:
        for i in [i for i in indices("onnx") if i >= start]:
            with_sidecar = i % 2 == 0
            data, mutation = mutate_bytes(pristine, rng_of("onnx", i), regions,
                                          ("flip", "truncate", "extend", "zero", "splice"))
            case = Case("onnx", i, f"{mutation} ({'with' if with_sidecar else 'no'} sidecar)")
            log.write(json.dumps({"begin": i, "mutation": case.mutation}) + "\n")
            log.flush()
            path.write_bytes(data)
            if with_sidecar:
                artifacts.sidecar_path(path).write_bytes(side)
            else:
                artifacts.sidecar_path(path).unlink(missing_ok=True)
            signal.alarm(60)  # a hung case ends the child (SIGALRM's default action), and is named by the parent
            judge(case, lambda: onnx_change(path, ref), [path.name], unverified=not with_sidecar)
            signal.alarm(0)
            log.write(json.dumps(asdict(case)) + "\n")
            log.flush()


def test_onnx_bytes(seeds, tmp_path):
    """ONNX bytes flipped, cut, extended, zeroed and spliced (biased to the graph's first and last 32 KiB, where
    the nodes and the inputs, outputs and metadata are), opened with Segmenter.open and run on a frame: with the
    sidecar (even cases) every change is refused; without it a change that still parses and runs computes what
    the bytes now say (unverified)."""
    out, start, cases = tmp_path / "cases.jsonl", 0, {}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    while True:
        command = [sys.executable, "-m", "tests.test_fuzz", "onnx", str(seeds.export), str(tmp_path), str(start),
                   str(out)]
        p = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        begun = {}
        for line in out.read_text().splitlines() if out.exists() else []:
            record = json.loads(line)
            if "begin" in record:
                begun[record["begin"]] = record["mutation"]
            else:
                cases[record["index"]] = Case(**record)
        if p.returncode == 0:
            break
        dead = [i for i in sorted(begun) if i not in cases]
        assert dead, f"the ONNX fuzz child failed before its first case (exit {p.returncode}): {p.stderr[-3000:]}"
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        cases[dead[0]] = Case("onnx", dead[0], begun[dead[0]], "traceback",
                              f"the interpreter died (exit {p.returncode}) {last}")
        start = dead[0] + 1
    check("onnx", [cases[i] for i in sorted(cases)])


# ------------------------------------------------------------------------------------------------ dataset files
def png_with_size(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """The PNG's header (IHDR) claiming another width or height, its CRC made right: a header that lies."""
    width, height = struct.unpack(">II", data[16:24])
    new = (rng.choice((width, 0, 1, 2 * width, 1 << 20, (1 << 31) - 1)),
           rng.choice((height, 0, 1, 2 * height, 1 << 20, (1 << 31) - 1)))
    chunk = b"IHDR" + struct.pack(">II", *new) + data[24:29]  # type and data: what the CRC covers
    out = data[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]
    return out, f"IHDR says {new[0]}x{new[1]} (file {width}x{height})"


def mutate_image(data: bytes, rng: random.Random, label: bool) -> tuple[bytes, str, np.ndarray | None]:
    """(bytes, what, the array a faithful reader returns for it, or None where it must be refused or unchanged)."""
    op = rng.choice(("flip", "truncate", "extend", "zero", "size", "channels", "channels", "header"))
    if op in ("flip", "truncate", "extend", "zero"):
        out, what = mutate_bytes(data, rng, [(0, 64), (0, len(data)), (len(data) - 64, len(data))], (op,))
        return out, what, None
    if op == "header":
        out, what = png_with_size(data, rng)
        return out, what, None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if op == "size":
        h, w = img.shape[:2]
        size = rng.choice(((h, w + 1), (h - 1, w), (2 * h, 2 * w), (h // 2, w), (w, h)))
        return cv2.imencode(".png", cv2.resize(img, size[::-1], interpolation=cv2.INTER_NEAREST))[1].tobytes(), \
            f"re-encoded at {size[1]}x{size[0]} (file {w}x{h})", None
    if label:
        kind = rng.choice(("3 channels", "4 channels", "16 bit"))
        new = {"3 channels": lambda: cv2.merge([img] * 3), "4 channels": lambda: cv2.merge([img] * 4),
               "16 bit": lambda: img.astype(np.uint16)}[kind]()
        return cv2.imencode(".png", new)[1].tobytes(), f"label re-encoded with {kind}", None
    kind = rng.choice(("gray", "BGRA", "16 bit"))
    if kind == "gray":
        gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        return cv2.imencode(".png", gray)[1].tobytes(), "image re-encoded gray", cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    new = cv2.cvtColor(img, cv2.COLOR_BGR2BGRA) if kind == "BGRA" else img.astype(np.uint16) * 257
    return cv2.imencode(".png", new)[1].tobytes(), f"image re-encoded {kind}", None


def sample_view(ds, train) -> tuple:
    rgb, label = ds.read(0)
    item, augmented = ds[0], train[(0, 5)]
    return rgb, label, item["image"], item["label"], augmented["image"], augmented["label"]


def sample_change(ds, train, ref: tuple, expected_rgb: np.ndarray | None) -> str | None:
    view = sample_view(ds, train)
    if expected_rgb is not None:  # a valid file of other content: read must give what it holds
        same = np.array_equal(view[0], expected_rgb) and np.array_equal(view[1], ref[1])
        return None if same else "read() gives other pixels than the file holds"
    names = ("image", "label", "eval image", "eval label", "train image", "train label")
    for name, a, b in zip(names, view, ref):
        if not (np.array_equal(a, b) if isinstance(a, np.ndarray) else torch.equal(a, b)):
            return f"{name} differs"
    return None


def test_dataset_files(seeds, tmp_path):
    """A sample's image and label PNG cut, flipped, zeroed, extended, re-encoded at another size or with another
    channel count or bit depth, or with a header that lies about the size; read through read(), ds[i] (evaluation)
    and ds[(i, seed)] (training augmentation)."""
    from pipeline.data import TrainTransform, build_dataset

    root = shutil.copytree(seeds.root, tmp_path / "synthetic")
    ds = build_dataset("synthetic", root, "val")
    train = build_dataset("synthetic", root, "val", TrainTransform(size=SIZE))
    ref = sample_view(ds, train)
    cases = []
    for i in indices("dataset"):
        target = ds.files[0][i % 2]
        pristine = target.read_bytes()
        data, mutation, expected = mutate_image(pristine, rng_of("dataset", i), label=i % 2 == 1)
        target.write_bytes(data)
        case = Case("dataset", i, f"{'label' if i % 2 else 'image'}: {mutation}")
        cases.append(judge(case, lambda want=expected: sample_change(ds, train, ref, want), [target.name]))
        target.write_bytes(pristine)
    check("dataset", cases)


# ------------------------------------------------------------------------------------------------ config
def _nonneg(v) -> bool:
    return v >= 0


def _positive(v) -> bool:
    return v >= 1


# What an accepted value may be, key by key (an oracle written from the docs, independent of config.py's checks);
# every float must also be finite, every integer fit 64 bits, every text be free of NUL characters.
DOMAIN: dict[str, Callable[[object], bool]] = {
    "data.size": lambda v: min(v) >= 32, "data.scale": lambda v: 0 < v[0] <= v[1], "data.workers": _nonneg,
    "data.synthetic_train": _positive, "data.synthetic_val": _positive,
    "data.synthetic_size": lambda v: min(v) >= 32, "data.synthetic_seed": _nonneg,
    "teacher.steps": _nonneg, "student.steps": _nonneg,
    "train.steps": _positive, "train.batch_size": _positive, "train.accumulate": _positive, "train.lr": lambda v: v > 0,
    "train.weight_decay": _nonneg, "train.betas": lambda v: all(0 <= b < 1 for b in v),
    "train.warmup_steps": _nonneg, "train.power": _nonneg, "train.final_lr_ratio": lambda v: 0 <= v <= 1,
    "train.grad_clip": _nonneg, "train.log_every": _positive, "train.eval_every": _positive,
    "train.ckpt_every": _positive, "train.keep_checkpoints": _positive,
    "export.size": lambda v: v == (0, 0) or min(v) >= 32, "export.batch": _positive, "export.opset": lambda v: v >= 17,
    "export.calibration_frames": _positive, "export.parity_frames": _nonneg, "export.parity_max_diff": lambda v: v > 0,
    "export.parity_min_agreement": lambda v: 0 <= v <= 1, "export.eval_frames": _nonneg,
    "export.workspace_gib": lambda v: v > 0, "export.opt_level": lambda v: 0 <= v <= 5,
    "bench.size": lambda v: v == (0, 0) or min(v) >= 32, "bench.batch": _positive, "bench.warmup": _nonneg,
    "bench.iterations": _positive, "bench.rounds": _positive, "bench.threads": _nonneg, "bench.eval_frames": _nonneg,
    "seed": _nonneg,
}


def _plain_ok(v: object) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return -(1 << 63) <= v < (1 << 63)
    if isinstance(v, str):
        return "\x00" not in v
    return not isinstance(v, (list, tuple)) or all(map(_plain_ok, v))


def config_problem(cfg: config.Config, given: dict[str, object], scratch: Path) -> str | None:
    """Why an accepted config does not hold what it was given: a value outside its domain, of another type than its
    default, a list or mapping turned into text, a value given in the field's own type stored as another, or a
    config that does not read back from its own dump (config.yaml of a run)."""
    defaults = config.keys()
    for key, value in config.keys(cfg).items():
        default = defaults[key]
        if type(value) is not type(default) or not _plain_ok(value) or not DOMAIN.get(key, lambda v: True)(value):
            return f"{key}={value!r} accepted"
        if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
            return f"{key}={value!r} accepted (keys must be names)"
    for key, raw in given.items():
        if key not in defaults:
            continue
        held, default = config.keys(cfg)[key], defaults[key]
        if isinstance(default, str) and isinstance(raw, (list, dict, bytes)):
            return f"{key}: {raw!r} given, {held!r} held"
        if type(raw) is type(default) and not isinstance(raw, dict) and raw != held:
            return f"{key}: {raw!r} given, {held!r} held"
    scratch.write_text(config.dump(cfg))
    if config.load(scratch) != cfg:
        return "the config does not read back from its own dump"
    return None


VALUES = (None, True, False, 0, -1, 3, 2 ** 70, 1.5, -0.5, float("nan"), float("inf"), -float("inf"), "", "abc",
          "64x128", "1e-3", "a\x00b", [], [1], [1, 2], [64, 128], [1, 2, 3], ["a", "b"], {}, {"a": 1}, {1: 2},
          datetime.date(2024, 1, 1), b"bytes")
OVERRIDE_VALUES = ("", "0", "-1", "1.5", "nan", ".nan", "inf", "1e400", "true", "off", "yes", "null", "~", "[1, 2]",
                   "{a: 1}", "64x128", "1e400x64", "x", "abc", "'quoted'", "a=b", "1_000", "0x10", "9" * 30, "-0",
                   "[", "!!binary aGVsbG8=", "2024-01-01")


def mutate_config(doc: dict, rng: random.Random) -> tuple[object, str, list[str], dict]:
    """(YAML data or override strings, what, the names a refusal may give, the dotted values given)."""
    sections = sorted(k for k, v in doc.items() if isinstance(v, dict))
    section = rng.choice(sections)
    key = rng.choice(sorted(doc[section]))
    op = rng.choice(("retype", "retype", "retype", "rename", "insert", "section", "override", "override"))
    doc = copy.deepcopy(doc)
    if op == "retype":
        doc[section][key] = value = rng.choice(VALUES)
        return doc, f"{section}.{key}: {value!r}", [f"{section}.{key}"], {f"{section}.{key}": value}
    if op == "rename":
        new = rng.choice([n for n in (key + "s", key[:-1], key.upper(), key.replace("_", "-"), "x" + key) if n != key])
        doc[section][new] = doc[section].pop(key)
        return doc, f"{section}.{key} renamed {new}", [f"{section}.{new}"], {}
    if op == "insert":
        name = rng.choice(("extra", "lr", "Steps", "1", "size.h"))
        where = rng.choice((section, "top", "nested"))
        if where == "top":
            doc[name] = 1
        else:
            doc[section][name] = {"a": 1} if where == "nested" else rng.choice(VALUES)
        full = name if where == "top" else f"{section}.{name}"
        return doc, f"unknown key {full} added", [full], {}
    if op == "section":
        doc[section] = value = rng.choice((None, 1, "text", [1, 2], [{"a": 1}]))
        return doc, f"section {section}: {value!r}", [section], {}
    full = rng.choice((f"{section}.{key}", f"{section}.{key}x", f"distill.weights.{key}", "seed"))
    text = rng.choice(OVERRIDE_VALUES)
    given = config.parse_overrides([f"{full}={text}"])
    return [f"{full}={text}"], f"override {full}={text!r}", [full, f"{full}={text}"], given


def config_case(i: int, path: Path, bases: list[str]) -> Case:
    rng = rng_of("config", i)
    base = rng.choice(bases)
    scratch = path.with_name("dumped.yaml")
    if rng.random() < 0.2:  # text-level: the file itself broken, or only reformatted
        if rng.random() < 0.3:
            data, what, same = garbage_text(json.dumps(yaml.safe_load(base)), rng)
        else:
            data, what, same = yaml_text(base, rng)
        path.write_bytes(data)
        scratch.write_text(base)
        expected = config.load(scratch) if same else None
        names = [str(path), *config.keys(), "data", "train", "distill", "export", "bench", "teacher", "student"]

        def run() -> str | None:
            cfg = config.load(path)
            if expected is not None and cfg != expected:
                return "the same document, another config"
            return config_problem(cfg, {}, scratch)
        return judge(Case("config", i, what), run, names)
    mutated, what, names, given = mutate_config(yaml.safe_load(base), rng)
    if isinstance(mutated, list):
        return judge(Case("config", i, what), lambda: config_problem(config.load(None, mutated), given, scratch),
                     names)
    path.write_text(yaml.safe_dump(mutated, sort_keys=False, allow_unicode=True))
    return judge(Case("config", i, what), lambda: config_problem(config.load(path), given, scratch),
                 [str(path), *names])


def yaml_text(base: str, rng: random.Random) -> tuple[bytes, str, bool]:
    """A YAML-level change: reformatted (the same document), or broken in a way a person or a disk breaks it."""
    data = yaml.safe_load(base)
    what = rng.choice(("flow", "comments", "tabs", "nesting", "documents", "list", "non-utf8", "python", "aliases"))
    if what == "flow":
        return yaml.safe_dump(data, default_flow_style=True).encode(), "YAML in flow style", True
    if what == "comments":
        return ("# a comment\n\n" + base.replace("\n", "  # note\n", 3)).encode(), "comments added", True
    if what == "tabs":
        return base.replace("  ", "\t", 1).encode(), "a tab in the indentation", False
    if what == "nesting":
        return ("data:\n  root: " + "[" * 3000 + "]" * 3000 + "\n").encode(), "3000 nested lists", False
    if what == "documents":
        return (base + "\n---\n" + base).encode(), "two YAML documents", False
    if what == "list":
        return b"- data\n- train\n", "a list at the top", False
    if what == "non-utf8":
        return base.encode("utf-16"), "UTF-16 text", False
    if what == "python":
        return b"data: !!python/object/apply:os.system ['true']\n", "a python tag", False
    anchors = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcd", "bcde"))
    return (anchors + "distill:\n  weights: {pea: *e}\ndata:\n  root: *e\n").encode(), "aliases (10^5 refs)", False


def test_config_values(tmp_path):
    """config.load on the defaults and the reference Cityscapes file with values of every type, misspelt,
    unknown and misplaced keys, broken text, and key=value overrides."""
    bases = [config.dump(config.Config()), (ROOT / "pipeline/configs/cityscapes.yaml").read_text()]
    check("config", [config_case(i, tmp_path / "c.yaml", bases) for i in indices("config")])


# ------------------------------------------------------------------------------------------------ pinned cases
# What the fuzz found on main (a9561be), each kept as a plain regression test.
def one_line(excinfo: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and all(p in message for p in parts), message


def test_an_onnx_its_sidecar_does_not_describe_is_refused(seeds, tmp_path):
    """onnx (with sidecar): a changed weight that still parses ran silently beside a sidecar recording its sha256
    (14 of 75 such cases on main); onnx-sidecar: the sidecar was never read, so a record that disagrees with the
    graph's went unnoticed."""
    from pipeline.errors import InputError
    from pipeline.infer import Segmenter

    path, side = tmp_path / "student.onnx", artifacts.sidecar_path(tmp_path / "student.onnx")
    data = bytearray((seeds.export / "student.onnx").read_bytes())
    data[len(data) // 2] ^= 1  # a bit of a weight: the graph still parses and runs
    path.write_bytes(data)
    shutil.copyfile(artifacts.sidecar_path(seeds.export / "student.onnx"), side)
    with pytest.raises(InputError) as e:
        Segmenter.open(path, provider="cpu")
    one_line(e, str(path), "sha256 differs", side.name)
    shutil.copyfile(seeds.export / "student.onnx", path)
    record = json.loads(side.read_text())
    record["contract"]["batch"] = None
    side.write_text(json.dumps(record))
    with pytest.raises(InputError) as e:
        Segmenter.open(path, provider="cpu")
    one_line(e, str(side), "field 'contract.batch' differs")
    side.unlink()  # without a sidecar, the record the graph carries
    assert Segmenter.open(path, provider="cpu").predict(FRAME).shape == SIZE


def test_a_graph_onnx_runtime_cannot_run_is_one_line(tmp_path):
    """A graph that loads but fails in a node at run time (a changed or foreign graph) names the file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.errors import InputError
    from pipeline.infer import Segmenter
    from tests.test_trt_build import exported

    dims = ("batch", 3, "height", "width")
    x, y = helper.make_tensor_value_info("image", TensorProto.FLOAT, dims), helper.make_tensor_value_info(
        "logits", TensorProto.FLOAT, None)
    node = helper.make_node("Reshape", ["image", "shape"], ["logits"])
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(np.int64([5, -1]), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key=artifacts.ONNX_KEY, value=exported("fp32", dims).onnx_props()[artifacts.ONNX_KEY])
    onnx.save(model, str(tmp_path / "odd.onnx"))
    seg = Segmenter.open(tmp_path / "odd.onnx", provider="cpu", size=(8, 8))
    with pytest.raises(InputError) as e:
        seg.predict(np.zeros((8, 8, 3), np.uint8))  # 192 values cannot be 5 rows
    one_line(e, "odd.onnx", "ONNX Runtime cannot run it on a 1x3x8x8 float32 input")


@pytest.mark.parametrize("text, message", [
    ("data:\n  root: data\n".encode("utf-16"), "not UTF-8 text"),
    (b"data:\n  root: " + b"[" * 3000 + b"]" * 3000, "nested too deeply"),
    (b"train:\n  accumulate: 1180591620717411303424\n", "train.accumulate=1180591620717411303424: expected an integer"),
    (b"train:\n  weight_decay: .nan\n", "train.weight_decay=nan: expected a finite number"),
    (b"train:\n  weight_decay: -1\n", "train.weight_decay=-1.0: expected a number >= 0"),
    (b"data:\n  dataset: {}\n", "data.dataset={}: expected a text value"),
    (b"student:\n  checkpoint: [1, 2]\n", "student.checkpoint=[1, 2]: expected a text value"),
    (b"data:\n  size: \"64x\\0\"\n", "data.size="),
    (b"train: 5\n", "train=5"),
    (b"[]\n", "expected a mapping of sections"),
], ids=["utf-16", "nesting", "int64", "nan", "negative", "mapping-as-text", "list-as-text", "nul", "section-scalar",
        "list"])
def test_config_files_the_fuzz_broke_are_one_line(tmp_path, text, message):
    """config 16, 17, 47, 48, 109, 122, 149, 170 ...: tracebacks, values that could not be used, a list or mapping
    taken as text, and `key: {}` silently ignored."""
    from pipeline.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    one_line(e, message)


@pytest.mark.parametrize("edit, field", [
    (lambda r: r["contract"].update(batch=None), "'contract.batch'"),
    (lambda r: r["details"]["inputs"][0]["shape"].pop(), "'details.inputs[0].shape'"),
    (lambda r: r["details"]["build"].pop("hardware_compat"), "'details.build.hardware_compat'"),
    (lambda r: r["details"]["build"].update(hardware_compat=["none"]), "'details.build.hardware_compat'"),
    (lambda r: r["details"]["gpu"].update(compute_capability={}), "'details.gpu'"),
    (lambda r: r["details"]["inputs"][0].update(shape={"a": 1}), "'details.inputs[0].shape'"),
], ids=["batch", "rank", "no-compat", "compat-list", "cc-mapping", "shape-mapping"])
def test_engine_records_the_runtime_cannot_use_are_one_line(tmp_path, edit, field):
    """engine-sidecar 14, 41, 70 ...: a record whose details or contract the runtime would misread (another batch,
    a missing profile or compatibility setting read as its default) or trip over (a TypeError)."""
    from pipeline.errors import InputError
    from trt.runtime import load_sidecar

    plan = tmp_path / "student.int8.plan"
    plan.write_bytes(b"plan")
    record = json.loads((ROOT / "tests/golden/plan-int8.json").read_text())
    edit(record)
    artifacts.sidecar_path(plan).write_text(json.dumps(record))
    with pytest.raises(InputError) as e:
        load_sidecar(plan)
    one_line(e, str(artifacts.sidecar_path(plan)), field)


if __name__ == "__main__":  # the ONNX byte group's child: python -m tests.test_fuzz onnx SEEDS WORK START OUT
    _, _, seed_dir, work, start, out = sys.argv
    onnx_child(Path(seed_dir), Path(work), int(start), Path(out))
