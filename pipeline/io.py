"""Small file helpers shared by every stage: hashing and atomic writes (temp file, then rename)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def progress_interval() -> float:
    """Seconds between progress-bar refreshes: live on a terminal, sparse when stderr goes to a file or CI log."""
    return 0.1 if sys.stderr.isatty() else 30.0


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block finishes without error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def _split(obj, prefix: str, tensors: dict):
    """Nested dicts/lists with tensors -> a JSON-able skeleton; tensors go into `tensors` under a path key."""
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_split(k, f"{prefix}/k{i}", tensors), _split(v, f"{prefix}/{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [_split(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    return obj


def _join(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_join(k, tensors): _join(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_state(stem: str | os.PathLike, state: dict) -> tuple[Path, Path]:
    """A training state (nested dicts of tensors and plain values, e.g. optimizer state) as `stem.safetensors`
    plus `stem.json`, each written atomically; no pickle anywhere."""
    from safetensors.torch import save_file

    stem = Path(stem)
    tensors: dict = {}
    skeleton = _split(state, "s", tensors)
    weights, sidecar = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    with atomic_path(weights) as tmp:
        save_file(tensors, tmp)
    write_json(sidecar, {"state": skeleton, "sha256": sha256_file(weights)})
    return weights, sidecar


def load_state(stem: str | os.PathLike) -> dict:
    from safetensors.torch import load_file

    stem = Path(stem)
    weights, sidecar = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    info = json.loads(sidecar.read_text())
    if info.get("sha256") != sha256_file(weights):
        raise ValueError(f"{weights}: sha256 differs from {sidecar.name}")
    return _join(info["state"], load_file(weights))
