"""Which ONNX Runtime is installed: exactly one distribution may provide the `onnxruntime` module."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata as md
import sys
from collections.abc import Sequence

# ONNX Runtime's packages on PyPI that each install the whole `onnxruntime` module (ONNX Runtime's install page). Two
# of them in one environment share one folder: the one installed last has overwritten the other's files, so the
# module's version, providers and libraries can come from either, and uninstalling one breaks the other.
ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                             "onnxruntime-qnn", "onnxruntime-rocm", "onnxruntime-migraphx", "onnxruntime-training")
INSTALL = "pip install -e '.[cpu]' (CPU), '.[cu12]' or '.[cu13]' (CUDA 12 or 13 GPUs, docs/gpu.md)"


def installed_onnxruntimes(path: Sequence[str] | None = None) -> dict[str, str]:
    """{distribution: version} of the ONNX Runtime distributions installed on `path` (default sys.path); a name found
    in two folders counts once, with the version import would see first. Looked up by name (importlib.metadata
    matches dist-info folders the way pip names them: case, '-', '_' and '.' aside), not by reading every package."""
    folders = list(sys.path if path is None else path)
    found: dict[str, str] = {}
    for name in ONNXRUNTIME_DISTRIBUTIONS:
        for dist in md.distributions(name=name, path=folders):
            found.setdefault(name, dist.version)
    return found


def onnxruntime_problem(path: Sequence[str] | None = None) -> str | None:
    """One line when the environment (`path`, default sys.path) has two ONNX Runtime distributions, or none and no
    `onnxruntime` module either (a source build without metadata passes); None when it has exactly one."""
    found = installed_onnxruntimes(path)
    if len(found) > 1:
        names = " and ".join(f"{name} {version}" for name, version in sorted(found.items()))
        return (f"{names} are installed and each installs the onnxruntime module, so the files of the one installed "
                f"last replaced the other's: pip uninstall -y {' '.join(sorted(found))}, then {INSTALL}")
    if found:
        return None
    # an `onnxruntime` folder without __init__.py (what uninstalling two of them can leave) imports as an empty
    # namespace package: not an ONNX Runtime
    spec = importlib.machinery.PathFinder.find_spec("onnxruntime", path)
    return f"ONNX Runtime is not installed: {INSTALL}" if spec is None or spec.origin is None else None
