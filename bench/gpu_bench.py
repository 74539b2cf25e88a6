"""Pruning speed and memory on a LLaMA-7B-shaped model with random weights (timing only).

    python bench/gpu_bench.py            # CUDA: 32 layers, hidden 4096, FFN 11008, 32 heads, 128 x 2048, fp16
    python bench/gpu_bench.py --small    # reduced shapes (the default on CPU)

Prints time per phase, total, peak GPU memory and where the calibration activations lived.
Target on one H100: 20% in <= 120 s with <= 10 GB peak (paper: 678 s, 7.4 GB on an A100)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from slimgpt_core.methods.pipeline import prune_model

from slimgpt_core.methods.prune_settings import PruneSettings  # noqa: E402

FULL = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
SMALL = dict(num_hidden_layers=8, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="reduced shapes (default without CUDA)")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--nsamples", type=int)
    ap.add_argument("--seqlen", type=int)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--no-accumulation", action="store_true", help="skip the reference forward")
    ap.add_argument("--offload-activations", default="auto")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    small = args.small or not cuda
    shapes = SMALL if small else FULL
    nsamples = args.nsamples or (16 if small else 128)
    seqlen = args.seqlen or (256 if small else 2048)
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    model = LlamaForCausalLM(LlamaConfig(**shapes, dtype=dtype)).to(dtype).eval()  # weights stay on the CPU
    build = time.perf_counter() - t0
    tokens = torch.randint(0, shapes["vocab_size"], (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    settings = PruneSettings(ratio=args.ratio, batch_size=args.batch_size, tf32=args.tf32,
                             track_accumulation=not args.no_accumulation,
                             offload_activations=args.offload_activations)
    t0 = time.perf_counter()
    report = prune_model(model, tokens, settings, use_cache=False)
    wall = time.perf_counter() - t0
    print(json.dumps({
        "device": torch.cuda.get_device_name() if cuda else "cpu", "threads": torch.get_num_threads(),
        "shapes": "small" if small else "llama-7b", "dtype": str(dtype), "calibration": f"{nsamples}x{seqlen}",
        "ratio": args.ratio, "build_seconds": round(build, 1), "prune_seconds": round(wall, 1),
        "phases": {k: round(v, 2) for k, v in report.phase_seconds.items()},
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_process_rss_gb": round(report.peak_memory_mb / 1024, 2) if not cuda else None,
        "activations_on": report.settings.get("activations_on"),
        "achieved_layer_ratio": round(report.achieved_layer_ratio, 4)}, indent=1))


if __name__ == "__main__":
    main()
