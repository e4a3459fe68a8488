"""Forward latency of our SegFormer against Hugging Face transformers' on the same weights, side by side.

    python benchmarks/model_speed.py --variant mit_b0 mit_b2 --size 512x1024 --threads 2 [--json FILE]

Both models get identical weights (ours imported from the transformers model through load_model), the same
input and the same thread count; timing rounds alternate between the two so that both see the same machine
state, and the ratio ours / transformers of the medians is reported (below 1.0: ours is faster).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.cli import Parser, cli_main
from pipeline.config import parse_size
from pipeline.errors import PipelineError
from pipeline.io import write_json
from pipeline.models import VARIANTS, load_model

# the variants transformers' SegFormer can twin (MiT encoder, all-MLP head)
SEGFORMERS = [name for name, row in VARIANTS.items() if row.backbone == "mit" and row.head_style == "mlp"]


def hf_twin(variant: str, num_classes: int, folder: Path):
    """A transformers SegFormer of the variant, and ours loaded from its save_pretrained folder."""
    try:
        from transformers import SegformerConfig, SegformerForSemanticSegmentation
    except ImportError:
        raise PipelineError('transformers is not installed: pip install -e ".[dev]"') from None
    row = VARIANTS[variant]
    cfg = SegformerConfig(hidden_sizes=list(row.dims), depths=list(row.depths), num_attention_heads=list(row.heads),
                          decoder_hidden_size=row.decoder_dim, num_labels=num_classes)
    hf = SegformerForSemanticSegmentation(cfg).eval()
    hf.save_pretrained(folder)
    return hf, load_model(folder)


def time_calls(fn, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def bench(variant: str, size: tuple[int, int], batch: int, rounds: int, iters: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = hf_twin(variant, 19, Path(tmp))
    x = torch.randn(batch, 3, *size)
    with torch.inference_mode():
        diff = (ours(x) - hf(pixel_values=x).logits).abs().max().item()
        runs = {"ours": lambda: ours(x), "transformers": lambda: hf(pixel_values=x).logits}
        for fn in runs.values():
            time_calls(fn, warmup)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(rounds):
            order = list(runs) if r % 2 == 0 else list(runs)[::-1]  # alternate who goes first
            for name in order:
                times[name] += time_calls(runs[name], iters)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "variant": variant, "size": f"{size[0]}x{size[1]}", "batch": batch, "max_abs_logit_diff": diff,
        **{f"{k}_ms_median": v for k, v in med.items()},
        **{f"{k}_ms_min": min(v) for k, v in times.items()},
        "samples_each": len(times["ours"]), "ratio_ours_over_transformers": med["ours"] / med["transformers"],
    }


def build_parser() -> Parser:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", nargs="+", default=["mit_b0", "mit_b2"], choices=SEGFORMERS)
    ap.add_argument("--size", default="512x1024")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=6, help="alternating timing rounds")
    ap.add_argument("--iters", type=int, default=3, help="forward passes per model per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", metavar="FILE")
    return ap


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    torch.set_num_threads(args.threads)
    rows = [bench(v, size, args.batch, args.rounds, args.iters, args.warmup) for v in args.variant]
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
           platform.machine(), "python": platform.python_version()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    print(f"forward latency, batch {args.batch}, {args.size}, {env['threads']} threads, torch {env['torch']}, "
          f"transformers {env.get('transformers')}")
    print("| model | ours ms (median) | transformers ms (median) | ours / transformers | max abs logit diff |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['ours_ms_median']:.1f} | {r['transformers_ms_median']:.1f} | "
              f"{r['ratio_ours_over_transformers']:.3f} | {r['max_abs_logit_diff']:.1e} |")
    if args.json:
        write_json(args.json, {"env": env, "rows": rows})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
