"""Shear (Sheared-LLaMA mask learning) benchmarks; prints JSON lines.

    python bench/shear_bench.py speed   [--model default] [--steps 4] [--batch 1] [--seqlen 256]
        tokens/s and peak memory of mask learning (weights trained, and masks only), one subprocess each so
        that peak RSS is the run's own
    python bench/shear_bench.py quality [--steps 200] [--batch 4] [--seqlen 128] [--windows 40]
        stories260k: shear vs SlimGPT (to the same shape, --target-config) vs Minitron (same shape), perplexity
        on held-out TinyStories (the last fifth of the asset text; shear and calibration use the first 4/5)
    python bench/shear_bench.py recipe [--steps 200] [--cpt-steps 300] [--cpt-lr 1e-3] [--windows 40]
        stories260k, the full recipe: each method to each target shape, then the same continued pre-training
        budget (dynamic batch loading over tinystories, wikitext2, c4; labels or distillation from the source);
        perplexity (with the standard error of the mean window NLL) before and after, on the TinyStories text
        never trained on (last fifth) and on WikiText-2 test
    python bench/shear_bench.py recipe-table --input recipe.jsonl
        the recipe's JSON lines as the markdown table of docs/compare/shear-stories260k
    python bench/shear_bench.py pretrain-speed [--model default] [--steps 4] [--batch 1] [--seqlen 256]
        tokens/s and peak memory of continued pre-training (full, LoRA, full + distillation), a process each
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from slimgpt_core.evaluation.evaluate import perplexity  # noqa: E402
from slimgpt_core.models import load_model  # noqa: E402
from slimgpt_core.base.shapes import count_parameters  # noqa: E402


def speed_one(args) -> dict:
    from slimgpt_core.services.shear import training_tokens
    from slimgpt_core.methods.shear.target import resolve_target
    from slimgpt_core.methods.shear.settings import ShearSettings
    from slimgpt_core.methods.shear.train import shear_model

    loaded = load_model(args.model, "cpu", "float32")
    tokens = training_tokens(loaded.tokenizer, ["c4"], args.steps + 1, args.batch, args.seqlen)
    target = resolve_target(json.loads(args.target), loaded.model)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps = []
    result = shear_model(loaded.model, tokens, target,
                         ShearSettings(steps=args.steps + 1, batch_size=args.batch, device="cpu",
                                       train_weights=not args.freeze_weights), steps.append)
    # the first step pays for allocation: rate over the others
    rate = (sum(args.batch * args.seqlen for _ in steps[1:]) / (steps[-1].elapsed_s - steps[0].elapsed_s))
    return {"model": args.model, "params": result.report.params_before, "train_weights": not args.freeze_weights,
            "batch": args.batch, "seqlen": args.seqlen, "timed_steps": args.steps, "tokens_per_s": round(rate, 1),
            "seconds_per_step": round((steps[-1].elapsed_s - steps[0].elapsed_s) / args.steps, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_after_load_mb": round(rss0), "threads": torch.get_num_threads()}


def speed(args) -> None:
    for frozen in (False, True):
        cmd = [sys.executable, __file__, "speed-one", "--model", args.model, "--steps", str(args.steps), "--batch",
               str(args.batch), "--seqlen", str(args.seqlen), "--target", args.target] + (["--freeze-weights"] if frozen else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        print(out, flush=True)


def quality(args) -> None:
    from slimgpt_core.data import evaluation_tokens
    from slimgpt_core.methods.minitron import prune_to_shape
    from slimgpt_core.methods.pipeline import prune_model
    from slimgpt_core.methods.prune_settings import PruneSettings
    from slimgpt_core.methods.shear.target import resolve_target
    from slimgpt_core.methods.shear.settings import ShearSettings
    from slimgpt_core.methods.shear.train import shear_model

    torch.manual_seed(0)
    base = load_model("stories260k", "cpu", "float32")
    stream = evaluation_tokens(base.tokenizer, "tinystories")
    cut = int(0.8 * stream.numel())
    train, held_out = stream[:cut], stream[cut:]
    n_train = train.numel() // args.seqlen
    train_windows = train[: n_train * args.seqlen].view(n_train, args.seqlen)
    calib = train_windows[torch.randperm(n_train, generator=torch.Generator().manual_seed(0))[: args.nsamples]]

    def ppl(model) -> dict:
        r = perplexity(model, held_out, 256, 8, args.windows)
        return {"ppl": round(r.ppl, 3), "windows": r.windows, "tokens": r.tokens}

    print(json.dumps({"what": "dense", "params": count_parameters(base.model), **ppl(base.model),
                      "held_out_tokens": held_out.numel(), "train_tokens": train.numel()}), flush=True)
    for raw in args.targets:
        target = resolve_target(json.loads(raw), base.model)
        width_only = target.layers == 5 and target.hidden == 64
        runs = [("shear", True), ("shear-masks-only", False), ("minitron", None)] + ([("slimgpt", None)] if width_only else [])
        for name, train_weights in runs:
            m = load_model("stories260k", "cpu", "float32").model
            t0 = time.perf_counter()
            extra = {}
            if name.startswith("shear"):
                res = shear_model(m, train_windows, target, ShearSettings(steps=args.steps, batch_size=args.batch,
                                                                          device="cpu", train_weights=train_weights))
                extra = {"tokens_seen": res.report.settings["tokens_seen"], "final_loss": round(res.history[-1].loss, 3)}
            elif name == "minitron":
                prune_to_shape(m, calib, target, batch_size=8)
                extra = {"calibration_tokens": calib.numel()}
            else:
                prune_model(m, calib, PruneSettings(keep_heads=[target.heads] * 5, keep_ffn=[target.ffn] * 5,
                                                    device="cpu"))
                extra = {"calibration_tokens": calib.numel()}
            print(json.dumps({"what": name, "target": target.to_dict(), "params": count_parameters(m),
                              "seconds": round(time.perf_counter() - t0, 1), **ppl(m), **extra}), flush=True)


def ppl_with_se(model, tokens: torch.Tensor, seqlen: int, windows: int) -> dict:
    """Perplexity over non-overlapping windows, with the standard error of the mean per-window NLL."""
    import math

    n = min(windows, tokens.numel() // seqlen)
    w = tokens[: n * seqlen].view(n, seqlen)
    nll = []
    with torch.no_grad():
        for chunk in w.split(8):
            logits = model(chunk, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), chunk[:, 1:], reduction="none")
            nll += loss.mean(1).tolist()
    t = torch.tensor(nll, dtype=torch.float64)
    mean, se = float(t.mean()), float(t.std() / math.sqrt(n)) if n > 1 else float("nan")
    return {"ppl": round(math.exp(mean), 3), "nll": round(mean, 4), "nll_se": round(se, 4), "windows": n,
            "tokens": n * (seqlen - 1), "window_nll": [round(x, 5) for x in nll]}


def recipe(args) -> None:
    """Shear / SlimGPT / Minitron to a shape, then the same continued pre-training (see the module's doc)."""
    import copy

    from slimgpt_core.data import evaluation_tokens
    from slimgpt_core.methods.minitron import prune_to_shape
    from slimgpt_core.methods.pipeline import prune_model
    from slimgpt_core.methods.prune_settings import PruneSettings
    from slimgpt_core.training.domains import perplexity_tokens
    from slimgpt_core.training.pretrain import pretrain
    from slimgpt_core.training.settings import PretrainSettings
    from slimgpt_core.methods.shear.target import resolve_target
    from slimgpt_core.methods.shear.settings import ShearSettings
    from slimgpt_core.methods.shear.train import shear_model

    torch.manual_seed(0)
    model_name = args.model or "stories260k"
    base = load_model(model_name, "cpu", "float32")
    n_layers, hidden = base.model.config.num_hidden_layers, base.model.config.hidden_size
    tok = base.tokenizer
    stream = evaluation_tokens(tok, "tinystories")
    cut = int(0.8 * stream.numel())  # the same split as pretrain's tinystories domain (shear.domains)
    train = stream[:cut]
    n_train = train.numel() // args.seqlen
    train_windows = train[: n_train * args.seqlen].view(n_train, args.seqlen)
    calib = train_windows[torch.randperm(n_train, generator=torch.Generator().manual_seed(0))[: args.nsamples]]
    texts = {"tinystories": perplexity_tokens(tok, "tinystories"), "wikitext2": perplexity_tokens(tok, "wikitext2")}

    def ppl(model) -> dict:
        return {name: ppl_with_se(model, t, 256, args.windows) for name, t in texts.items()}

    print(json.dumps({"what": "dense", "params": count_parameters(base.model), "ppl": ppl(base.model)}), flush=True)
    mask_tokens = args.steps * args.batch * args.seqlen
    for raw in args.targets:
        target = resolve_target(json.loads(raw), base.model)
        width_only = target.layers == n_layers and target.hidden == hidden
        methods = ["shear", "minitron"] + (["slimgpt"] if width_only else [])
        for method in [m for m in methods if args.methods is None or m in args.methods.split(",")]:
            m = load_model(model_name, "cpu", "float32").model
            t0 = time.perf_counter()
            masks = {}
            if method == "shear":
                res = shear_model(m, train_windows, target, ShearSettings(steps=args.steps, batch_size=args.batch,
                                                                          device="cpu"))
                used = mask_tokens
                last = res.history[-1]  # did the expected sizes reach the target before the cut?
                masks = {"final_expected": {k: round(v, 2) for k, v in last.expected.items()},
                         "final_target": {k: round(v, 2) for k, v in last.target.items()},
                         "final_loss": round(last.loss, 3)}
            elif method == "minitron":
                prune_to_shape(m, calib, target, batch_size=8)
                used = calib.numel()
            else:
                prune_model(m, calib, PruneSettings(keep_heads=[target.heads] * n_layers,
                                                    keep_ffn=[target.ffn] * n_layers, device="cpu"))
                used = calib.numel()
            row = {"target": target.to_dict(), "method": method, "params": count_parameters(m),
                   "pruning_tokens": used, "pruning_seconds": round(time.perf_counter() - t0, 1)}
            print(json.dumps({"what": "pruned", **row, **masks, "ppl": ppl(m)}), flush=True)
            # same CPT budget for every method; SlimGPT and Minitron also with shear's mask-learning tokens added
            variants = [("labels", args.cpt_steps, True), ("distill", args.cpt_steps, True)]
            if method == "shear":
                variants.append(("labels-static-mix", args.cpt_steps, False))
            else:
                extra = mask_tokens // (args.batch * args.cpt_seqlen)
                variants += [("labels+mask-budget", args.cpt_steps + extra, True),
                             ("distill+mask-budget", args.cpt_steps + extra, True)]
            if args.variants is not None:
                variants = [v for v in variants if v[0] in args.variants.split(",")]
            for name, steps, dynamic in variants:
                student = copy.deepcopy(m)
                teacher = base.model if name.startswith("distill") else None
                settings = PretrainSettings(data=["tinystories", "wikitext2", "c4"], steps=steps, dynamic_mix=dynamic,
                                            update_every=args.update_every, lr=args.cpt_lr, seqlen=args.cpt_seqlen,
                                            batch_size=args.batch, heldout=args.heldout, device="cpu", ppl=[],
                                            seed=0)
                t0 = time.perf_counter()
                res = pretrain(student, tok, settings, reference=base.model, teacher=teacher)
                print(json.dumps({"what": "pretrained", **row, "cpt": name, "cpt_steps": steps,
                                  "cpt_tokens": res.tokens_seen, "cpt_seconds": round(time.perf_counter() - t0, 1),
                                  "final_weights": {k: round(v, 3) for k, v in res.mix[-1]["weights"].items()},
                                  "sequences_per_domain": res.sequences_per_domain,
                                  "domain_loss": {k: round(v, 3) for k, v in res.mix[-1]["losses"].items()},
                                  "reference": {k: round(v, 3) for k, v in res.reference.items()},
                                  "ppl": ppl(res.model)}), flush=True)


def recipe_table(path: str) -> str:
    """One row per model: parameters, tokens spent pruning and pretraining, PPL ± (1 se in NLL, as a factor)."""
    import math

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

    def cell(p: dict) -> str:
        return f"{p['ppl']:.2f} (×{math.exp(p['nll_se']):.3f})"

    out = ["| target | method | params | pruning tokens | continued pre-training | CPT tokens | final mix (TS/WT/C4) "
           "| TinyStories PPL | WikiText-2 PPL |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("target")
        shape = "dense" if t is None else (f"{t['layers']} L, {t['kv_groups']}×{t['heads'] // t['kv_groups']} "
                                           f"heads, FFN {t['ffn']}, d {t['hidden']}")
        cpt = {"dense": "—", "pruned": "none (before)"}.get(r["what"], r.get("cpt", ""))
        mix = "/".join(f"{r['final_weights'][k]:.2f}" for k in ("tinystories", "wikitext2", "c4")) \
            if "final_weights" in r else ""
        out.append(f"| {shape} | {r.get('method', '—')} | {r['params']:,} | {r.get('pruning_tokens', 0):,} | {cpt} | "
                   f"{r.get('cpt_tokens', 0):,} | {mix} | {cell(r['ppl']['tinystories'])} | "
                   f"{cell(r['ppl']['wikitext2'])} |")
    return "\n".join(out)


def recipe_pairs(path: str) -> str:
    """Paired differences on the same windows: for each target and each stage (before, each CPT variant), every
    two methods' mean NLL difference ± its paired standard error; 'wins' when |Δ| > 2 se."""
    import itertools
    import math

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    groups: dict[tuple, dict[str, dict]] = {}
    def add(r, stage):
        groups.setdefault((json.dumps(r["target"]), stage), {})[r["method"]] = r

    for r in rows:
        if "target" not in r:
            continue
        stage, method = r.get("cpt", "before"), r["method"]
        if stage.endswith("+mask-budget"):  # SlimGPT / Minitron with shear's mask-learning tokens added
            add(r, stage.replace("+mask-budget", "") + ", equal total tokens")
            continue
        add(r, stage)
        if method == "shear" and stage in ("labels", "distill"):
            add(r, stage + ", equal total tokens")
        # each method's own recipe: shear and SlimGPT with labels, Minitron with distillation
        if (method, stage) in (("shear", "labels"), ("slimgpt", "labels"), ("minitron", "distill")):
            add(r, "own recipe (shear/SlimGPT labels, Minitron distill)")
    out = ["| target | stage | text | A vs B | ΔNLL (A − B) | paired se | verdict |", "|---|---|---|---|---|---|---|"]
    for (target, stage), methods in groups.items():
        t = json.loads(target)
        shape = f"{t['layers']} L, FFN {t['ffn']}, d {t['hidden']}"
        for a, b in itertools.combinations(sorted(methods), 2):
            for text in ("tinystories", "wikitext2"):
                x = torch.tensor(methods[a]["ppl"][text]["window_nll"], dtype=torch.float64)
                y = torch.tensor(methods[b]["ppl"][text]["window_nll"], dtype=torch.float64)
                d = x - y
                se = float(d.std() / math.sqrt(len(d)))
                mean = float(d.mean())
                verdict = "within noise" if abs(mean) <= 2 * se else (f"{b} better" if mean > 0 else f"{a} better")
                out.append(f"| {shape} | {stage} | {text} | {a} vs {b} | {mean:+.4f} | {se:.4f} | {verdict} |")
    return "\n".join(out)


def pretrain_speed_one(args) -> dict:
    from slimgpt_core.training.pretrain import pretrain
    from slimgpt_core.training.settings import PretrainSettings

    loaded = load_model(args.model, "cpu", "float32")
    teacher = load_model(args.model, "cpu", "float32").model if args.mode_detail == "distill" else None
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps = []
    settings = PretrainSettings(data=["c4", "tinystories"], steps=args.steps + 1, update_every=args.steps,
                                lora=args.mode_detail == "lora", seqlen=args.seqlen, batch_size=args.batch,
                                heldout=1, device="cpu", ppl=[], lr=1e-4)
    pretrain(loaded.model, loaded.tokenizer, settings, reference=None, teacher=teacher,
             callback=lambda e: steps.append(e) if e.kind == "pretrain-step" else None)
    # the first step pays for allocation; the mix evaluation after the last timed step is outside the steps' time
    rate = sum(args.batch * args.seqlen for _ in steps[1:]) / sum(args.batch * args.seqlen / e.tokens_per_s
                                                                    for e in steps[1:])
    return {"model": args.model, "mode": args.mode_detail, "params": count_parameters(loaded.model),
            "batch": args.batch, "seqlen": args.seqlen, "timed_steps": args.steps, "tokens_per_s": round(rate, 1),
            "seconds_per_step": round(args.batch * args.seqlen / rate, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_after_load_mb": round(rss0), "threads": torch.get_num_threads()}


def pretrain_speed(args) -> None:
    for mode in ("full", "lora", "distill"):
        cmd = [sys.executable, __file__, "pretrain-speed-one", "--model", args.model, "--steps", str(args.steps),
               "--batch", str(args.batch), "--seqlen", str(args.seqlen), "--mode-detail", mode]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        print(out, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["speed", "speed-one", "quality", "recipe", "recipe-table", "pretrain-speed",
                                     "pretrain-speed-one"])
    ap.add_argument("--input", help="recipe-table: the recipe's JSON lines")
    ap.add_argument("--mode-detail", default="full", help="pretrain-speed-one: full, lora or distill")
    ap.add_argument("--cpt-steps", type=int, default=300)
    ap.add_argument("--cpt-lr", type=float, default=1e-3)
    ap.add_argument("--cpt-seqlen", type=int, default=128)
    ap.add_argument("--update-every", type=int, default=30)
    ap.add_argument("--model", help="default: SmolLM2 (`default`) for the speed modes, stories260k for recipe")
    ap.add_argument("--methods", help="recipe: a comma list of shear, minitron, slimgpt (default: all)")
    ap.add_argument("--variants", help="recipe: a comma list of labels, distill, labels-static-mix, "
                                       "labels+mask-budget, distill+mask-budget (default: all)")
    ap.add_argument("--heldout", type=int, default=16, help="recipe: held-out windows per domain for the mix")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seqlen", type=int)
    ap.add_argument("--target", default='{"layers": 24, "kv_groups": 2, "ffn": 1024, "hidden": 512}')
    ap.add_argument("--freeze-weights", action="store_true")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--targets", nargs="+", default=['{"kv_groups": 2, "ffn": 96}',
                                                     '{"layers": 4, "kv_groups": 2, "ffn": 128, "hidden": 48}'])
    args = ap.parse_args()
    if args.mode not in ("quality", "recipe", "recipe-table"):
        args.model = args.model or "default"
    if args.mode == "recipe-table":
        print(recipe_table(args.input))
        print()
        print(recipe_pairs(args.input))
    elif args.mode in ("quality", "recipe"):
        args.steps, args.batch, args.seqlen = args.steps or 200, args.batch or 4, args.seqlen or 128
        (quality if args.mode == "quality" else recipe)(args)
    elif args.mode.startswith("pretrain-speed"):
        args.steps, args.batch, args.seqlen = args.steps or 4, args.batch or 1, args.seqlen or 256
        (pretrain_speed if args.mode == "pretrain-speed" else lambda a: print(json.dumps(pretrain_speed_one(a))))(args)
    else:
        args.steps, args.batch, args.seqlen = args.steps or 4, args.batch or 1, args.seqlen or 256
        (speed if args.mode == "speed" else lambda a: print(json.dumps(speed_one(a))))(args)


if __name__ == "__main__":
    main()
