"""Inference speed and memory of a model: prefill latency and decode throughput at a few shapes."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from slimgpt_core.base.shapes import count_parameters, fits_context, layer_shape


@dataclass
class SpeedPoint:
    batch: int
    prompt_len: int
    new_tokens: int
    prefill_ms: float  # median over repeats
    decode_tokens_per_s: float  # generated tokens (all sequences) per second after the prefill
    peak_memory_mb: float | None  # CUDA: peak allocated during the point; CPU: None (see weights/kv numbers)


@dataclass
class SpeedReport:
    device: str
    dtype: str
    parameters: int
    weights_mb: float
    disk_mb: float | None
    kv_cache_kb_per_token: float  # per sequence, all layers
    points: list[SpeedPoint]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kv_cache_bytes_per_token(model) -> int:
    layers = model.model.layers
    elem = next(model.parameters()).element_size()
    # K and V of every KV head (layer_shape: separate or Phi-3's fused projections)
    return sum(2 * layer_shape(layer)[1] * layer.self_attn.head_dim * elem for layer in layers)


def folder_size_mb(folder: str | Path | None) -> float | None:
    if folder is None or not Path(folder).is_dir():
        return None
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 2**20


def measure_speed(model, batch_sizes=(1, 8), prompt_lens=(128, 512), new_tokens: int = 32, repeats: int = 3,
                  folder: str | Path | None = None, seed: int = 0) -> SpeedReport:
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    points = []
    model.eval()
    for batch in batch_sizes:
        for plen in prompt_lens:
            if not fits_context(model.config, plen + new_tokens):
                continue
            ids = torch.randint(0, vocab, (batch, plen), generator=g).to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            prefill, total = [], []
            with torch.no_grad():
                model(ids[:, :8], use_cache=True)  # warm-up
                for _ in range(repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    model(ids, use_cache=True)
                    _sync(device)
                    prefill.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                   pad_token_id=model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0)
                    _sync(device)
                    total.append(time.perf_counter() - t0)
            p = sorted(prefill)[len(prefill) // 2]
            t = sorted(total)[len(total) // 2]
            decode = max(t - p, 1e-9)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            points.append(SpeedPoint(batch, plen, new_tokens, p * 1e3, batch * (new_tokens - 1) / decode, peak))
    n = count_parameters(model)
    return SpeedReport(str(device), str(next(model.parameters()).dtype), n,
                       n * next(model.parameters()).element_size() / 2**20, folder_size_mb(folder),
                       kv_cache_bytes_per_token(model) / 1024, points)
