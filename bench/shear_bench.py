"""Shear (Sheared-LLaMA mask learning) benchmarks; prints JSON lines.

    python bench/shear_bench.py speed   [--model default] [--steps 4] [--batch 1] [--seqlen 256]
        tokens/s and peak memory of mask learning (weights trained, and masks only), one subprocess each so
        that peak RSS is the run's own
    python bench/shear_bench.py quality [--steps 200] [--batch 4] [--seqlen 128] [--windows 40]
        stories260k: shear vs SlimGPT (to the same shape, --target-config) vs Minitron (same shape), perplexity
        on held-out TinyStories (the last fifth of the asset text; shear and calibration use the first 4/5)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from slimgpt_core.evaluate import perplexity  # noqa: E402
from slimgpt_core.models import load_model  # noqa: E402
from slimgpt_core.surgery import count_parameters  # noqa: E402


def speed_one(args) -> dict:
    from slimgpt_core.shear.run import training_tokens
    from slimgpt_core.shear.target import resolve_target
    from slimgpt_core.shear.train import ShearSettings, shear_model

    loaded = load_model(args.model, "cpu", "float32")
    tokens = training_tokens(loaded.tokenizer, ["c4"], args.steps + 1, args.batch, args.seqlen)
    target = resolve_target(json.loads(args.target), loaded.model)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps = []
    result = shear_model(loaded.model, tokens, target,
                         ShearSettings(steps=args.steps + 1, batch_size=args.batch, device="cpu",
                                       train_weights=not args.freeze_weights), steps.append)
    # the first step pays for allocation: rate over the others
    rate = (sum(args.batch * args.seqlen for _ in steps[1:]) / (steps[-1].elapsed_s - steps[0].elapsed_s))
    return {"model": args.model, "params": result.report.params_before, "train_weights": not args.freeze_weights,
            "batch": args.batch, "seqlen": args.seqlen, "timed_steps": args.steps, "tokens_per_s": round(rate, 1),
            "seconds_per_step": round((steps[-1].elapsed_s - steps[0].elapsed_s) / args.steps, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_after_load_mb": round(rss0), "threads": torch.get_num_threads()}


def speed(args) -> None:
    for frozen in (False, True):
        cmd = [sys.executable, __file__, "speed-one", "--model", args.model, "--steps", str(args.steps), "--batch",
               str(args.batch), "--seqlen", str(args.seqlen), "--target", args.target] + (["--freeze-weights"] if frozen else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        print(out, flush=True)


def quality(args) -> None:
    from slimgpt_core.data import evaluation_tokens
    from slimgpt_core.minitron import prune_to_shape
    from slimgpt_core.pipeline import prune_model
    from slimgpt_core.prune_settings import PruneSettings
    from slimgpt_core.shear.target import resolve_target
    from slimgpt_core.shear.train import ShearSettings, shear_model

    torch.manual_seed(0)
    base = load_model("stories260k", "cpu", "float32")
    stream = evaluation_tokens(base.tokenizer, "tinystories")
    cut = int(0.8 * stream.numel())
    train, held_out = stream[:cut], stream[cut:]
    n_train = train.numel() // args.seqlen
    train_windows = train[: n_train * args.seqlen].view(n_train, args.seqlen)
    calib = train_windows[torch.randperm(n_train, generator=torch.Generator().manual_seed(0))[: args.nsamples]]

    def ppl(model) -> dict:
        r = perplexity(model, held_out, 256, 8, args.windows)
        return {"ppl": round(r.ppl, 3), "windows": r.windows, "tokens": r.tokens}

    print(json.dumps({"what": "dense", "params": count_parameters(base.model), **ppl(base.model),
                      "held_out_tokens": held_out.numel(), "train_tokens": train.numel()}), flush=True)
    for raw in args.targets:
        target = resolve_target(json.loads(raw), base.model)
        width_only = target.layers == 5 and target.hidden == 64
        runs = [("shear", True), ("shear-masks-only", False), ("minitron", None)] + ([("slimgpt", None)] if width_only else [])
        for name, train_weights in runs:
            m = load_model("stories260k", "cpu", "float32").model
            t0 = time.perf_counter()
            extra = {}
            if name.startswith("shear"):
                res = shear_model(m, train_windows, target, ShearSettings(steps=args.steps, batch_size=args.batch,
                                                                          device="cpu", train_weights=train_weights))
                extra = {"tokens_seen": res.report.settings["tokens_seen"], "final_loss": round(res.history[-1].loss, 3)}
            elif name == "minitron":
                prune_to_shape(m, calib, target, batch_size=8)
                extra = {"calibration_tokens": calib.numel()}
            else:
                prune_model(m, calib, PruneSettings(keep_heads=[target.heads] * 5, keep_ffn=[target.ffn] * 5,
                                                    device="cpu"))
                extra = {"calibration_tokens": calib.numel()}
            print(json.dumps({"what": name, "target": target.to_dict(), "params": count_parameters(m),
                              "seconds": round(time.perf_counter() - t0, 1), **ppl(m), **extra}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["speed", "speed-one", "quality"])
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seqlen", type=int)
    ap.add_argument("--target", default='{"layers": 24, "kv_groups": 2, "ffn": 1024, "hidden": 512}')
    ap.add_argument("--freeze-weights", action="store_true")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--targets", nargs="+", default=['{"kv_groups": 2, "ffn": 96}',
                                                     '{"layers": 4, "kv_groups": 2, "ffn": 128, "hidden": 48}'])
    args = ap.parse_args()
    if args.mode == "quality":
        args.steps, args.batch, args.seqlen = args.steps or 200, args.batch or 4, args.seqlen or 128
        quality(args)
    else:
        args.steps, args.batch, args.seqlen = args.steps or 4, args.batch or 1, args.seqlen or 256
        (speed if args.mode == "speed" else lambda a: print(json.dumps(speed_one(a))))(args)


if __name__ == "__main__":
    main()
