"""Prune the shared SmolLM2 (log schedule, C4 calibration) and print time per phase, peak memory, achieved ratio
and dense vs pruned WikiText-2 perplexity at 128 on a fixed number of windows.

    python bench/prune_bench.py [--ratios 0.2,0.5] [--nsamples 128] [--seqlen 512] [--windows 256]

Side by side against an earlier commit (default 294698c, where issue 13 started): that commit is checked out
in a temporary git worktree, and both trees prune the same model on the same calibration tokens in fresh
processes, alternating, several repeats; prints the median time ratio (this tree / that commit), the phase
tables, peak memory and whether the results are identical (removed units, errors, perplexity):

    python bench/prune_bench.py --against [COMMIT] [--modes accumulation,no-accumulation] [--repeats 3] [--flops]

--flops also counts both trees' matrix-product FLOPs (torch's FlopCounterMode, one extra run each) and prints the
floor they set: this tree's FLOPs at the best matrix-product rate the machine reaches, over the base's time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_COMMIT = "294698c"
MODES = {"accumulation": True, "no-accumulation": False}


def phase_table(phases: dict[str, float], total: float) -> str:
    rows = [f"  {name:<11} {sec:8.1f} s" for name, sec in phases.items()]
    return "\n".join(rows + [f"  {'(sum)':<11} {sum(phases.values()):8.1f} s   wall {total:.1f} s"])


# ---------------------------------------------------------------------------------------------- one tree, one run

def _rss_peak_reset() -> bool:
    try:  # Linux: reset VmHWM so that the peak measured is the pruning's, not the loading's
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _engine_module(*names: str):
    """A module of the engine under test: in folders now, flat in the earlier commits --against measures."""
    import importlib
    for name in names:
        try:
            return importlib.import_module("slimgpt_core." + name)
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError(f"none of {names} in slimgpt_core")


def worker(args) -> None:
    """Prune with the slimgpt_core of `args.tree` on the saved calibration tokens; write the results as JSON."""
    sys.path.insert(0, args.tree)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    from slimgpt_core.models import load_model
    pipeline = _engine_module("methods.pipeline", "pipeline")
    PruneSettings, prune_model = pipeline.PruneSettings, pipeline.prune_model

    calib = load_file(args.calib_file)["tokens"]
    loaded = load_model(args.model, "cpu")
    model = loaded.model
    settings = PruneSettings(ratio=args.ratio, schedule=args.schedule, device="cpu",
                             track_accumulation=MODES[args.mode])
    rss_before = _rss_peak_mb()
    reset = _rss_peak_reset()
    counter = None
    if args.flops:  # the matrix products' floating-point operations (the counter slows the run: time not used)
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        counter.__enter__()
    t0 = time.perf_counter()
    report = prune_model(model, calib, settings, use_cache=False)
    wall = time.perf_counter() - t0
    if counter is not None:
        counter.__exit__(None, None, None)
    out = {"tree": args.tree, "mode": args.mode, "seconds": wall, "phases": report.phase_seconds,
           "matmul_flops": counter.get_total_flops() if counter is not None else None,
           "peak_rss_mb": _rss_peak_mb() if reset else report.peak_memory_mb, "rss_before_mb": rss_before,
           "heads_removed": [h.removed for h in report.heads],
           "units_removed": [(m.module, m.units_removed) for m in report.modules],
           "rel_errors": [m.rel_error for m in report.modules],
           "accumulated": [e.accumulated_error for e in report.layers],
           "kept_shapes": [[layer.self_attn.q_proj.out_features, layer.mlp.down_proj.in_features]
                           for layer in model.model.layers]}
    if args.windows:
        from slimgpt_core.data import evaluation_tokens
        perplexity = _engine_module("evaluation.evaluate", "evaluate").perplexity
        test = evaluation_tokens(loaded.tokenizer, "wikitext2")
        out["ppl"] = perplexity(model, test, 128, 16, args.windows, torch.device("cpu"), "wikitext2").ppl
    Path(args.result).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------- side by side comparison

def _run_worker(tree: Path, calib_file: Path, mode: str, args, windows: int, flops: bool = False) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--tree", str(tree), "--calib-file",
           str(calib_file), "--mode", mode, "--result", str(result), "--model", args.model, "--ratio",
           str(args.ratio), "--schedule", args.schedule, "--windows", str(windows), "--threads", str(args.threads)] \
        + (["--flops"] if flops else [])
    subprocess.run(cmd, check=True)
    out = json.loads(result.read_text())
    result.unlink()
    return out


def _same(a: dict, b: dict, rtol: float = 1e-5) -> dict:
    def close(x, y):
        return all(abs(p - q) <= rtol * max(abs(p), abs(q), 1e-12) or (p != p and q != q) for p, q in zip(x, y))
    same = {"removed units": a["heads_removed"] == b["heads_removed"] and a["units_removed"] == b["units_removed"]
            and a["kept_shapes"] == b["kept_shapes"],
            "module errors (1e-5 rel)": close(a["rel_errors"], b["rel_errors"]),
            "accumulated errors (1e-5 rel)": close(a["accumulated"], b["accumulated"])}
    if "ppl" in a and "ppl" in b:
        same["perplexity (1e-5 rel)"] = close([a["ppl"]], [b["ppl"]])
    return same


def against(args) -> None:
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from slimgpt_core.data import calibration_tokens
    from slimgpt_core.models import load_model

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.against], check=True,
                            capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "slimgpt_core"], check=True,
                           capture_output=True, text=True).stdout.strip()
    print(f"this tree: {ROOT} at {head}{' (+ uncommitted changes)' if dirty else ''}; against: {commit}")
    loaded = load_model(args.model, "cpu")
    calib = calibration_tokens(loaded.tokenizer, "c4", args.nsamples, args.seqlen)
    del loaded
    with tempfile.TemporaryDirectory(prefix="prune-bench-") as tmp:
        old_tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(old_tree), commit],
                       check=True)
        try:
            calib_file = Path(tmp) / "calib.safetensors"
            save_file({"tokens": calib.contiguous()}, str(calib_file))
            rows = {}
            for mode in args.modes.split(","):
                runs = {"new": [], "old": []}
                for r in range(args.repeats):
                    order = ("old", "new") if r % 2 == 0 else ("new", "old")
                    for who in order:
                        tree = ROOT if who == "new" else old_tree
                        out = _run_worker(tree, calib_file, mode, args, args.windows if r == 0 else 0)
                        runs[who].append(out)
                        print(f"{mode} repeat {r + 1}/{args.repeats} {who}: {out['seconds']:.1f} s, "
                              f"peak RSS {out['peak_rss_mb']:.0f} MB", flush=True)
                rows[mode] = _summary(mode, runs)
                rows[mode]["threads"] = args.threads
                if args.flops:
                    rows[mode]["floor"] = _floor(mode, {who: _run_worker(tree, calib_file, mode, args, 0, True)
                                                         for who, tree in (("new", ROOT), ("old", old_tree))},
                                                 rows[mode])
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=False)


def _summary(mode: str, runs: dict) -> dict:
    ratios = [n["seconds"] / o["seconds"] for n, o in zip(runs["new"], runs["old"])]
    same = _same(runs["new"][0], runs["old"][0])
    row = {"mode": mode, "ratios": ratios, "median_ratio": statistics.median(ratios),
           "seconds_new": [n["seconds"] for n in runs["new"]], "seconds_old": [o["seconds"] for o in runs["old"]],
           "peak_rss_mb_new": max(n["peak_rss_mb"] for n in runs["new"]),
           "peak_rss_mb_old": max(o["peak_rss_mb"] for o in runs["old"]),
           "rss_before_prune_mb": runs["new"][0]["rss_before_mb"], "identical": same,
           "ppl_new": runs["new"][0].get("ppl"), "ppl_old": runs["old"][0].get("ppl")}
    print(f"\n== {mode}: median time ratio (this tree / base) {row['median_ratio']:.3f} over {len(ratios)} pairs "
          f"({', '.join(f'{r:.3f}' for r in ratios)})")
    for who in ("new", "old"):
        best = min(runs[who], key=lambda o: o["seconds"])
        print(f"{who} (fastest repeat) phases:\n{phase_table(best['phases'], best['seconds'])}")
    print(f"peak RSS while pruning: new {row['peak_rss_mb_new']:.0f} MB, old {row['peak_rss_mb_old']:.0f} MB "
          f"(process before pruning: {row['rss_before_prune_mb']:.0f} MB)")
    print(f"perplexity: new {row['ppl_new']}, old {row['ppl_old']}; identical: {same}", flush=True)
    return row


def matmul_rate() -> float:
    """The best fp32 matrix-product rate (FLOP/s) this process reaches, on layer-shaped and large square products:
    no implementation of a given number of matrix-product FLOPs runs faster than FLOPs / this rate."""
    import torch
    best = 0.0
    for m, k, n in ((2048, 576, 1536), (2048, 1536, 576), (576, 2048, 576), (2048, 2048, 2048)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        best = max(best, 10 * 2 * m * k * n / (time.perf_counter() - t0))
    return best


def _floor(mode: str, counted: dict, row: dict) -> dict:
    """The matrix-product FLOPs of both trees and the time ratio no implementation of this tree's FLOPs can beat
    on this machine (its FLOPs at the best matrix-product rate, over the base's median time)."""
    import torch
    if row.get("threads"):
        torch.set_num_threads(row["threads"])  # the rate at the thread count the timed runs used
    rate = matmul_rate()
    new, old = counted["new"]["matmul_flops"], counted["old"]["matmul_flops"]
    floor_s = new / rate
    out = {"matmul_flops_new": new, "matmul_flops_old": old, "flop_ratio": new / old,
           "matmul_rate_gflops": rate / 1e9, "floor_seconds": floor_s,
           "floor_ratio": floor_s / statistics.median(row["seconds_old"])}
    print(f"{mode}: matrix-product FLOPs new {new / 1e12:.2f} T, old {old / 1e12:.2f} T (ratio {new / old:.3f}); "
          f"best matrix-product rate here {rate / 1e9:.0f} GFLOP/s, so this tree needs at least {floor_s:.1f} s: "
          f"{out['floor_ratio']:.3f}x the base's median time", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ plain benchmark

def plain(args) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from slimgpt_core.data import calibration_tokens, evaluation_tokens
    from slimgpt_core.evaluation.evaluate import perplexity
    from slimgpt_core.base.devices import resolve_device
    from slimgpt_core.models import load_model
    from slimgpt_core.methods.pipeline import PruneSettings, prune_model

    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    loaded = load_model(args.model, args.device)
    calib = calibration_tokens(loaded.tokenizer, "c4", args.nsamples, args.seqlen)
    test = evaluation_tokens(loaded.tokenizer, "wikitext2")
    model = loaded.model.to(device)
    dense = perplexity(model, test, 128, 16, args.windows, device, "wikitext2")
    print(f"dense: ppl {dense.ppl:.3f} over {dense.windows} windows ({dense.seconds:.1f} s)")
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        model = load_model(args.model, args.device).model
        t0 = time.perf_counter()
        report = prune_model(model, calib, PruneSettings(ratio=ratio, schedule=args.schedule, device=args.device,
                                                         track_accumulation=not args.no_accumulation))
        wall = time.perf_counter() - t0
        print(f"ratio {ratio}: phases\n{phase_table(report.phase_seconds, wall)}")
        model.to(device)
        pruned = perplexity(model, test, 128, 16, args.windows, device, "wikitext2")
        row = {"ratio": ratio, "schedule": args.schedule, "calib": f"c4 {args.nsamples}x{args.seqlen}",
               "prune_seconds": round(wall, 1), "phases": {k: round(v, 1) for k, v in report.phase_seconds.items()},
               "peak_memory_mb": round(report.peak_memory_mb), "params_before": report.params_before,
               "params_after": report.params_after, "achieved_layer_ratio": round(report.achieved_layer_ratio, 4),
               "achieved_ratio": round(report.achieved_ratio, 4), "dense_ppl": round(dense.ppl, 3),
               "pruned_ppl": round(pruned.ppl, 3), "ppl_windows": pruned.windows}
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--schedule", default="log")
    ap.add_argument("--nsamples", type=int, default=None, help="default 128 (64 with --against)")
    ap.add_argument("--seqlen", type=int, default=None, help="default 512 (256 with --against)")
    ap.add_argument("--windows", type=int, default=None, help="WikiText-2 test windows of 128 tokens "
                    "(default 256; 32 with --against, first repeat only)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-accumulation", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--against", nargs="?", const=BASE_COMMIT, help="compare with this commit side by side")
    ap.add_argument("--modes", default="accumulation,no-accumulation")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.2, help="with --against")
    ap.add_argument("--threads", type=int, default=0, help="with --against: torch threads in both trees' runs "
                    "(default: torch's own choice; 1 keeps a shared machine's other core for the other load)")
    ap.add_argument("--flops", action="store_true", help="with --against: also count both trees' matrix-product "
                    "FLOPs (one more run each) and print the time ratio they allow at best on this machine")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--calib-file", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    compare = args.against is not None or args.worker
    args.nsamples = args.nsamples or (64 if compare else 128)
    args.seqlen = args.seqlen or (256 if compare else 512)
    args.windows = args.windows if args.windows is not None else (32 if compare else 256)
    if args.worker:
        worker(args)
    elif args.against:
        against(args)
    else:
        plain(args)


if __name__ == "__main__":
    main()
