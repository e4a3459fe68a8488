"""Triton model repository and DeepStream configuration (pipeline/triton.py, deepstream.py, triton_serve.py):
configs parsed with Triton's own protobuf schema and checked against the graphs as ONNX Runtime reads them, refusals
before any work, no half-written repository, nvinfer files, and a real tritonserver (PyTriton's, in a venv of its
own) serving the repository to a Segmenter."""

import configparser
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import suppress
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] (requirements.txt) is not installed")
import tritonclient.grpc as grpcclient  # noqa: E402

from pipeline import deepstream, triton, triton_serve  # noqa: E402
from pipeline.artifacts import Metadata, read_sidecar, sidecar_path, write_sidecar  # noqa: E402
from pipeline.errors import ConfigError, InputError  # noqa: E402
from pipeline.infer import Segmenter  # noqa: E402
from tests.conftest import ROOT, export_tiny, free_port, run_cli, splits  # noqa: E402

SIZE = (64, 128)  # network
FRAME = (96, 192)  # camera
MODEL = "student_onnx"
# three export specs, three runs: a static batch-1 float/logits graph, a dynamic float graph that returns class ids,
# and a dynamic graph that takes camera bytes; the labels one batches with a long queue delay, so concurrent requests
# are merged
SPECS = {"static": {}, "labels": {"dynamic": True, "output": "labels"}, "uint8": {"dynamic": True, "input": "uint8"}}
SETTINGS = {"static": {}, "uint8": {"max_batch_size": 8},
            "labels": {"max_batch_size": 4, "max_queue_delay_us": 200_000, "preferred_batch_sizes": [2, 4]}}
ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(uint8)": "TYPE_UINT8", "tensor(int32)": "TYPE_INT32"}
VENV = Path(os.environ.get("TRANSKD_PYTRITON_VENV", Path.home() / ".cache" / "transkd-deploy" / "pytriton-venv"))
# PyTriton bundles tritonserver with only the Python backend; it pins numpy < 2 and its own protobuf, so it lives in a
# venv of its own (no torch: the server side of pipeline/triton_serve.py imports numpy, onnxruntime and pytriton)
SERVER_PACKAGES = ("nvidia-pytriton==0.7.0", "onnxruntime>=1.17")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic):
    train, val = splits(synthetic(4, 4, FRAME))
    made = {}
    for spec, kw in SPECS.items():
        d = tmp_path_factory.mktemp(f"run-{spec}")
        export_tiny(d, val, train, SIZE, **kw)
        made[spec] = d
    return {"dirs": made, "frames": [np.ascontiguousarray(val.read(i)[0][:, :, ::-1]) for i in range(3)]}


@pytest.fixture(scope="module")
def repos(runs, tmp_path_factory):
    base = tmp_path_factory.mktemp("repos")
    return {spec: (base / spec, triton.write_repository(runs["dirs"][spec], base / spec, **SETTINGS[spec]))
            for spec in SPECS}


def config_of(repo: Path, name: str = MODEL):
    return triton.validate_config((repo / "triton" / name / "config.pbtxt").read_text())


def io_of(config) -> list:
    return [(t.name, t.data_type, list(t.dims)) for t in (*config.input, *config.output)]


# ------------------------------------------------------------------------------------------------ the repository
def test_repository_layout(runs, repos):
    run, (repo, summary) = runs["dirs"]["static"], repos["static"]
    on_disk = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert summary["files"] == on_disk == json.loads((repo / "repository.json").read_text())["files"]
    assert set(summary["models"]) == {MODEL}
    folder = repo / "triton" / MODEL
    assert (folder / "1" / "model.onnx").read_bytes() == (run / "student.onnx").read_bytes()
    # the record beside the copy is the run's sidecar and describes the copy: a client rebuilds the Segmenter from it
    assert read_sidecar(folder / "1" / "model.onnx", verify=True) == read_sidecar(run / "student.onnx")
    classes = read_sidecar(run / "student.onnx").classes
    assert (folder / "labels.txt").read_text().splitlines() == classes
    assert not [p for p in repo.parent.iterdir() if "staging" in p.name]


@pytest.mark.parametrize("spec", SPECS)
def test_config_matches_the_graph(runs, repos, spec):
    """Every field of config.pbtxt from what ONNX Runtime reads in the graph, and the settings asked for."""
    config, s = config_of(repos[spec][0]), {**dataclasses.asdict(triton.Settings()), **SETTINGS[spec]}
    session = ort.InferenceSession(str(runs["dirs"][spec] / "student.onnx"), providers=["CPUExecutionProvider"])
    static = spec == "static"
    want = [(t.name, triton.schema().DataType.Value(ORT_TYPES[t.type]),
             [d if isinstance(d, int) else -1 for d in (t.shape if static else t.shape[1:])])
            for t in (*session.get_inputs(), *session.get_outputs())]
    assert io_of(config) == want
    assert (config.platform, config.max_batch_size) == ("onnxruntime_onnx", 0 if static else s["max_batch_size"])
    assert config.HasField("dynamic_batching") is not static
    if not static:
        assert list(config.dynamic_batching.preferred_batch_size) == (s["preferred_batch_sizes"] or [])
        assert config.dynamic_batching.max_queue_delay_microseconds == s["max_queue_delay_us"]
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, triton.schema().ModelInstanceGroup.KIND_GPU)]
    assert config.output[0].label_filename == "labels.txt"


def test_validate_config_refuses_what_triton_refuses(repos):
    good = (repos["labels"][0] / "triton" / MODEL / "config.pbtxt").read_text()
    assert triton.validate_config(good).name == MODEL
    broken = {'no field named "max_batch"': good.replace("max_batch_size: 4", "max_batch: 4"),
              "TYPE_FLOAT32": good.replace("TYPE_FP32", "TYPE_FLOAT32"),
              "dynamic_batching needs": good.replace("max_batch_size: 4", "max_batch_size: 0"),
              "preferred_batch_size [2, 4]": good.replace("max_batch_size: 4", "max_batch_size: 3"),
              "KIND_CPU": good.replace("onnxruntime_onnx", "tensorrt_plan").replace("KIND_GPU", "KIND_CPU"),
              "dims of -1": good.replace("dims: [ 3, -1, -1 ]", "dims: [ 3, 0, -1 ]")}
    for expected, text in broken.items():
        with pytest.raises(InputError, match=expected.replace("[", r"\[")):
            triton.validate_config(text, "x/config.pbtxt")


def test_refusals_before_any_work(runs, repos, tmp_path):
    run = runs["dirs"]["static"]
    bad = {"triton.max_batch_size=0": {"max_batch_size": 0}, "triton.instances=0": {"instances": 0},
           "triton.instance_kind='tpu'": {"instance_kind": "tpu"},
           "triton.max_queue_delay_us=-1": {"max_queue_delay_us": -1},
           r"triton.preferred_batch_sizes=\[16\]": {"preferred_batch_sizes": [16]}}
    for expected, kw in bad.items():
        with pytest.raises(ConfigError, match=expected):
            triton.write_repository(run, tmp_path / "out", **kw)
    with pytest.raises(InputError, match="exists"):
        triton.write_repository(run, repos["static"][0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no student"):
        triton.write_repository(tmp_path / "empty", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_no_half_written_repository(runs, tmp_path):
    """The second model's file changed after its record was written: the first model was already staged, and
    nothing of it remains."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("student.fp16.onnx", "student.onnx"):
        shutil.copyfile(runs["dirs"]["static"] / "student.onnx", run / name)
        shutil.copyfile(sidecar_path(runs["dirs"]["static"] / "student.onnx"), sidecar_path(run / name))
    with open(run / "student.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(InputError, match="sha256 differs"):
        triton.write_repository(run, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def fake_plan(run: Path, profile_max: int) -> Path:
    """A TensorRT plan's record as trt.build writes it (the golden record, made dynamic with a batch profile) beside
    bytes that stand for the engine: the repository reads only the record (no TensorRT here)."""
    data = json.loads((ROOT / "tests" / "golden" / "plan-int8.json").read_text())
    data.update(kind="plan-fp16", precision="fp16")
    data["contract"].update(batch=None, dynamic=True)
    data["details"]["inputs"][0].update(shape=["batch", 3, "height", "width"], profile={
        "min": [1, 3, 64, 128], "opt": [2, 3, 128, 256], "max": [profile_max, 3, 256, 512]})
    data["details"]["outputs"][0].update(shape=["batch", 19, "height/4", "width/4"])
    plan = run / "student.fp16.plan"
    plan.write_bytes(b"engine bytes stand-in")
    write_sidecar(plan, Metadata.from_dict(data, "test"))
    return plan


def test_plan_model(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    fake_plan(run, profile_max=4)
    with pytest.raises(ConfigError, match="instance_kind=cpu: student.fp16.plan is a TensorRT plan"):
        triton.write_repository(run, tmp_path / "out", instance_kind="cpu")
    with pytest.raises(ConfigError, match="set triton.max_batch_size=4"):
        triton.write_repository(run, tmp_path / "out", max_batch_size=8)
    summary = triton.write_repository(run, tmp_path / "out", max_batch_size=4)
    config = config_of(tmp_path / "out", "student_fp16_plan")
    assert (config.platform, config.max_batch_size) == ("tensorrt_plan", 4)
    fp32 = triton.schema().TYPE_FP32
    assert io_of(config) == [("image", fp32, [3, -1, -1]), ("logits", fp32, [19, -1, -1])]
    assert summary["models"]["student_fp16_plan"]["deepstream"] == "deepstream/student_fp16_plan_nvinfer.txt"
    ds = nvinfer(tmp_path / "out" / "deepstream" / "student_fp16_plan_nvinfer.txt")
    assert ds["model-engine-file"].samefile(tmp_path / "out" / "triton" / "student_fp16_plan" / "1" / "model.plan")
    assert (ds["network-mode"], ds["batch-size"], ds["infer-dims"]) == ("2", "4", "3;128;256")


# ------------------------------------------------------------------------------------------------ DeepStream
def nvinfer(path: Path) -> dict:
    """The [property] group of an nvinfer file (GKeyFile syntax, which configparser reads with '#' comments), paths
    resolved against the file's folder as nvinfer resolves them."""
    parser = configparser.ConfigParser(comment_prefixes=("#",), interpolation=None)
    parser.read_string(path.read_text())
    assert parser.sections() == ["property"]
    group = dict(parser["property"])
    for key in ("onnx-file", "model-engine-file", "labelfile-path"):
        if key in group:
            group[key] = path.parent / group[key]
    return group


def test_deepstream_logits(runs, repos):
    """nvinfer's preprocessing y = net-scale-factor * (x - offsets[c]), emulated on the frames with the file's numbers,
    gives the Segmenter's network input within the documented one-scale-factor approximation."""
    repo, meta = repos["static"][0], read_sidecar(runs["dirs"]["static"] / "student.onnx")
    ds = nvinfer(repo / "deepstream" / f"{MODEL}_nvinfer.txt")
    assert ds["onnx-file"].samefile(repo / "triton" / MODEL / "1" / "model.onnx")
    assert ds["labelfile-path"].read_text().splitlines() == meta.classes
    assert {k: ds[k] for k in ("network-type", "output-blob-names", "num-detected-classes", "network-mode",
                               "batch-size", "infer-dims", "model-color-format")} == {
        "network-type": "2", "output-blob-names": "logits", "num-detected-classes": "19", "network-mode": "0",
        "batch-size": "1", "infer-dims": f"3;{SIZE[0]};{SIZE[1]}", "model-color-format": "0"}
    assert ds["model-engine-file"].name == "model.onnx_b1_gpu0_fp32.engine"
    c, h, w = map(int, ds["infer-dims"].split(";"))
    offsets, scale = np.array(ds["offsets"].split(";"), np.float32), float(ds["net-scale-factor"])
    seg = Segmenter.open(runs["dirs"]["static"] / "student.onnx", provider="cpu", threads=1)
    for frame in runs["frames"]:
        rgb = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)[:, :, ::-1].astype(np.float32)
        y = (scale * (rgb - offsets)).transpose(2, 0, 1)
        ref = seg.preprocess(frame)[0][0]
        worst = max(abs(s * scale - 1) for s in meta.normalization.std)
        assert worst < 0.014
        assert np.all(np.abs(y - ref) <= worst * np.abs(ref) + 1e-3)


def test_deepstream_labels_and_uint8(repos):
    ds = nvinfer(repos["labels"][0] / "deepstream" / f"{MODEL}_nvinfer.txt")
    assert (ds["network-type"], ds["output-tensor-meta"], ds["output-blob-names"]) == ("100", "1", "labels")
    assert "segmentation-threshold" not in ds and ds["batch-size"] == "4"
    repo, summary = repos["uint8"]
    assert summary["models"][MODEL]["deepstream"].startswith("skipped: nvinfer feeds the network float")
    assert not (repo / "deepstream").exists()
    meta = read_sidecar(repo / "triton" / MODEL / "1" / "model.onnx")
    with pytest.raises(InputError, match="export.input=float"):
        model = repo / "triton" / MODEL / "1" / "model.onnx"
        deepstream.deepstream_config(model, meta, repo / "labels.txt", triton.graph_tensors(model, meta))
    float_meta = read_sidecar(repos["static"][0] / "triton" / MODEL / "1" / "model.onnx")
    assert deepstream.deepstream_problem(float_meta) is None
    int8 = dataclasses.replace(float_meta, kind="onnx-int8", precision="int8")
    assert "int8-calib-file" in deepstream.deepstream_problem(int8)
    assert deepstream.deepstream_problem(dataclasses.replace(int8, kind="plan-int8")) is None


# ------------------------------------------------------------------------------------------------ a real server
@pytest.fixture(scope="session")
def server_python() -> Path:
    """The PyTriton venv's interpreter, made once (a temporary folder renamed into place) and reused."""
    python = VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import pytriton, onnxruntime"]).returncode == 0:
        return python
    tmp = VENV.with_name(f"{VENV.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", tmp], check=True, capture_output=True, text=True, timeout=300)
        subprocess.run([tmp / "bin" / "python", "-m", "pip", "install", "-q", *SERVER_PACKAGES], check=True,
                       capture_output=True, text=True, timeout=1200)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (getattr(e, "stderr", "") or "").strip().splitlines()[-1:]
        pytest.skip(f"cannot build the PyTriton venv ({' '.join(SERVER_PACKAGES)}): {tail or e}")
    shutil.rmtree(VENV, ignore_errors=True)
    tmp.rename(VENV)
    return python


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGINT to each server (PyTriton then stops its tritonserver and backend stubs), a wait, and each process group
    killed: what a server that did not stop in time, or died, left behind."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def servers(server_python, repos, tmp_path_factory):
    """One tritonserver per repository, started together; {spec: (gRPC url, metrics url)}."""
    logs, procs, urls = tmp_path_factory.mktemp("server-logs"), {}, {}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        for spec in SPECS:
            http, grpc, metrics = free_port(), free_port(), free_port()
            with open(logs / f"{spec}.log", "w") as log:
                procs[spec] = subprocess.Popen(
                    [server_python, "-m", "pipeline.triton_serve", "serve", repos[spec][0], "--model", MODEL,
                     "--threads", "1", "--http-port", str(http), "--grpc-port", str(grpc),
                     "--metrics-port", str(metrics)],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            urls[spec] = (f"localhost:{grpc}", f"http://localhost:{metrics}/metrics")
        for spec, proc in procs.items():
            wait_ready(proc, urls[spec][0], logs / f"{spec}.log")
        yield urls
    finally:
        stop(list(procs.values()))


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 120) -> None:
    client, deadline = grpcclient.InferenceServerClient(url), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"tritonserver exited ({proc.returncode}):\n" + "\n".join(log.read_text().splitlines()[-15:]))
        try:
            if client.is_model_ready(MODEL):
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.5)
    pytest.fail(f"tritonserver not ready after {timeout} s:\n" + "\n".join(log.read_text().splitlines()[-15:]))


def test_served_config_is_ours(servers, repos):
    """The model PyTriton serves was bound from our config.pbtxt: the same tensors, batch limit and batcher."""
    for spec, (url, _) in servers.items():
        served, ours = grpcclient.InferenceServerClient(url).get_model_config(MODEL).config, config_of(repos[spec][0])
        assert io_of(served) == io_of(ours)
        assert served.max_batch_size == ours.max_batch_size
        assert served.dynamic_batching.max_queue_delay_microseconds == \
            ours.dynamic_batching.max_queue_delay_microseconds
        # Triton fills an empty preferred_batch_size with max_batch_size when it loads a model (NormalizeModelConfig)
        preferred = list(ours.dynamic_batching.preferred_batch_size) or [ours.max_batch_size][:ours.max_batch_size]
        assert list(served.dynamic_batching.preferred_batch_size) == preferred


@pytest.mark.parametrize("spec", SPECS)
def test_segmenter_over_triton(servers, repos, runs, spec):
    """Three camera frames through Triton give exactly the ids Segmenter.open gives on the run's ONNX file."""
    seg = triton_serve.open_segmenter(servers[spec][0], MODEL, repos[spec][0])
    assert seg.describe()["backend"] == "triton"
    local = Segmenter.open(runs["dirs"][spec] / "student.onnx", provider="cpu", threads=1)
    got, want = seg.predict(runs["frames"]), local.predict(runs["frames"])
    assert got.shape == (3, *FRAME) and np.array_equal(got, want)
    assert len(np.unique(want)) > 2  # a spread of classes, so equal ids mean something


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f'{name}{{model="{MODEL}"'))


def test_dynamic_batcher_merges_concurrent_requests(servers, repos, runs):
    """Six single-frame requests at once: Triton's batcher forms fewer executions than requests (the emulated backend
    runs a formed batch as one ONNX Runtime call), and every caller still gets its own frame's ids."""
    url, metrics = servers["labels"]
    frames = runs["frames"] * 2
    want = Segmenter.open(runs["dirs"]["labels"] / "student.onnx", provider="cpu", threads=1).predict(frames)
    segs = [triton_serve.open_segmenter(url, MODEL, repos["labels"][0]) for _ in frames]
    before = metric(metrics, "nv_inference_exec_count"), metric(metrics, "nv_inference_count")
    got: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: got.update({i: segs[i].predict(frames[i])})) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(got[i], want[i]) for i in range(6))
    executions, inferences = (metric(metrics, n) - b for n, b in zip(("nv_inference_exec_count",
                                                                       "nv_inference_count"), before))
    assert inferences == 6 and executions < 6


def test_refused_requests(servers, repos):
    seg = triton_serve.open_segmenter(servers["static"][0], MODEL, repos["static"][0])
    with pytest.raises(InputError, match=r"unexpected shape for input 'image'.*\[1,3,32,32\]"):
        seg.backend.infer(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(InputError, match="record's contract"):  # the float graph's record against the uint8 model
        triton_serve.open_segmenter(servers["uint8"][0], MODEL, repos["labels"][0])
    with pytest.raises(InputError, match="no model 'nope'"):
        triton_serve.open_segmenter(servers["static"][0], "nope", repos["static"][0])


def test_server_side_needs_no_torch(server_python, repos):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys, pipeline.triton_serve; assert 'torch' not in sys.modules; import torch"
    p = subprocess.run([server_python, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "No module named 'torch'" in p.stderr
    p = subprocess.run([server_python, "-m", "pipeline.triton_serve", "serve", repos["static"][0], "--model", "nope"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"error: {repos['static'][0]}: no model 'nope' (<repository>/[triton/]nope/config.pbtxt)"]


def test_export_triton_stage_writes_and_rewrites_the_run_deploy_folder(runs, tmp_path):
    """`python -m pipeline.run export-triton`: <run dir>/deploy from the run's artifacts with the triton.* keys; run
    again it replaces its own repository whole; a run without artifacts is one line and leaves nothing."""
    run = tmp_path / "run"
    shutil.copytree(runs["dirs"]["labels"], run)
    code, out, err = run_cli("export-triton", "--run-dir", str(run), "triton.max_batch_size=4")
    assert code == 0, err
    config = triton.validate_config((run / "deploy" / "triton" / MODEL / "config.pbtxt").read_text())
    assert config.max_batch_size == 4 and "deploy/triton/" in out
    first = (run / "deploy" / "repository.json").stat().st_mtime_ns
    code, _, err = run_cli("export-triton", "--run-dir", str(run), "triton.max_batch_size=2")
    assert code == 0, err
    config = triton.validate_config((run / "deploy" / "triton" / MODEL / "config.pbtxt").read_text())
    assert config.max_batch_size == 2 and (run / "deploy" / "repository.json").stat().st_mtime_ns != first
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".deploy")) == []  # nothing set aside is left

    empty = tmp_path / "empty"
    code, _, err = run_cli("export-triton", "--run-dir", str(empty), "triton.instances=0")
    assert code == 2 and err == "error: triton.instances=0: expected a number >= 1\n"
    code, _, err = run_cli("export-triton", "--run-dir", str(empty))
    assert code == 2 and err.startswith(f"error: {empty}: no student*.onnx") and err.count("\n") == 1
    assert not empty.exists()


def test_export_with_triton_refuses_a_deploy_folder_it_did_not_write_before_any_work(tmp_path):
    from pipeline.config import load
    from pipeline.preflight import check_triton

    cfg = load(None, ["export.triton=true"])
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"deploy: exists and is not a repository export-triton wrote"):
        check_triton(cfg, tmp_path, exported_here=True)
    (tmp_path / "deploy" / "notes.txt").unlink()
    (tmp_path / "deploy" / "repository.json").write_text("{}")
    check_triton(cfg, tmp_path, exported_here=True)  # its own earlier repository: replaced after the export
