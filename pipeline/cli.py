"""One wrapper for every entry point: argparse errors and PipelineErrors as one line, exit codes 2 and 130."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from pipeline.errors import PipelineError

EXIT_ERROR = 2  # bad input: a config key, a file, an artifact; the message names it
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage first) and the shared `--debug` flag."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


def cli_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int | None],
             argv: Sequence[str] | None = None, interrupted: str = "interrupted",
             intermixed: bool = False) -> int:
    """Parse `argv` and call `run(args)`. A PipelineError becomes `error: <message>` on stderr and exit 2 (with
    `--debug`, the traceback instead); Ctrl-C prints `interrupted` and exits 130. Returns run's exit code (0 for
    None)."""
    args = parser.parse_intermixed_args(argv) if intermixed else parser.parse_args(argv)
    try:
        return run(args) or 0
    except PipelineError as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED


__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "Parser", "cli_main"]
