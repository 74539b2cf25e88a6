"""Perplexity on non-overlapping windows of a token stream (SparseGPT/SlimGPT protocol)."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from slimgpt_core import data
from slimgpt_core.base.cache import lookup_json, model_fingerprint, store_json
from slimgpt_core.base.errors import JobCancelled, SlimGPTError, out_of_memory_message
from slimgpt_core.base.shapes import check_context_length


@dataclass
class PerplexityResult:
    dataset: str
    seqlen: int
    windows: int
    tokens: int
    nll: float  # mean negative log-likelihood per predicted token (nats)
    ppl: float
    seconds: float
    # standard error of the mean of the per-window NLLs (every window predicts the same number of tokens, so
    # their mean is `nll`); None for one window or a result cached before it was recorded
    nll_se: float | None = None


def perplexity(model, tokens: torch.Tensor, seqlen: int = 128, batch_size: int = 8, max_windows: int | None = None,
               device: torch.device | str = "cpu", dataset: str = "", progress: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> PerplexityResult:
    if seqlen < 2:
        raise SlimGPTError(f"evaluation length must be >= 2, got {seqlen}")
    check_context_length(model.config, seqlen, "evaluation length")
    n_windows = tokens.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise SlimGPTError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    windows = tokens[: n_windows * seqlen].view(n_windows, seqlen)
    t0 = time.perf_counter()
    nll_sum, count, window_nlls = 0.0, 0, []
    model_device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for s in range(0, n_windows, batch_size):
                if should_stop is not None and should_stop():
                    raise JobCancelled("evaluation was cancelled")
                ids = windows[s:s + batch_size].to(model_device)
                logits = model(ids, use_cache=False).logits.float()
                losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                         reduction="none").view(ids.shape[0], -1)
                nll_sum += float(losses.sum())
                window_nlls += losses.mean(dim=1).tolist()
                count += ids[:, 1:].numel()
                if progress is not None:
                    progress(min(s + batch_size, n_windows), n_windows)
    except torch.cuda.OutOfMemoryError:
        raise SlimGPTError(out_of_memory_message("evaluating perplexity", str(device))) from None
    nll = nll_sum / count
    se = statistics.stdev(window_nlls) / math.sqrt(n_windows) if n_windows > 1 else None  # Python floats: fp64
    return PerplexityResult(dataset, seqlen, n_windows, count, nll, math.exp(nll), time.perf_counter() - t0, se)


def cached_perplexity(model, tokenizer, source: str, seqlen: int = 128, batch_size: int = 8,
                      max_windows: int | None = None, device: torch.device | str = "cpu",
                      progress: Callable[[int, int], None] | None = None,
                      should_stop: Callable[[], bool] | None = None, use_cache: bool = True) -> PerplexityResult:
    """Perplexity on a named text or file, cached per (model fingerprint, text, length, windows)."""


    tokens = data.evaluation_tokens(tokenizer, source)
    # v2: results carry the standard error of the per-window NLL
    key = f"ppl-v2|{model_fingerprint(model)}|{source}|{tokens.numel()}|{seqlen}|{max_windows}"
    hit = lookup_json("results", key) if use_cache else None
    if hit is not None:
        return PerplexityResult(**hit)
    result = perplexity(model, tokens, seqlen, batch_size, max_windows, device, source, progress, should_stop)
    if use_cache:
        store_json("results", key, asdict(result))
    return result
