"""Prune the shared SmolLM2 at 20% and 50% (log schedule, C4 calibration) and print time per phase, peak
memory, achieved ratio and dense vs pruned WikiText-2 perplexity at 128 on a fixed number of windows.

    python bench/prune_bench.py [--ratios 0.2,0.5] [--nsamples 128] [--seqlen 512] [--windows 256]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from slimgpt_core.data import calibration_tokens, evaluation_tokens  # noqa: E402
from slimgpt_core.evaluate import perplexity  # noqa: E402
from slimgpt_core.models import load_model, resolve_device  # noqa: E402
from slimgpt_core.pipeline import PruneSettings, prune_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--schedule", default="log")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=256, help="WikiText-2 test windows of 128 tokens")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    loaded = load_model(args.model, args.device)
    calib = calibration_tokens(loaded.tokenizer, "c4", args.nsamples, args.seqlen)
    test = evaluation_tokens(loaded.tokenizer, "wikitext2")
    model = loaded.model.to(device)
    dense = perplexity(model, test, 128, 16, args.windows, device, "wikitext2")
    print(f"dense: ppl {dense.ppl:.3f} over {dense.windows} windows ({dense.seconds:.1f} s)")
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        model = load_model(args.model, args.device).model
        t0 = time.perf_counter()
        report = prune_model(model, calib, PruneSettings(ratio=ratio, schedule=args.schedule, device=args.device))
        wall = time.perf_counter() - t0
        model.to(device)
        pruned = perplexity(model, test, 128, 16, args.windows, device, "wikitext2")
        row = {"ratio": ratio, "schedule": args.schedule, "calib": f"c4 {args.nsamples}x{args.seqlen}",
               "prune_seconds": round(wall, 1), "phases": {k: round(v, 1) for k, v in report.phase_seconds.items()},
               "peak_memory_mb": round(report.peak_memory_mb), "params_before": report.params_before,
               "params_after": report.params_after, "achieved_layer_ratio": round(report.achieved_layer_ratio, 4),
               "achieved_ratio": round(report.achieved_ratio, 4), "dense_ppl": round(dense.ppl, 3),
               "pruned_ppl": round(pruned.ppl, 3), "ppl_windows": pruned.windows}
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
