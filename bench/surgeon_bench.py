"""Time and peak memory per shot of LLM Surgeon (SPEC §8) on the CPU, SmolLM2 by default:

    python bench/surgeon_bench.py [--model default] [--nsamples 16] [--seqlen 256] [--shots 2] [--ratio 0.2]
                                  [--units heads|rows] [--kfac-positions N] [--method surgeon|kobd]
                                  [--update dead-rows|both|columns]

Prints one line per shot (seconds, process peak RSS so far, removed fraction, held-out perplexity) and the
phase split of the first shot (forward+backward with factor accumulation vs. costs/updates)."""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from slimgpt_core.methods.curvature import factor_bytes  # noqa: E402
from slimgpt_core.data import calibration_tokens  # noqa: E402
from slimgpt_core.models import load_model  # noqa: E402
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings  # noqa: E402
from slimgpt_core.methods.settings import SurgeonSettings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--units", default="heads")
    ap.add_argument("--method", default="surgeon")
    ap.add_argument("--update", default="dead-rows", help="dead-rows | both | columns")
    ap.add_argument("--kfac-positions", type=int)
    args = ap.parse_args()

    loaded = load_model(args.model, "cpu")
    tokens = calibration_tokens(loaded.tokenizer, args.calib, args.nsamples, args.seqlen)
    print(f"model {loaded.name}: {len(loaded.model.model.layers)} layers, KFAC factors "
          f"{factor_bytes(loaded.model) / 2**30:.2f} GiB fp32; calibration {args.calib} {args.nsamples}x{args.seqlen} "
          f"(1/8 held out), batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
          f"positions {args.kfac_positions or 'all'}")
    marks = {}

    def on_event(event):
        if event.kind == "progress" and "prune" in event.phase and "prune" not in marks:
            marks["prune"] = event.elapsed_s
        if event.kind == "progress" and "held-out" in event.phase and "heldout" not in marks:
            marks["heldout"] = event.elapsed_s
        if event.kind == "shot":
            print(f"shot {event.shot}/{event.n_shots}: {event.seconds:7.1f} s  peak RSS {event.peak_memory_mb:7.0f} MB"
                  f"  removed {event.removed_fraction:.4f}  held-out ppl {event.heldout_ppl:.2f}", flush=True)
            if event.shot == 0:
                marks["start"] = time.perf_counter()

    settings = PruneSettings(ratio=args.ratio, method=args.method, batch_size=args.batch_size, device="cpu",
                             surgeon=SurgeonSettings(shots=args.shots, surgeon_units=args.units,
                                                     surgeon_update=args.update, kfac_positions=args.kfac_positions))
    t0 = time.perf_counter()
    report = prune_model(loaded.model, tokens, settings, callback=on_event)
    print(f"total {time.perf_counter() - t0:.1f} s; first shot: curvature (forward+backward, factors) "
          f"{marks['prune'] - (marks['start'] - t0):.1f} s, costs+selection+updates "
          f"{marks['heldout'] - marks['prune']:.1f} s; achieved layer ratio {report.achieved_layer_ratio:.4f}")


if __name__ == "__main__":
    main()
