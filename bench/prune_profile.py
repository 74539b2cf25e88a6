"""Where pruning time goes, by operator: torch.profiler over SlimGPT on the first layers of a model.

    OMP_NUM_THREADS=1 python bench/prune_profile.py [--model default] [--layers 4] [--nsamples 32] [--seqlen 256]
        [--ratio 0.2] [--no-accumulation] [--top 25]

Prints each operator's self CPU time and share, then the matrix products' share against everything else (the
figure issue 13's account rests on). Shares, not seconds, are the usable numbers on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MATRIX_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}


def main() -> None:
    from slimgpt_core.data import calibration_tokens
    from slimgpt_core.methods.pipeline import prune_model
    from slimgpt_core.methods.prune_settings import PruneSettings
    from slimgpt_core.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--no-accumulation", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()

    loaded = load_model(args.model, "cpu", "float32")
    model = loaded.model
    model.model.layers = model.model.layers[: args.layers]  # the first layers stand for all: each is alike
    model.config.num_hidden_layers = args.layers
    tokens = calibration_tokens(loaded.tokenizer, "c4", args.nsamples, args.seqlen, 0)
    settings = PruneSettings(ratio=args.ratio, device="cpu", track_accumulation=not args.no_accumulation)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        report = prune_model(model, tokens, settings, model_name=args.model, use_cache=False)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    print(f"{args.model}, first {args.layers} layers, C4 {args.nsamples} x {args.seqlen}, ratio {args.ratio}, "
          f"accumulated error {'off' if args.no_accumulation else 'on'}, {torch.get_num_threads()} thread(s); "
          f"self CPU total {total / 1e6:.1f} s")
    print(f"{'operator':44s} {'self CPU s':>10s} {'share':>7s} {'calls':>7s}")
    for e in events[: args.top]:
        print(f"{e.key[:44]:44s} {e.self_cpu_time_total / 1e6:10.2f} {e.self_cpu_time_total / total:7.1%} {e.count:7d}")
    matrix = sum(e.self_cpu_time_total for e in events if e.key in MATRIX_OPS)
    print(json.dumps({"matrix_share": round(matrix / total, 3), "self_cpu_s": round(total / 1e6, 1),
                      "phase_seconds": {k: round(v, 2) for k, v in (report.phase_seconds or {}).items()}}))


if __name__ == "__main__":
    main()
