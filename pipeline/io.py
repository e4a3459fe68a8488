"""Small file helpers shared by every stage: hashing, atomic writes (temp file, then rename) that name their file when
the system refuses them, and training-state files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import CheckpointError, PipelineError

# an OS error code inside a library's message: Rust's io::Error as safetensors reports it, old and new spelling
_OS_CODE = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


def progress_interval() -> float:
    """Seconds between progress-bar refreshes: live on a terminal, sparse when stderr goes to a file or CI log."""
    return 0.1 if sys.stderr.isatty() else 30.0


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_error(e: BaseException, path: str | os.PathLike, staged: str | os.PathLike | None = None) -> OSError | None:
    """The OSError behind an error raised while writing `path` through `staged` (its staging file, or a staging
    folder standing for the folder `path`), naming `path` (or the file under it that the staging file stands for):
    an OSError naming no file (a failed write or close) or a staged one, or a library error that carries just the OS
    error code in its message (safetensors: `I/O error: No space left on device (os error 28)`). None when `e` is
    no OS error, or one about another file."""
    if isinstance(e, OSError) and e.errno is not None:
        name = _final_name(e.filename, Path(path), staged)
        if name is None:
            return None
        code = e.errno
    else:
        m = None if isinstance(e, (OSError, PipelineError)) else _OS_CODE.search(str(e))
        if m is None:
            return None
        code, name = int(m[1] or m[2]), str(path)
    return OSError(code, os.strerror(code), name)


def _final_name(filename, path: Path, staged: str | os.PathLike | None) -> str | None:
    if filename is None or str(filename) in (str(path), str(staged)):
        return str(path)
    if staged is not None and Path(filename).is_relative_to(staged):
        return str(path / Path(filename).relative_to(staged))
    return None


@contextmanager
def writing(path: str | os.PathLike, staged: str | os.PathLike | None = None) -> Iterator[None]:
    """Within the block, an OS error met while writing `path` (through `staged`), as write_error finds it, is an
    OSError naming `path`: what the CLI prints as `error: <path>: <what the system says>; <what to do>`."""
    try:
        yield
    except Exception as e:
        err = write_error(e, path, staged)
        if err is None:
            raise
        raise err from e


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block finishes without error. An OS error
    on the way (a full disk, a read-only or missing folder) is an OSError naming `path`, the staging file removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with writing(path, tmp):
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
    try:
        write_json(sidecar, {"state": skeleton, "sha256": sha256_file(weights)})
    except BaseException:
        weights.unlink(missing_ok=True)  # a state is its two files: never one without the other
        raise
    return weights, sidecar


def reason(e: BaseException) -> str:
    """Why reading a file failed, in a few words for an error line."""
    if isinstance(e, FileNotFoundError):
        return "missing"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if isinstance(e, KeyError):
        return f"no entry {e}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_state(stem: str | os.PathLike) -> dict:
    """The training state `save_state` wrote; CheckpointError naming the file that is missing, unreadable, corrupt or
    not the one its sidecar's sha256 describes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    stem = Path(stem)
    weights, sidecar = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    try:
        info = json.loads(sidecar.read_text())
        skeleton, sha = info["state"], info["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"{sidecar}: not a readable training state ({reason(e)})") from None
    try:
        if sha != sha256_file(weights):
            raise CheckpointError(f"{weights}: sha256 differs from the one recorded in {sidecar.name} (changed or cut "
                                  "short after it was written)")
        return _join(skeleton, load_file(weights))
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{weights}: not a readable training state ({reason(e)})") from None
