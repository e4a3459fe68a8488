"""`python -m pipeline.run STAGE [STAGE ...] [--config FILE] [--run-dir DIR] [key=value ...]`: the pipeline's CLI."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
import time
from pathlib import Path

from pipeline import config as config_mod
from pipeline import preflight
from pipeline.cli import Parser, cli_main
from pipeline.config import Config
from pipeline.errors import ConfigError, InputError
from pipeline.io import atomic_path, write_json
from pipeline.stages import STAGES, outputs, stage_flags

log = logging.getLogger("pipeline")


class _TqdmHandler(logging.Handler):
    """Console log lines that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(run_dir: Path | None, main: bool, debug: bool) -> None:
    log.handlers.clear()
    log.setLevel(logging.DEBUG)
    log.propagate = False
    console = _TqdmHandler()
    console.setLevel(logging.DEBUG if debug else logging.INFO)
    console.setFormatter(logging.Formatter("[pipeline] %(message)s"))
    if main:
        log.addHandler(console)
    if run_dir is not None and main:
        file = logging.FileHandler(run_dir / "run.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file)
    data_log = logging.getLogger("pipeline.data")
    data_log.handlers, data_log.propagate = [], True


def build_parser() -> argparse.ArgumentParser:
    lines = [f"  {k:<28} {json.dumps(v, default=list)}" for k, v in config_mod.keys().items()]
    epilog = ("stages:\n" + "\n".join(f"  {k:<11} {s.help}" for k, s in STAGES.items())
              + "\n\nkeys (key=value, defaults shown):\n" + "\n".join(lines)
              + "\n\nexample: python -m pipeline.run distill data.size=128x256 train.steps=200 "
              "distill.method=transkd-ea")
    ap = Parser(prog="python -m pipeline.run", description="Distil, export and benchmark a SegFormer student with "
                "TransKD.", epilog=epilog)
    ap.add_argument("items", nargs="*", metavar="STAGE|key=value", help="stages to run, left to right, and overrides")
    ap.add_argument("--config", help="YAML file with sections data, teacher, student, train, distill")
    ap.add_argument("--run-dir", help="run directory (default: runs/<date>-<time>); an existing one is resumed")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag, stages in stage_flags().values():
        title = ", ".join(stages)
        group = groups.get(title) or groups.setdefault(title, ap.add_argument_group(f"{title} (stage flags)"))
        # no default here: a flag absent from the command line stays absent, so one no stage asked for is told
        # apart from a default value (_stage_flags fills the defaults in)
        group.add_argument(flag.name, help=flag.help, default=argparse.SUPPRESS, **flag.options)
    return ap


def _write_config(run_dir: Path, cfg: Config) -> None:
    """config.yaml, the resolved config, written before anything else happens (preflight.check has refused a
    training run whose directory was made with other values of keys that change results). Another config in an
    existing run directory (workers, logging, an eval-only call) is archived as config.<time>.yaml."""
    path = run_dir / "config.yaml"
    text = config_mod.dump(cfg)
    try:
        if path.is_file():
            if path.read_text() == text:
                return
            os.replace(path, run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    except OSError as e:
        raise ConfigError(f"{run_dir}: cannot write the run directory ({e.strerror or e})") from None


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), _run, argv, interrupted="interrupted; `resume=auto` continues from the last "
                    "checkpoint", intermixed=True)


def _stage_flags(args: argparse.Namespace, stages: list[str]) -> None:
    """Refuse a flag that none of `stages` takes and a --checkpoint that does not exist, before any work; then give
    every flag not on the command line its default."""
    for flag, owners in stage_flags().values():
        if not hasattr(args, flag.dest):
            setattr(args, flag.dest, flag.default)
            continue
        if not set(owners) & set(stages):
            which = f"{owners[0]}, which is" if len(owners) == 1 else \
                f"{', '.join(owners[:-1])} and {owners[-1]}, which are"
            raise ConfigError(f"{flag.name} belongs to {which} not among the stages asked ({', '.join(stages)})")
        value = getattr(args, flag.dest)
        if flag.must_exist and value and not Path(value).exists():
            raise InputError(f"{value}: no such file or directory ({flag.name})")


def _run(args: argparse.Namespace) -> int:
    stages = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if not stages:
        raise ConfigError(f"no stage given; expected one or more of {', '.join(STAGES)} (see --help)")
    for s in stages:
        if s not in STAGES:
            close = difflib.get_close_matches(s, STAGES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            if Path(s).exists():  # `--source drive/*.jpg` unquoted: the shell expanded the glob into more items
                hint = " (an existing file: quote a --source glob so that the shell does not expand it)"
            raise ConfigError(f"unknown stage {s!r}; expected one of {', '.join(STAGES)}{hint}")
    _stage_flags(args, stages)
    cfg = config_mod.load(args.config, overrides)
    run_dir = Path(args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    preflight.check(cfg, stages, args, run_dir)  # every stage's config, files and outputs, before any work

    from pipeline.train import init_distributed

    env = init_distributed(cfg.train.device)
    if env.main:
        _write_config(run_dir, cfg)
    env.barrier()
    setup_logging(run_dir, env.main, args.debug)
    log.info("run directory %s (config.yaml written), device %s, %d process(es)", run_dir, env.device, env.world)
    results = {}
    for s in stages:
        results[s] = STAGES[s].run(cfg, run_dir, env, args)
    if env.main:
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        summary.update(results)
        write_json(summary_path, summary)
        print(outputs(run_dir, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Config", "STAGES", "main"]
