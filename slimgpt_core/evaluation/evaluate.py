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


def text_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None,
                 bos: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of `seqlen` tokens of the stream; with `bos`, each is <bos> and the next
    seqlen - 1 text tokens (the loss then covers the text tokens only)."""
    text_len = seqlen if bos is None else seqlen - 1
    n_windows = tokens.numel() // text_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise SlimGPTError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of {text_len}")
    windows = tokens[: n_windows * text_len].view(n_windows, text_len)
    if bos is None:
        return windows
    return torch.cat([torch.full((n_windows, 1), bos, dtype=windows.dtype), windows], 1)


def perplexity(model, tokens: torch.Tensor, seqlen: int = 128, batch_size: int = 8, max_windows: int | None = None,
               device: torch.device | str = "cpu", dataset: str = "", progress: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None, bos: int | None = None) -> PerplexityResult:
    """Perplexity over `text_windows` of the token stream (`bos`: the <bos> id each window starts with)."""
    if seqlen < 2:
        raise SlimGPTError(f"evaluation length must be >= 2, got {seqlen}")
    check_context_length(model.config, seqlen, "evaluation length")
    windows = text_windows(tokens, seqlen, max_windows, bos)
    n_windows = windows.shape[0]
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
    bos = data.window_bos(tokenizer)
    # v2: results carry the standard error of the per-window NLL
    key = f"ppl-v2|{model_fingerprint(model)}|{source}|{tokens.numel()}|{seqlen}|{max_windows}"
    if bos is not None:
        key += f"|bos{bos}"
    hit = lookup_json("results", key) if use_cache else None
    if hit is not None:
        return PerplexityResult(**hit)
    result = perplexity(model, tokens, seqlen, batch_size, max_windows, device, source, progress, should_stop, bos)
    if use_cache:
        store_json("results", key, asdict(result))
    return result
