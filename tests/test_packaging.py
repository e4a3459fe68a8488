"""Packaging: one ONNX Runtime per environment, GPU requirement sets of one CUDA major whose pieces fit each other
(read from the files, then resolved against the package index), the ONNX Runtime check of pipeline/deps.py on real
distribution metadata, and the README's test command as CI runs it."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from pipeline import deps
from tests.conftest import ROOT

CORE = ("requirements.txt", "requirements-quant.txt")
EXTRAS = {"cpu": "requirements-cpu.txt", "cu12": "requirements-gpu-cu12.txt", "cu13": "requirements-gpu-cu13.txt",
          "dev": "requirements-dev.txt"}
GPU_SETS = {"cu12": 12, "cu13": 13}  # extra -> the CUDA major of everything in it
JETSON = "requirements-gpu-jetson.txt"  # JetPack 6: CUDA 12.6, Python 3.10, aarch64

# onnxruntime-gpu releases on PyPI: (the CUDA major their CUDA and TensorRT providers link, libcudart.so.N; the
# TensorRT their TensorRT provider was compiled against, the version it passes to createInferBuilder_INTERNAL).
# Read with readelf -d / objdump -d from onnxruntime/capi/libonnxruntime_providers_{cuda,tensorrt}.so of the
# manylinux x86_64 wheels (cp311, and cp310 up to 1.23.2), 2026-12-01. Every one links libnvinfer.so.10.
ORT_GPU_BUILDS = {
    "1.22.0": (12, "10.9.0"), "1.23.0": (12, "10.9.0"), "1.23.2": (12, "10.9.0"), "1.24.1": (12, "10.14.1"),
    "1.24.4": (12, "10.14.1"), "1.25.0": (12, "10.14.1"), "1.25.1": (12, "10.14.1"), "1.26.0": (12, "10.14.1"),
    "1.27.0": (13, "10.14.1"), "1.28.0": (13, "10.14.1"), "1.29.0": (13, "10.14.1"), "1.30.0": (13, "10.14.1"),
    "1.31.0": (13, "10.14.1"), "1.31.1": (13, "10.14.1"),
}
ORT_TENSORRT_MAJOR = 10
# the Pythons each GPU set is resolved for: cu13's onnxruntime-gpu (1.27 on) has no cp310 wheels
PYTHONS = {"cu12": ("3.10", "3.12"), "cu13": ("3.11", "3.12")}


def requirements(name: str) -> list[Requirement]:
    lines = (ROOT / name).read_text().splitlines()
    return [Requirement(line) for line in (x.split("#", 1)[0].strip() for x in lines) if line]


def by_name(reqs: list[Requirement]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in reqs}


def majors(spec: SpecifierSet) -> set[int]:
    """The major versions a specifier admits, probed at X.Y.0 and X.Y.99 for every minor Y below 100."""
    return {m for m in range(40) for minor in range(100) for patch in (0, 99) if spec.contains(f"{m}.{minor}.{patch}")}


# ------------------------------------------------------------------------------------ the requirement files
def test_onnxruntime_comes_from_one_extra_only():
    ort = set(deps.ONNXRUNTIME_DISTRIBUTIONS)
    for name in (*CORE, EXTRAS["dev"]):
        assert not set(by_name(requirements(name))) & ort, f"{name} names an ONNX Runtime"
    assert list(by_name(requirements(EXTRAS["cpu"]))) == ["onnxruntime"]
    for extra in GPU_SETS:
        assert set(by_name(requirements(EXTRAS[extra]))) & ort == {"onnxruntime-gpu"}, extra


def test_pyproject_extras_are_the_requirement_files():
    tomllib = pytest.importorskip("tomllib")
    dynamic = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
    assert dynamic["dependencies"]["file"] == list(CORE)
    assert {k: v["file"] for k, v in dynamic["optional-dependencies"].items()} == {k: [v] for k, v in EXTRAS.items()}


@pytest.mark.parametrize("extra", GPU_SETS)
def test_a_gpu_set_is_one_cuda_major_and_one_tensorrt_major(extra):
    cuda, reqs = GPU_SETS[extra], requirements(EXTRAS[extra])
    named = by_name(reqs)
    # the CUDA build by its name: the plain `tensorrt` package means tensorrt-cu13 from 10.13.3.9.post1 on
    assert [n for n in named if n.startswith("tensorrt")] == [f"tensorrt-cu{cuda}"]
    trt = named[f"tensorrt-cu{cuda}"].specifier
    assert majors(trt) == {ORT_TENSORRT_MAJOR}, f"{extra}: TensorRT {trt} is not the major ONNX Runtime links"
    assert majors(named["cuda-bindings"].specifier) == {cuda}
    admitted = list(named["onnxruntime-gpu"].specifier.filter(ORT_GPU_BUILDS))
    assert admitted and {ORT_GPU_BUILDS[v][0] for v in admitted} == {cuda}, f"{extra}: onnxruntime-gpu {admitted}"
    # TensorRT keeps minor releases backward compatible only: never older than what a provider was compiled against
    need = max(Version(ORT_GPU_BUILDS[v][1]) for v in admitted)
    lowest = min(v for v in (Version(f"10.{m}.{p}") for m in range(100) for p in range(10)) if trt.contains(v))
    assert lowest >= need, f"{extra}: TensorRT {trt} admits {lowest}, onnxruntime-gpu needs {need}"


def test_the_jetson_set_is_built_for_jetpack_6_cuda():
    (req,) = requirements(JETSON)
    (pin,) = req.specifier
    version = Version(pin.version)
    # cuda-python 12.6.x ships cuda.bindings itself; cuda-bindings starts at 12.8, newer than JetPack 6's CUDA 12.6
    assert canonicalize_name(req.name) == "cuda-python" and pin.operator == "=="
    assert version.major == 12 and version.minor <= 6, version


def test_each_image_installs_one_onnxruntime_of_its_cuda():
    gpu, jetson, cpu = ((ROOT / f).read_text() for f in ("Dockerfile", "Dockerfile.jetson", "Dockerfile.cpu"))
    assert "ARG TORCH_CUDA=cu130" in gpu and "requirements-gpu-cu13.txt > requirements.image.txt" in gpu
    assert "-r requirements-gpu-jetson.txt" in jetson and "from cuda.bindings import runtime" in jetson
    assert "-r requirements-cpu.txt" in cpu
    for text in (gpu, jetson, cpu):
        assert "onnxruntime_problem" in text  # each image refuses two ONNX Runtimes at build time
        assert "requirements-gpu.txt" not in text


def test_the_readme_test_command_is_what_ci_runs():
    block = (ROOT / "README.md").read_text().split("## Two commands", 1)[1].split("```bash\n", 1)[1].split("```")[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2 and commands[0].startswith('pip install -e ".[cpu]" && ')
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[ci.index("# --- the README's test command, verbatim ---") + 1] == commands[1]
    # the stubs are there for test_mypy_trt, and nothing but the README's command installs anything in CI
    assert '--no-deps "tensorrt-stubs' in commands[1]
    assert [line for line in ci if "pip install" in line] == [commands[1]]


def pulled(roots: list[Requirement]) -> dict[str, str]:
    """{distribution: what required it} for everything `roots` pull in, walked through the metadata of the installed
    distributions, markers evaluated for this interpreter and the extras asked for."""
    seen: dict[str, str] = {}
    todo = [(r, "the requirement files") for r in roots if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        req, parent = todo.pop()
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen[key] = parent
        try:
            requires = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            continue
        for sub in map(Requirement, requires):
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append((sub, name))
    return {key.split("[")[0]: parent for key, parent in seen.items()}


def test_nothing_the_core_and_dev_pull_is_an_onnxruntime():
    roots = [r for name in (*CORE, EXTRAS["dev"]) for r in requirements(name)]
    graph = pulled(roots)
    assert "nvidia-modelopt" in graph and "transformers" in graph  # the walk reached the installed packages
    assert {n: p for n, p in graph.items() if n in deps.ONNXRUNTIME_DISTRIBUTIONS} == {}


# -------------------------------------------------------------------------------- resolved on the package index
# A full `pip install --dry-run --report` of a GPU set cannot be made fast: the index serves no separate wheel
# metadata (PEP 658) for these projects, so pip downloads each wheel to read its dependencies (measured: 2.2 s and
# 256 MB for onnxruntime-gpu 1.31.1 alone; torch 2.13.0 530 MB; TensorRT's libraries more), and PyPI's
# tensorrt-cu12-libs / tensorrt-cu13-libs are placeholder sdists that fetch the real wheels from pypi.nvidia.com while
# building. So each top-level requirement is resolved the way pip picks it, the newest release the index offers for
# the target Python and platform inside the range (`pip index versions`, one page per project, under a second), and
# the picks are checked against each other and against the table of checked onnxruntime-gpu builds above.
X86_64 = [f"--platform={tag}_x86_64" for tag in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014")]
AARCH64 = [f"--platform={tag}_aarch64" for tag in ("manylinux_2_28", "manylinux_2_17", "manylinux2014")]


@cache
def offered(name: str, python: str, platform: tuple[str, ...] = ()) -> tuple[Version, ...]:
    """The releases of `name` the configured index offers for CPython `python`: wheels for `platform` only, or any
    file with no platform (tensorrt-cu* are sdists)."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", name, "--python-version", python,
           "--disable-pip-version-check", "--timeout", "20", "--retries", "1", *platform]
    cmd += ["--only-binary=:all:"] if platform else []
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    line = next((x for x in r.stdout.splitlines() if x.startswith("Available versions:")), None)
    if line is None:
        raise LookupError(f"{name} for Python {python}: {(r.stderr.strip().splitlines() or ['no output'])[-1]}")
    return tuple(Version(v.strip()) for v in line.split(":", 1)[1].split(","))


def newest(req: Requirement, python: str, platform: tuple[str, ...] = ()) -> Version | None:
    return max(req.specifier.filter(offered(canonicalize_name(req.name), python, platform)), default=None)


@pytest.fixture(scope="module")
def index():
    try:
        offered("cuda-bindings", "3.11", tuple(X86_64))
    except (LookupError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"package index not reachable: {e}")


@pytest.mark.parametrize("extra", GPU_SETS)
def test_a_gpu_set_resolves_to_one_cuda_major(extra, index):
    cuda, named = GPU_SETS[extra], by_name(requirements(EXTRAS[extra]))
    for python in PYTHONS[extra]:
        ort = newest(named["onnxruntime-gpu"], python, tuple(X86_64))
        trt = newest(named[f"tensorrt-cu{cuda}"], python)
        bindings = newest(named["cuda-bindings"], python, tuple(X86_64))
        assert ort and trt and bindings, f"{extra}, Python {python}: onnxruntime-gpu {ort}, TensorRT {trt}, " \
                                         f"cuda-bindings {bindings}"
        # every release the range admits there must be a checked build: a new one is named here until it is
        offered_ort = named["onnxruntime-gpu"].specifier.filter(offered("onnxruntime-gpu", python, tuple(X86_64)))
        unchecked = [str(v) for v in offered_ort if str(v) not in ORT_GPU_BUILDS]
        assert not unchecked, f"onnxruntime-gpu {unchecked} not checked: readelf -d / objdump -d its providers"
        ort_cuda, ort_trt = ORT_GPU_BUILDS[str(ort)]
        assert (ort_cuda, trt.major, bindings.major) == (cuda, ORT_TENSORRT_MAJOR, cuda), (python, ort, trt, bindings)
        assert trt >= Version(ort_trt), f"TensorRT {trt} is older than onnxruntime-gpu {ort}'s {ort_trt}"


def test_the_cu13_set_needs_python_3_11(index):
    assert newest(by_name(requirements(EXTRAS["cu13"]))["onnxruntime-gpu"], "3.10", tuple(X86_64)) is None


def test_the_jetson_pin_has_a_python_3_10_aarch64_wheel(index):
    (req,) = requirements(JETSON)
    assert newest(req, "3.10", tuple(AARCH64)) == Version(next(iter(req.specifier)).version)


# ------------------------------------------------------------------------------------------- pipeline/deps.py
def install(folder: Path, name: str, version: str) -> None:
    """A distribution as pip leaves it, as far as importlib.metadata reads it: <name>-<version>.dist-info/METADATA."""
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_two_onnxruntimes_are_refused_in_one_line(tmp_path):
    install(tmp_path, "onnxruntime", "1.32.0")
    install(tmp_path, "onnxruntime-gpu", "1.26.0")
    install(tmp_path, "onnx", "1.23.2")
    problem = deps.onnxruntime_problem([str(tmp_path)])
    assert problem and "\n" not in problem
    assert "onnxruntime 1.32.0 and onnxruntime-gpu 1.26.0 are installed" in problem
    assert "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install -e '.[cpu]'" in problem
    assert "'.[cu12]'" in problem and "'.[cu13]'" in problem


@pytest.mark.parametrize("name", ["onnxruntime", "onnxruntime-gpu", "onnxruntime_gpu", "ONNXRuntime-DirectML"])
def test_one_onnxruntime_passes(tmp_path, name):
    install(tmp_path, name, "1.26.0")
    install(tmp_path, "onnxruntime-extensions", "0.14.0")  # its own module, onnxruntime_extensions
    assert deps.onnxruntime_problem([str(tmp_path)]) is None
    assert list(deps.installed_onnxruntimes([str(tmp_path)])) == [canonicalize_name(name)]


def test_one_distribution_in_two_folders_counts_once(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    install(first, "onnxruntime-gpu", "1.26.0")
    install(second, "onnxruntime-gpu", "1.23.2")
    assert deps.installed_onnxruntimes([str(first), str(second)]) == {"onnxruntime-gpu": "1.26.0"}
    assert deps.onnxruntime_problem([str(first), str(second)]) is None


def test_no_onnxruntime_names_the_extras(tmp_path):
    install(tmp_path, "onnx", "1.23.2")
    problem = deps.onnxruntime_problem([str(tmp_path)])
    assert problem == ("ONNX Runtime is not installed: pip install -e '.[cpu]' (CPU), '.[cu12]' or '.[cu13]' "
                       "(CUDA 12 or 13 GPUs, docs/gpu.md)")


def test_a_source_build_without_metadata_passes_and_a_leftover_folder_does_not(tmp_path):
    (tmp_path / "onnxruntime" / "capi").mkdir(parents=True)  # what uninstalling two can leave: no __init__.py
    assert deps.onnxruntime_problem([str(tmp_path)]).startswith("ONNX Runtime is not installed")
    (tmp_path / "onnxruntime" / "__init__.py").write_text("")
    assert deps.onnxruntime_problem([str(tmp_path)]) is None


def test_this_environment_has_exactly_one_onnxruntime():
    assert deps.onnxruntime_problem() is None, deps.installed_onnxruntimes()
