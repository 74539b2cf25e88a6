"""What-if timings on the shared SmolLM2 (30 layers): error curves from the dense statistics, the redraw (predict +
sensitivity map + both figures serialised as Streamlit sends them), and how far the FFN curve is from
obs.prune_channels.

    python bench/whatif_bench.py [--model default] [--calib c4] [--nsamples 32] [--seqlen 256] [--gap-layers 3]
                                 [--threads 1] [--no-time-curves]

Prints wall and CPU seconds and the load average: on a shared machine the wall time depends on the load.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from slimgpt_core.schedules import curves  # noqa: E402
from slimgpt_core.data import calibration_tokens  # noqa: E402
from slimgpt_core.models import load_model  # noqa: E402
from slimgpt_core.schedules.schedule import layer_ratios  # noqa: E402
from ui import charts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--gap-layers", type=int, default=3, help="layers whose FFN curve is checked against prune_channels")
    ap.add_argument("--redraws", type=int, default=20)
    ap.add_argument("--no-time-curves", dest="time_curves", action="store_false",
                    help="read the curves from the cache instead of timing their computation")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}; load average {Path('/proc/loadavg').read_text().split()[:3]}")
    loaded = load_model(args.model, "cpu")
    tokens = calibration_tokens(loaded.tokenizer, args.calib, args.nsamples, args.seqlen)
    n = len(loaded.model.model.layers)

    t0 = time.perf_counter()
    hessians = [(H_a, H_m) for _, _, H_a, H_m in curves.dense_hessians(loaded.model, tokens, device="cpu")]
    t_stats = time.perf_counter() - t0
    from slimgpt_core.base import cache
    key = f"{curves.CURVES_VERSION}|{cache.model_fingerprint(loaded.model)}|{cache.tokens_digest(tokens)}|0.01"
    print(f"{args.model}: {n} layers, calibration {args.calib} {args.nsamples}x{args.seqlen}")
    print(f"dense statistics (Hessians, from cache/stats where present): {t_stats:.1f} s")
    if args.time_curves:
        before = cache.lookup_tensors("stats", key)  # curves cached earlier (perhaps by an older version of the code)
        t0, c0 = time.perf_counter(), time.process_time()
        model_curves = curves.error_curves(loaded.model, tokens, device="cpu", use_cache=False)
        # CPU seconds of this process beside the wall time: on a shared machine the wall time mostly measures the load
        print(f"error curves of all {n} layers from the statistics (heads + FFN): {time.perf_counter() - t0:.1f} s "
              f"wall, {time.process_time() - c0:.1f} s CPU")
        if before is not None:
            fresh = model_curves.to_tensors()
            same = all(torch.equal(before[k], fresh[k]) for k in fresh) and before.keys() == fresh.keys()
            print(f"identical to the curves cached before this run: {same}")
        cache.store_tensors("stats", key, model_curves.to_tensors())
    t0 = time.perf_counter()
    model_curves = curves.error_curves(loaded.model, tokens, device="cpu")
    print(f"error curves read back (from_cache={model_curves.from_cache}): {time.perf_counter() - t0:.2f} s")

    times, cpu = [], []
    for k in range(args.redraws):
        ratio = 0.05 + 0.55 * k / args.redraws
        heads, ffn = layer_ratios(n, ratio * 0.8, "log"), layer_ratios(n, ratio, "linear", 2.0)
        t0, c0 = time.perf_counter(), time.process_time()
        pred = curves.predict(model_curves, heads, ffn)
        smap = curves.sensitivity_map(model_curves)
        figs = [charts.whatif_errors(pred.attn, pred.mlp),
                charts.sensitivity_map(smap.ratios, smap.heads, smap.ffn,
                                       [c / lc.n_kv for c, lc in zip(pred.kv_removed, model_curves.layers)],
                                       [c / lc.n_ffn for c, lc in zip(pred.ffn_removed, model_curves.layers)])]
        for fig in figs:
            fig.to_json()  # what st.plotly_chart serialises
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(f"what-if redraw ({n} layers: predict + sensitivity map + 2 figures to JSON): wall median "
          f"{statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms; CPU median "
          f"{statistics.median(cpu) * 1000:.0f} ms, max {max(cpu) * 1000:.0f} ms over {len(times)} schedules")

    worst = 0.0
    for i in range(min(args.gap_layers, n)):
        W = loaded.model.model.layers[i].mlp.down_proj.weight.data.float()
        f = W.shape[1]
        counts = [round(f * 0.025 * j) for j in range(1, 39)]
        gaps = curves.ffn_curve_gap(W, hessians[i][1], counts)
        worst = max(worst, max(abs(g) for g in gaps))
        print(f"layer {i}: FFN curve vs prune_channels at 2.5%…95% of {f} channels: gap min {min(gaps):+.3f}, "
              f"max {max(gaps):+.3f} (relative to prune_channels)")
    if args.gap_layers:
        print(f"worst |gap| {worst:.3f}; tests assert <= {curves.FFN_CURVE_TOLERANCE}")
    print(f"load average {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
