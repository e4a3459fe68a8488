"""One wrapper for every entry point: argparse errors, PipelineErrors and OSErrors as one line, exit codes 2 and 130."""

from __future__ import annotations

import argparse
import errno
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from pipeline.errors import PipelineError

EXIT_ERROR = 2  # bad input: a config key, a file, an artifact; the message names it
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT

_ELSEWHERE = "write elsewhere (another --run-dir or --out)"
# what to do about an OSError, by its code; the line itself names the path and the system's own words
OS_HINTS = {
    errno.ENOSPC: f"free space on that file system, or {_ELSEWHERE}",
    errno.EDQUOT: f"free space within your disk quota, or {_ELSEWHERE}",
    errno.EFBIG: f"the file outgrew what the file system or the file-size limit (ulimit -f) allows; raise the limit "
                 f"or {_ELSEWHERE}",
    errno.EROFS: f"the file system is mounted read-only; {_ELSEWHERE}",
    errno.EACCES: "allow this user to write there (or read, for an input), or choose another path",
    errno.EPERM: "allow this user to write there (or read, for an input), or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "a folder stands where a file is expected; choose another path",
    errno.ENOENT: "check the path: the file, or a folder above it, does not exist",
    errno.ENAMETOOLONG: "choose a shorter path",
}
# torch re-raises an exception from a DataLoader worker as one of the same type whose message is the worker's whole
# traceback (torch/utils/data/_utils/__init__.py ExceptionWrapper.reraise; the pin-memory thread does the same)
_WORKER = re.compile(r"Caught (\w+) in (?:DataLoader worker process \d+|pin memory thread[^\n]*)\.\nOriginal Traceback")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage first) and the shared `--debug` flag."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


def worker_original(message: str) -> str | None:
    """The original message of an exception torch re-raised from a DataLoader worker: the traceback's last entry
    without its `<module>.<Type>: ` prefix; None when `message` is not such a wrapper. torch keeps the type (a
    DataError stays a DataError), so the exception reaches this wrapper like any other: unwrapped here, once, it is
    one line for every loader (training, validation, eval, export calibration, bench) and every entry point."""
    m = _WORKER.match(message)
    if not m:
        return None
    lines = message.rstrip("\n").splitlines()
    for i in range(len(lines) - 1, 1, -1):
        entry = re.match(rf"(?:[\w.]+\.)?{m[1]}(?:: (.*))?$", lines[i])
        if entry and not lines[i].startswith(" "):
            return "\n".join([entry[1] or m[1], *lines[i + 1:]])
    return None


def one_line(e: BaseException) -> str:
    """What `error:` prints for a PipelineError or an OSError: its message (the original one for an exception from a
    DataLoader worker); for an OSError, `<path>: <what the system says>; <what to do>`."""
    text = str(e)
    original = worker_original(text)
    if original is not None:
        return original
    if isinstance(e, OSError) and e.errno is not None:
        where = "" if e.filename is None else f"{e.filename}: "
        if e.filename2 is not None:
            where = f"{e.filename} -> {e.filename2}: "
        hint = OS_HINTS.get(e.errno) or ("check the path and its file system" if e.filename is not None else "")
        return f"{where}{e.strerror}" + (f"; {hint}" if hint else "")
    return text


def cli_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int | None],
             argv: Sequence[str] | None = None, interrupted: str = "interrupted",
             intermixed: bool = False) -> int:
    """Parse `argv` and call `run(args)`. A PipelineError or an OSError (a full disk, a read-only or missing folder)
    becomes `error: <one_line>` on stderr and exit 2 (with `--debug`, the traceback instead); Ctrl-C prints
    `interrupted` and exits 130. Returns run's exit code (0 for None)."""
    args = parser.parse_intermixed_args(argv) if intermixed else parser.parse_args(argv)
    try:
        return run(args) or 0
    except (PipelineError, OSError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED


__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "OS_HINTS", "Parser", "cli_main", "one_line", "worker_original"]
