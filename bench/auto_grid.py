"""The `auto` grid (docs/compare/auto-grid/): the fast schedule, the refined one after 2, 5 and 10 minutes, log, linear,
uniform and LLM Surgeon's global threshold, at the log schedule's achieved parameter count, each pruned for real by
the sequential pipeline and scored on the same WikiText-2 windows, with the paired difference against log.

Resumable: every finished row (and the search's schedules) goes into OUT/grid.json at once, and a rerun skips what
is there. OUT/grid.md is rewritten after every row.

    OMP_NUM_THREADS=2 python bench/auto_grid.py --model default --out docs/compare/auto-grid/smollm2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimgpt_core.data import calibration_tokens, evaluation_tokens  # noqa: E402
from slimgpt_core.methods.pipeline import prune_model  # noqa: E402
from slimgpt_core.methods.prune_settings import PruneSettings  # noqa: E402
from slimgpt_core.base.shapes import count_parameters  # noqa: E402
from slimgpt_core.models import load_model  # noqa: E402
from slimgpt_core.schedules import global_allocation as ga  # noqa: E402
from slimgpt_core.schedules.stitched import unit_costs  # noqa: E402
from slimgpt_core.schedules.curves import error_curves  # noqa: E402
from slimgpt_core.methods.statistics import dense_hessians  # noqa: E402
from slimgpt_core.schedules.refine import AutoConfig, auto_schedule  # noqa: E402
from slimgpt_core.schedules.schedule import AUTO_FITNESS_SAMPLES  # noqa: E402

ROWS = ("log", "fast", "refined-120", "refined-300", "refined-600", "linear", "uniform", "surgeon-2")  # refined-S: at S s


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def window_nlls(model, tokens: torch.Tensor, seqlen: int, windows: int, batch_size: int = 8) -> list[float]:
    """Mean NLL of each of the first `windows` non-overlapping windows (evaluate.perplexity's windows)."""
    n = min(windows, tokens.numel() // seqlen)
    ids_all = tokens[: n * seqlen].view(n, seqlen)
    out = []
    with torch.no_grad():
        for s in range(0, n, batch_size):
            ids = ids_all[s:s + batch_size]
            logits = model(ids, use_cache=False).logits.float()
            losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                     reduction="none").view(ids.shape[0], -1)
            out += losses.mean(dim=1).tolist()
    return out


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--calib", default="c4")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl", default="wikitext2")
    p.add_argument("--ppl-seqlen", type=int, default=128)
    p.add_argument("--ppl-windows", type=int, default=40)
    p.add_argument("--search-seconds", type=float, default=600.0)
    p.add_argument("--snapshots", default="120,300,600", help="seconds at which the refined schedule is taken")
    p.add_argument("--fitness-samples", type=int, default=AUTO_FITNESS_SAMPLES)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "grid.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"rows": {}, "searches": {}}
    state["setup"] = {k: v for k, v in vars(args).items() if k != "out"} | {
        "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

    def save():
        write_text_atomic(state_path, json.dumps(state, indent=1))
        write_text_atomic(out / "grid.md", markdown(state))

    dense = load_model(args.model, "cpu")
    tokens = calibration_tokens(dense.tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
    fitness = calibration_tokens(dense.tokenizer, args.calib, args.fitness_samples, 128, args.seed + 1)
    eval_tokens = evaluation_tokens(dense.tokenizer, args.ppl)
    if "dense" not in state["rows"]:
        state["rows"]["dense"] = {"nlls": window_nlls(dense.model, eval_tokens, args.ppl_seqlen, args.ppl_windows),
                                  "params": count_parameters(dense.model)}
        save()
    rows = [r for r in args.rows.split(",") if r]
    for ratio in (float(r) for r in args.ratios.split(",")):
        def key(row):
            return f"{row} {ratio:g}"

        def record(row, model, params, seconds, extra=None):
            state["rows"][key(row)] = {"ratio": ratio, "row": row, "params": params, "prune_s": round(seconds, 1),
                                       "load_before": load0, "load_after": loadavg(),
                                       "nlls": window_nlls(model, eval_tokens, args.ppl_seqlen, args.ppl_windows),
                                       **(extra or {})}
            save()
            print(f"{key(row)}: ppl {math.exp(statistics.fmean(state['rows'][key(row)]['nlls'])):.2f}", flush=True)

        def prune(settings):
            loaded = load_model(args.model, "cpu")
            t = time.perf_counter()
            report = prune_model(loaded.model, tokens, settings, model_name=args.model)
            return loaded.model, report.params_after, time.perf_counter() - t

        load0 = loadavg()
        if key("log") not in state["rows"]:
            model, params, seconds = prune(PruneSettings(ratio=ratio, schedule="log"))
            record("log", model, params, seconds)
        target = state["rows"][key("log")]["params"]
        search_rows = [r for r in rows if r == "fast" or r.startswith("refined-")]
        if any(key(r) not in state["rows"] for r in search_rows) and key("search") not in state["searches"]:
            config = AutoConfig(budget=ga.BudgetSpec(target_params=target), max_seconds=args.search_seconds,
                                seed=args.seed, device="cpu", snapshots=tuple(float(x) for x in args.snapshots.split(",")))
            # The goal counts the fast schedule's seconds with the dense statistics and curves cached (what the
            # studio's what-if has already made): fill that cache before the search's clock starts.
            t = time.perf_counter()
            error_curves(dense.model, tokens, config.damp, config.batch_size, "cpu")
            for _ in dense_hessians(dense.model, tokens, config.batch_size, "cpu"):
                pass
            warm_s = time.perf_counter() - t
            print(f"  statistics and curves ready in {warm_s:.0f} s (load {loadavg()})", flush=True)
            load_search = loadavg()
            t = time.perf_counter()

            def show(e):
                if e.phase in ("fast", "done") or (e.phase == "search" and e.generation % 10 == 0):
                    print(f"  auto {e.phase} {e.fraction:.2f} {e.elapsed_s:.0f}s best {e.best} KL {e.best_kl:.4f} "
                          f"gen {e.generation} load {loadavg()}", flush=True)
            result = auto_schedule(dense.model, tokens, fitness, config, show)
            state["searches"][key("search")] = {**{k: v for k, v in asdict(result).items() if k != "snapshots"},
                                                "snapshots": {str(int(s)): v for s, v in result.snapshots.items()},
                                                "wall_s": round(time.perf_counter() - t, 1), "warm_s": round(warm_s, 1),
                                                "load_before": load_search,
                                                "load_after": loadavg()}
            save()
        search = state["searches"].get(key("search"))
        for row in rows:
            if key(row) in state["rows"] or row == "log":
                continue
            load0 = loadavg()
            if row == "fast" or row.startswith("refined-"):
                if row == "fast":
                    s = {"keep_heads": search["fast_keep_heads"], "keep_ffn": search["fast_keep_ffn"],
                         "kl": search["fast_kl"], "which": "fast"}
                else:
                    s = search["snapshots"].get(row.split("-")[1])
                    if s is None:
                        continue
                same = next((k for k, r in state["rows"].items() if r.get("ratio") == ratio and
                             (r.get("keep_heads"), r.get("keep_ffn")) == (s["keep_heads"], s["keep_ffn"])), None)
                if same is not None:  # the schedule of a row already pruned: the same model, not pruned again
                    state["rows"][key(row)] = {**state["rows"][same], "row": row, "kl": s["kl"], "which": s["which"],
                                               "generation": s.get("generation", 0), "same_as": same}
                    save()
                    continue
                model, params, seconds = prune(PruneSettings(keep_heads=s["keep_heads"], keep_ffn=s["keep_ffn"]))
                record(row, model, params, seconds, {"kl": s["kl"], "which": s["which"],
                                                     "generation": s.get("generation", 0),
                                                     "keep_heads": s["keep_heads"], "keep_ffn": s["keep_ffn"]})
            elif row in ("linear", "uniform"):
                n_kv, n_ffn = _shapes(dense.model)
                head_cost, ffn_cost = unit_costs(dense.model)
                budget = ga.GroupBudget(n_kv, n_ffn, head_cost, ffn_cost, ga.BudgetSpec(target_params=target),
                                        count_parameters(dense.model), count_parameters(dense.model.model.layers))
                g = budget.exact(ga.fitted_schedule(budget, n_kv, n_ffn, row, 4.0))
                n = len(n_kv)
                rep = [layer.self_attn.num_key_value_groups for layer in dense.model.model.layers]
                model, params, seconds = prune(PruneSettings(
                    keep_heads=[(u - int(k)) * r for u, k, r in zip(n_kv, g[:n], rep)],
                    keep_ffn=[u - int(c) for u, c in zip(n_ffn, g[n:])]))
                record(row, model, params, seconds)
            elif row.startswith("surgeon"):
                from slimgpt_core.methods.surgeon import schedule_fraction
                shots = int(row.split("-")[1]) if "-" in row else 4
                base = PruneSettings(ratio=ratio, schedule="log")
                fraction = schedule_fraction(dense.model, base)
                model, params, seconds = prune(base.updated(method="surgeon", shots=shots, ratio=fraction))
                record(row, model, params, seconds)
    save()
    return 0


def _shapes(model):
    n_kv = [layer.self_attn.k_proj.out_features // layer.self_attn.head_dim for layer in model.model.layers]
    n_ffn = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    return n_kv, n_ffn


def markdown(state: dict) -> str:
    """The grid as a table: PPL, mean NLL ± se, paired NLL difference against log ± its se."""
    setup = state.get("setup", {})
    dense = state["rows"].get("dense")
    lines = [f"# auto grid: {setup.get('model')}", "",
             f"Calibration {setup.get('calib')} {setup.get('nsamples')} × {setup.get('seqlen')} (seed "
             f"{setup.get('seed')}); the search's KL on {setup.get('fitness_samples')} × 128 other windows (seed+1); "
             f"{setup.get('ppl')} test PPL@{setup.get('ppl_seqlen')} on the first {setup.get('ppl_windows')} windows, "
             f"the same for every row. Every row pruned by the sequential SlimGPT pipeline at the log row's parameter "
             f"count (within one FFN channel; surgeon: its global threshold at the same count). ± is the standard "
             f"error of the mean per-window NLL; Δ vs log is the paired per-window difference (mean ± se). "
             f"Threads: OMP_NUM_THREADS={setup.get('OMP_NUM_THREADS')}.", ""]
    if dense:
        nll = statistics.fmean(dense["nlls"])
        lines += [f"Dense: PPL {math.exp(nll):.2f} (NLL {nll:.3f} ± {_se(dense['nlls']):.3f}).", ""]
    lines += ["| ratio | row | params | PPL | NLL ± se | Δ NLL vs log ± se | PPL / log | KL (fitness) | prune s | "
              "load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in state["rows"].items():
        if k == "dense":
            continue
        log = state["rows"].get(f"log {r['ratio']:g}")
        nll = statistics.fmean(r["nlls"])
        diff = [a - b for a, b in zip(r["nlls"], log["nlls"])] if log else None
        rel = math.exp(nll - statistics.fmean(log["nlls"])) if log else math.nan
        kl = r.get("kl")
        ppl = math.exp(nll)
        lines.append(f"| {r['ratio']:.0%} | {r['row']} | {r['params']:,} | {ppl:.{2 if ppl < 100 else 1}f} | {nll:.3f} ± "
                     f"{_se(r['nlls']):.3f} | " + (f"{statistics.fmean(diff):+.3f} ± {_se(diff):.3f}"
                                                     if diff and r['row'] != 'log' else "–")
                     + f" | {rel:.3f} | " + (f"{kl:.4f}" if kl is not None and math.isfinite(kl) else "–")
                     + (f" | = {r['same_as'].split()[0]} | – |" if r.get("same_as") else
                        f" | {r['prune_s']:.0f} | {r['load_before']}→{r['load_after']} |"))
    for k, s in state.get("searches", {}).items():
        lines += ["", f"Search {k}: fast = {s['fast']} (KL {s['fast_kl']:.4f}) after {s['fast_seconds']:.0f} s; "
                      f"best {s['which']} KL {s['kl']:.4f} at generation {s['generation']} of {s['generations']} in "
                      f"{s['seconds']:.0f} s ({s['evaluations']} evaluations, {s['variants_built']} variants built, "
                      f"{s['variants_from_disk']} from disk); load {s['load_before']}→{s['load_after']}. Fast "
                      f"candidates: " + ", ".join(f"{n} {v:.4f}" for n, v in s["candidates"].items()) + "."]
    return "\n".join(lines) + "\n"


def _se(values) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def render(out: str) -> None:
    """Rewrite OUT/grid.md from OUT/grid.json (the table's format without rerunning anything)."""
    path = Path(out)
    write_text_atomic(path / "grid.md", markdown(json.loads((path / "grid.json").read_text())))


if __name__ == "__main__":
    raise SystemExit(main())
