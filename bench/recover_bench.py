"""Prune the shared SmolLM2 (log schedule, C4 calibration), then recover it with LoRA on C4, and print WikiText-2
perplexity at 128 before and after (fixed number of test windows), time per training step and peak memory.

    python bench/recover_bench.py [--ratios 0.5,0.2] [--nsamples 32] [--calib-seqlen 256] [--steps 40] \
        [--lr 1e-4] [--batch-size 4] [--seqlen 256] [--windows 64] [--threads N] [--json out.json]

Rows are printed (and written to --json) as each ratio finishes. Peak memory: CUDA peak allocated during
training; on CPU the process's peak RSS so far (it includes pruning) and the RSS growth during recovery.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from slimgpt_core.data import calibration_tokens, evaluation_tokens  # noqa: E402
from slimgpt_core.evaluation.evaluate import perplexity  # noqa: E402
from slimgpt_core.base.devices import resolve_device  # noqa: E402
from slimgpt_core.models import load_model  # noqa: E402
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings  # noqa: E402
from slimgpt_core.training.recover import recover  # noqa: E402
from slimgpt_core.training.settings import RecoverSettings  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--ratios", default="0.5,0.2")
    ap.add_argument("--schedule", default="log")
    ap.add_argument("--nsamples", type=int, default=32, help="C4 calibration sequences for pruning")
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--data", default="c4", help="recovery data")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--windows", type=int, default=64, help="WikiText-2 test windows of 128 tokens")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense model's perplexity")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    loaded = load_model(args.model, "cpu", "float32")
    calib = calibration_tokens(loaded.tokenizer, "c4", args.nsamples, args.calib_seqlen)
    test = evaluation_tokens(loaded.tokenizer, "wikitext2")
    dense = None
    if not args.no_dense:
        dense = perplexity(loaded.model.to(device), test, 128, 16, args.windows, device, "wikitext2")
        print(f"dense: ppl {dense.ppl:.3f} over {dense.windows} windows of 128 ({dense.seconds:.1f} s)", flush=True)
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        model = load_model(args.model, "cpu", "float32").model
        t0 = time.perf_counter()
        report = prune_model(model, calib, PruneSettings(ratio=ratio, schedule=args.schedule, device=args.device))
        prune_s = time.perf_counter() - t0
        rss_before = _rss_mb()
        settings = RecoverSettings(data=[args.data], steps=args.steps, rank=args.rank, lr=args.lr,
                                   seqlen=args.seqlen, batch_size=args.batch_size, heldout_samples=args.heldout,
                                   eval_every=args.eval_every, device=args.device, ppl_source="wikitext2",
                                   ppl_seqlen=128, ppl_windows=args.windows)
        result = recover(model, loaded.tokenizer, settings,
                         callback=lambda e: e.kind == "train-step" and e.step % 5 == 0 and print(
                             f"  step {e.step}/{e.steps} loss {e.train_loss:.3f} {e.tokens_per_s:.0f} tok/s "
                             f"ETA {e.eta_s:.0f} s", flush=True))
        row = {
            "ratio": ratio, "schedule": args.schedule, "calib": f"c4 {args.nsamples}x{args.calib_seqlen}",
            "prune_seconds": round(prune_s, 1), "params_after": report.params_after,
            "achieved_layer_ratio": round(report.achieved_layer_ratio, 4), "recovery_data": args.data,
            "steps": args.steps, "batch": f"{args.batch_size}x{args.seqlen}", "rank": args.rank, "lr": args.lr,
            "train_examples": result.train_examples, "heldout_examples": result.heldout_examples,
            "tokens_seen": result.tokens_seen, "seconds_per_step": round(result.seconds_per_step, 2),
            "recover_seconds": round(result.seconds, 1),
            "peak_memory_mb": round(result.peak_memory_mb), "rss_growth_mb": round(_rss_mb() - rss_before),
            "heldout_loss_before": round(result.heldout[0]["loss"], 4),
            "heldout_loss_after": round(result.heldout[-1]["loss"], 4),
            "dense_ppl": round(dense.ppl, 3) if dense else None, "ppl_before": round(result.ppl_before["ppl"], 3),
            "ppl_after": round(result.ppl_after["ppl"], 3), "ppl_windows": result.ppl_after["windows"],
            "merge_max_abs_diff": result.merge_max_abs_diff, "device": str(device),
            "threads": torch.get_num_threads(),
            "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
