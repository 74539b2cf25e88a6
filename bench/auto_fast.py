"""How long `auto` takes to its first schedule and to its fast schedule, with the dense statistics and error curves
cached (what the studio's what-if has already made) and no variant on disk yet (a first `auto` on this calibration),
phase by phase. Prints one line per phase and a summary; the variants this run writes are removed afterwards.

    OMP_NUM_THREADS=2 python bench/auto_fast.py --model default --ratio 0.5
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimgpt_core.base import cache  # noqa: E402
from slimgpt_core.data import calibration_tokens  # noqa: E402
from slimgpt_core.methods.statistics import dense_hessians  # noqa: E402
from slimgpt_core.models import load_model  # noqa: E402
from slimgpt_core.schedules import global_allocation as ga, refine  # noqa: E402
from slimgpt_core.schedules.curves import error_curves  # noqa: E402
from slimgpt_core.schedules.schedule import AUTO_FITNESS_SAMPLES  # noqa: E402


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--calib", default="c4")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--fast-seconds", type=float, default=30.0)
    args = p.parse_args(argv)
    loaded = load_model(args.model, "cpu")
    tokens = calibration_tokens(loaded.tokenizer, args.calib, args.nsamples, args.seqlen, 0)
    fitness = calibration_tokens(loaded.tokenizer, args.calib, AUTO_FITNESS_SAMPLES, 128, 1)
    config = refine.AutoConfig(budget=ga.BudgetSpec(ratio=args.ratio), refine=False, fast_seconds=args.fast_seconds,
                               device="cpu")
    error_curves(loaded.model, tokens, config.damp, config.batch_size, "cpu")  # cached once, as the what-if does
    for _ in dense_hessians(loaded.model, tokens, config.batch_size, "cpu"):
        pass
    # variants as on a first run: a key no earlier run wrote
    refine.VARIANTS_VERSION = f"{refine.VARIANTS_VERSION}-bench-{time.time_ns()}"
    print(f"threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), "
          f"{args.model}, {args.calib} {args.nsamples} × {args.seqlen}, fitness {AUTO_FITNESS_SAMPLES} × 128 "
          f"(the fast phase on the first 8), ratio {args.ratio}, "
          f"load {loadavg()}", flush=True)
    starts: dict[str, float] = {}
    first_schedule = []

    def on_event(e: refine.AutoProgress):
        starts.setdefault(e.phase, e.elapsed_s)
        if e.phase == "fast" and not first_schedule and e.head_ratios:
            first_schedule.append(e.elapsed_s)
    result = refine.auto_schedule(loaded.model, tokens, fitness, config, on_event)
    phases = list(starts)
    for a, b in zip(phases, phases[1:] + ["end"]):
        end = starts[b] if b != "end" else result.seconds
        print(f"  {a:<12} {end - starts[a]:6.1f} s", flush=True)
    print(f"first schedule in the sliders at {first_schedule[0]:.1f} s; fast schedule ({result.fast}, KL "
          f"{result.fast_kl:.4f}) chosen at {result.fast_seconds:.1f} s; candidates "
          + ", ".join(f"{k} {v:.4f}" for k, v in result.candidates.items())
          + f"; {result.variants_built} variants built; load {loadavg()}", flush=True)
    prefix = refine.variant_key_prefix(loaded.model, tokens, config.damp)
    removed = 0
    for layer in range(len(loaded.model.model.layers)):
        for module, top in (("attn", 64), ("mlp", loaded.model.model.layers[layer].mlp.down_proj.in_features)):
            for count in range(top + 1):
                path = cache._path("stats", f"{prefix}|{layer}|{module}|{count}", ".safetensors")
                if path.exists():
                    path.unlink()
                    removed += 1
    print(f"removed the {removed} variants this run wrote", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
