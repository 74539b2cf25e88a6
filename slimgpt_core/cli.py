"""Command line: `python -m slimgpt_core prune|eval ...` (flag names are a contract: other tools call them)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .errors import SlimGPTError


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _floats(text: str) -> list[float]:
    from .schedule import parse_ratio_list
    try:
        return parse_ratio_list(text)
    except SlimGPTError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read a list of integers from {text!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="hub id, local HF folder, .gguf file, a pruned run folder, or an alias: default/smollm2, "
                        "stories260k (offline assets)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, fp16 on CUDA), float32, float16, bfloat16")
    p.add_argument("--batch-size", type=_positive, default=8, help="sequences per forward pass")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m slimgpt_core", description="SlimGPT structured pruning of causal LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune attention heads and FFN channels layer by layer with OBS compensation")
    _common(p)
    p.add_argument("--ratio", type=_ratio, default=0.2, help="target mean pruning ratio per layer, in [0, 1)")
    p.add_argument("--schedule", choices=["log", "linear", "uniform", "auto"], default="log",
                   help="how the ratio grows with depth (log: Incremental Pruning Ratio)")
    p.add_argument("--shape", type=float, default=4.0, help="last/first layer ratio for log and linear schedules")
    p.add_argument("--target-params", type=_positive,
                   help="auto: parameters of the pruned model (default: --ratio of the decoder layers' parameters)")
    p.add_argument("--ceiling", type=_ratio, default=0.9, help="auto: at most this fraction of a layer's KV groups "
                   "or channels removed")
    p.add_argument("--search-generations", type=_positive, default=200, help="auto: generations of the search")
    p.add_argument("--search-seconds", type=float, help="auto: stop the search after this many seconds")
    p.add_argument("--fitness-samples", type=_positive, default=8,
                   help="auto: calibration sequences (other windows, seed+1) the search's KL is measured on")
    p.add_argument("--fitness-seqlen", type=_positive, default=128, help="auto: their length")
    p.add_argument("--head-ratio", type=_ratio, help="mean ratio for attention heads only (default: --ratio)")
    p.add_argument("--ffn-ratio", type=_ratio, help="mean ratio for FFN channels only (default: --ratio)")
    p.add_argument("--head-ratios", type=_floats, help="custom per-layer head ratios, comma separated")
    p.add_argument("--ffn-ratios", type=_floats, help="custom per-layer FFN ratios, comma separated")
    p.add_argument("--keep-heads", type=_ints, help="custom per-layer query heads to keep (overrides ratios)")
    p.add_argument("--keep-ffn", type=_ints, help="custom per-layer FFN channels to keep (overrides ratios)")
    p.add_argument("--calib", default="c4", help="c4, wikitext2, tinystories, or a local .txt/.jsonl file")
    p.add_argument("--nsamples", type=_positive, default=128, help="calibration sequences")
    p.add_argument("--seqlen", type=_positive, default=2048, help="calibration sequence length")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows")
    p.add_argument("--damp", type=float, default=0.01, help="Hessian damping λ (fraction of mean diagonal)")
    p.add_argument("--head-error", choices=["exact", "approx"], default="exact",
                   help="exact group OBS error, or the authors' cheaper approximation")
    p.add_argument("--ffn-group-floor", type=_positive, default=64, help="smallest FFN group (1 with ceiling 1: greedy)")
    p.add_argument("--ffn-group-ceiling", type=_positive, default=1024, help="largest FFN group")
    p.add_argument("--dense-inputs", action="store_true",
                   help="calibrate every layer on the dense model's inputs (no error accumulation)")
    p.add_argument("--ppl", help="also measure dense and pruned perplexity on this text (e.g. wikitext2)")
    p.add_argument("--ppl-seqlen", type=_positive, default=128, help="perplexity window length")
    p.add_argument("--ppl-windows", type=_positive, help="at most this many perplexity windows")
    p.add_argument("--method", choices=["slimgpt", "magnitude", "wanda-sp", "surgeon"], default="slimgpt",
                   help="SlimGPT, or a baseline from the seed papers (same pipeline, events and export)")
    p.add_argument("--no-compensation", action="store_true", help="ablation: OBS choice without weight update")
    p.add_argument("--shots", type=_positive, default=3, help="surgeon: passes with linearly rising sparsity")
    p.add_argument("--target-config", help="prune to another model's shape: its config.json (or folder / hub id)")
    p.add_argument("--offload-activations", choices=["auto", "never", "always"], default="auto",
                   help="calibration activations in pinned CPU memory (auto: when they do not fit the GPU)")
    p.add_argument("--tf32", action="store_true", help="TF32 for layer forwards on CUDA (statistics stay fp32)")
    p.add_argument("--no-accumulation", action="store_true",
                   help="skip the reference forward that measures accumulated error (faster)")
    p.add_argument("--out", required=True, help="folder for the pruned model and report.json (must not exist)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="perplexity, zero-shot tasks and speed of a model (dense or pruned)")
    _common(e)
    e.add_argument("--ppl", help="perplexity text: wikitext2, tinystories, c4, or a local .txt/.jsonl file "
                                 "(default wikitext2 when neither --tasks nor --speed is given)")
    e.add_argument("--seqlen", type=_positive, default=128, help="perplexity window length")
    e.add_argument("--max-windows", type=_positive, help="at most this many perplexity windows (default: all)")
    e.add_argument("--tasks", help="zero-shot tasks, comma separated: boolq,piqa,hellaswag,winogrande,arc_easy,"
                                   "arc_challenge,openbookqa")
    e.add_argument("--limit", type=_positive, help="at most this many documents per task")
    e.add_argument("--speed", action="store_true", help="measure prefill latency and decode tokens/s")
    e.add_argument("--speed-batches", type=_ints, default=[1, 8], help="batch sizes for --speed")
    e.add_argument("--speed-lengths", type=_ints, default=[128, 512], help="prompt lengths for --speed")
    e.add_argument("--new-tokens", type=_positive, default=32, help="tokens generated per point for --speed")
    e.add_argument("--baseline", help="also evaluate this model (e.g. the dense source) the same way, side by side")
    e.add_argument("--no-cache", action="store_true", help="recompute instead of reusing cached results")
    e.add_argument("--json", help="write the results here as JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bars")

    x = sub.add_parser("export", help="write a checkpoint that transformers loads (and optionally a zip)")
    x.add_argument("--model", required=True, help="a pruned run folder or any model")
    x.add_argument("--out", required=True, help="checkpoint folder to write (must not exist)")
    x.add_argument("--zip", action="store_true", help="also write OUT.zip")
    x.add_argument("--dtype", default="auto", help="weights' dtype: auto (as stored), float32, float16, bfloat16")
    x.add_argument("--force", action="store_true", help="replace --out if it exists")

    g = sub.add_parser("compare", help="grid of methods and ablations × ratios, table and plots")
    g.add_argument("--model", default="default")
    g.add_argument("--device", default="auto")
    g.add_argument("--ratios", default="0.2,0.5")
    g.add_argument("--variants", default="slimgpt,magnitude,wanda-sp,surgeon,slimgpt-nocomp,slimgpt-approx,"
                                         "slimgpt-greedy,slimgpt-dense,slimgpt-uniform,slimgpt-linear")
    g.add_argument("--calib", default="c4")
    g.add_argument("--nsamples", type=_positive, default=32)
    g.add_argument("--seqlen", type=_positive, default=256)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ppl", default="wikitext2")
    g.add_argument("--ppl-seqlen", type=_positive, default=128)
    g.add_argument("--ppl-windows", type=_positive, default=64)
    g.add_argument("--tasks", help="zero-shot tasks, comma separated (default: none)")
    g.add_argument("--limit", type=_positive, default=50)
    g.add_argument("--auto-generations", type=_positive, default=100, help="slimgpt-auto: search generations")
    g.add_argument("--auto-seconds", type=float, help="slimgpt-auto: stop each search after this many seconds")
    g.add_argument("--out", required=True, help="folder for compare.md, compare.csv, compare.json and plots")
    g.add_argument("--quiet", action="store_true")

    c = sub.add_parser("cache", help="show or clear cache/")
    c.add_argument("action", choices=["info", "clear"])
    c.add_argument("--kind", choices=["models", "tokens", "stats", "results"], help="only this part of the cache")
    return parser


class _TerminalProgress:
    """Layer i/L, phase and elapsed time on one line (tqdm on stderr)."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def __call__(self, event) -> None:
        if self.quiet or event.kind != "progress":
            return
        from tqdm import tqdm
        if self.bar is None:
            self.bar = tqdm(total=event.n_layers, unit="layer", desc="prune", file=sys.stderr)
        self.bar.n = event.layer + (1 if event.phase == "done" else 0)
        self.bar.set_postfix_str(f"layer {event.layer + 1}/{event.n_layers} {event.phase}")
        if event.phase == "done":
            self.bar.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _bar(quiet: bool, desc: str, unit: str):
    from tqdm import tqdm
    bar = None if quiet else tqdm(desc=desc, unit=unit, file=sys.stderr)

    def update(done, total, *_):
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()
    return bar, update


def _ppl(model, tokenizer, source, seqlen, windows, batch, device, quiet, label, use_cache=True):
    from .evaluate import cached_perplexity

    bar, update = _bar(quiet, f"ppl {label}".strip(), "window")
    try:
        return cached_perplexity(model, tokenizer, source, seqlen, batch, windows, device, update, use_cache=use_cache)
    finally:
        if bar is not None:
            bar.close()


def _init_distributed(device: str) -> tuple[int, int, str]:
    """Under torchrun (WORLD_SIZE > 1): join the process group; gloo on CPU, NCCL on GPUs (one per rank)."""
    import os

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return dist.get_rank(), world, device


def cmd_prune(args) -> int:
    rank, world, args.device = _init_distributed(args.device)
    try:
        return _cmd_prune(args, rank)
    finally:
        if world > 1:
            import torch.distributed as dist
            dist.barrier()
            dist.destroy_process_group()


def _cmd_prune(args, rank: int) -> int:
    from .data import calibration_tokens
    from .models import load_model, resolve_device
    from .pipeline import PruneSettings, activation_streams, check_memory, plan_removals, prune_model
    from .runs import check_output_folder, save_run

    out = check_output_folder(args.out, args.force)
    settings = PruneSettings(
        ratio=args.ratio, schedule=args.schedule, shape=args.shape, head_ratio=args.head_ratio,
        ffn_ratio=args.ffn_ratio, head_ratios=args.head_ratios, ffn_ratios=args.ffn_ratios,
        keep_heads=args.keep_heads, keep_ffn=args.keep_ffn, damp=args.damp, head_error=args.head_error,
        ffn_group_floor=args.ffn_group_floor, ffn_group_ceiling=args.ffn_group_ceiling,
        sequential=not args.dense_inputs, batch_size=args.batch_size, device=args.device, method=args.method,
        compensate=not args.no_compensation, shots=args.shots, offload_activations=args.offload_activations,
        tf32=args.tf32, track_accumulation=not args.no_accumulation)
    device = resolve_device(args.device)
    loaded = load_model(args.model, args.device, args.dtype)
    model = loaded.model
    if args.target_config:
        settings.keep_heads, settings.keep_ffn = _target(args.target_config, model)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and args.seqlen > limit:
        raise SlimGPTError(f"--seqlen {args.seqlen} exceeds the model's context of {limit} tokens")
    if args.schedule != "auto":  # auto: validated once the search has chosen the counts
        plan_removals(model, settings)  # validate the schedule against the model before any work
    check_memory(model, args.nsamples, args.seqlen, device, 2 * sum(activation_streams(settings)))
    tokens = calibration_tokens(loaded.tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
    evaluation = {}
    if args.ppl and rank == 0:
        model.to(device)
        evaluation["dense_ppl"] = asdict(_ppl(model, loaded.tokenizer, args.ppl, args.ppl_seqlen, args.ppl_windows,
                                              args.batch_size, device, args.quiet, "dense"))
        model.to("cpu")
    auto = _auto_schedule(args, loaded, tokens, settings) if args.schedule == "auto" else None
    progress = _TerminalProgress(args.quiet or rank > 0)
    try:
        report = prune_model(model, tokens, settings, progress, model_name=loaded.name)
    finally:
        progress.close()
    report.settings.update(calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                           dtype=str(next(model.parameters()).dtype))
    if auto is not None:
        report.settings["auto"] = {k: v for k, v in asdict(auto).items() if k != "history"}
    if rank > 0:
        return 0  # every rank holds the same pruned model; rank 0 writes it
    if args.ppl:
        model.to(device)
        evaluation["pruned_ppl"] = asdict(_ppl(model, loaded.tokenizer, args.ppl, args.ppl_seqlen, args.ppl_windows,
                                               args.batch_size, device, args.quiet, "pruned"))
        model.to("cpu")
    report.evaluation = evaluation
    save_run(model, loaded.tokenizer, report, out, args.force)
    summary = {"out": str(out), "params_before": report.params_before, "params_after": report.params_after,
               "requested_ratio": round(report.requested_ratio, 4),
               "achieved_layer_ratio": round(report.achieved_layer_ratio, 4),
               "achieved_ratio": round(report.achieved_ratio, 4), "seconds": round(report.total_seconds, 1)}
    for key, value in evaluation.items():
        summary[key] = round(value["ppl"], 3)
    print(json.dumps(summary))
    return 0


def _auto_schedule(args, loaded, tokens, settings):
    """Search the per-layer counts for the budget (autoschedule.py) and put them into `settings`."""
    from .autoschedule import AutoSettings, search
    from .data import calibration_tokens
    from .schedule import layer_ratios

    fitness = calibration_tokens(loaded.tokenizer, args.calib, args.fitness_samples, args.fitness_seqlen,
                                 args.seed + 1)
    auto = AutoSettings(target_params=args.target_params, ratio=args.ratio, ceiling=args.ceiling,
                        generations=args.search_generations, max_seconds=args.search_seconds, shape=args.shape,
                        seed=args.seed, damp=args.damp, batch_size=args.batch_size, device=args.device)

    def show(event):
        if not args.quiet and event.phase in ("search", "done") and event.generation % 10 == 0:
            print(f"auto: generation {event.generation} KL {event.best_kl:.4f} (start {event.start_kl:.4f}, "
                  f"{event.evaluations} evaluations, {event.elapsed_s:.0f} s)", file=sys.stderr)
    n = len(loaded.model.model.layers)
    starts = {kind: (layer_ratios(n, args.ratio, kind, args.shape),) * 2 for kind in ("log", "linear", "uniform")} \
        if args.target_params is None else None
    result = search(loaded.model, tokens, fitness, auto, show, starts=starts)
    loaded.model.to("cpu")
    settings.keep_heads, settings.keep_ffn = result.keep_heads, result.keep_ffn
    settings.head_ratios, settings.ffn_ratios = result.head_ratios, result.ffn_ratios
    return result


def _evaluate_one(name, args, device) -> dict:
    from .models import load_model
    from .speed import measure_speed
    from .zeroshot import zero_shot

    loaded = load_model(name, args.device, args.dtype)
    model = loaded.model.to(device)
    out: dict = {"model": name}
    if args.ppl:
        out["perplexity"] = asdict(_ppl(model, loaded.tokenizer, args.ppl, args.seqlen, args.max_windows,
                                        args.batch_size, device, args.quiet, name, not args.no_cache))
    if args.tasks:
        bar, update = _bar(args.quiet, f"tasks {name}", "task")
        try:
            results = zero_shot(model, loaded.tokenizer, args.tasks, args.limit, args.batch_size, update,
                                use_cache=not args.no_cache)
        finally:
            if bar is not None:
                bar.close()
        out["tasks"] = {t: asdict(r) for t, r in results.items()}
        out["tasks_mean_acc"] = sum(r.acc for r in results.values()) / len(results)
    if args.speed:
        out["speed"] = asdict(measure_speed(model, args.speed_batches, args.speed_lengths, args.new_tokens,
                                            folder=loaded.path))
    return out


def _target(spec: str, model):
    from .models import load_config
    from .surgery import target_shape

    path = Path(spec)
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except ValueError:
            raise SlimGPTError(f"{spec} is not a JSON config") from None
    else:
        config = load_config(spec)[0].to_dict()
    return target_shape(config, model)


def cmd_compare(args) -> int:
    from .compare import parse_variants, run_grid, write_outputs
    from .zeroshot import parse_tasks

    variants = parse_variants(args.variants)
    tasks = parse_tasks(args.tasks) if args.tasks else []
    ratios = [float(r) for r in args.ratios.split(",")]
    for r in ratios:
        if not 0 <= r < 1:
            raise SlimGPTError(f"ratio must be in [0, 1), got {r}")
    progress = _TerminalProgress(args.quiet)
    rows = run_grid(args.model, ratios, variants, args.calib, args.nsamples, args.seqlen, args.seed, args.ppl,
                    args.ppl_seqlen, args.ppl_windows, tasks, args.limit, device=args.device, callback=progress,
                    auto_generations=args.auto_generations, auto_seconds=args.auto_seconds)
    progress.close()
    # the equivalent command line, whatever called us (CLI, bench/compare.py)
    command = (f"python -m slimgpt_core compare --model {args.model} --ratios {args.ratios} --variants "
               f"{','.join(variants)} --calib {args.calib} --nsamples {args.nsamples} --seqlen {args.seqlen} "
               f"--seed {args.seed} --ppl {args.ppl} --ppl-seqlen {args.ppl_seqlen} --ppl-windows {args.ppl_windows}"
               + (f" --tasks {','.join(tasks)} --limit {args.limit}" if tasks else "")
               + (f" --auto-generations {args.auto_generations}" + (f" --auto-seconds {args.auto_seconds}"
                  if args.auto_seconds else "") if "slimgpt-auto" in variants else "") + f" --out {args.out}")
    paths = write_outputs(rows, args.out, command, {"model": args.model, "calibration":
                                                     f"{args.calib} {args.nsamples}x{args.seqlen} seed {args.seed}",
                                                     "perplexity": f"{args.ppl} windows of {args.ppl_seqlen}, "
                                                                   f"at most {args.ppl_windows}",
                                                     "tasks": f"{','.join(tasks) or 'none'} limit {args.limit}"})
    print(json.dumps({"rows": len(rows), "files": [str(p) for p in paths]}))
    return 0


def cmd_eval(args) -> int:
    from .models import resolve_device
    from .zeroshot import parse_tasks

    if not (args.ppl or args.tasks or args.speed):
        args.ppl = "wikitext2"
    if args.tasks:
        args.tasks = parse_tasks(args.tasks)
    device = resolve_device(args.device)
    payload = _evaluate_one(args.model, args, device)
    if args.baseline:
        payload["baseline"] = _evaluate_one(args.baseline, args, device)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(path)
    print(json.dumps(_eval_summary(payload)))
    return 0


def _eval_summary(payload: dict) -> dict:
    summary = {"model": payload["model"]}
    if "perplexity" in payload:
        p = payload["perplexity"]
        summary.update(ppl=round(p["ppl"], 4), dataset=p["dataset"], seqlen=p["seqlen"], windows=p["windows"])
    if "tasks" in payload:
        summary["acc"] = {t: round(r["acc"], 4) for t, r in payload["tasks"].items()}
        summary["mean_acc"] = round(payload["tasks_mean_acc"], 4)
    if "speed" in payload:
        summary["decode_tokens_per_s"] = {f"b{p['batch']}x{p['prompt_len']}": round(p["decode_tokens_per_s"], 1)
                                          for p in payload["speed"]["points"]}
        summary["prefill_ms"] = {f"b{p['batch']}x{p['prompt_len']}": round(p["prefill_ms"], 1)
                                 for p in payload["speed"]["points"]}
    if "baseline" in payload:
        summary["baseline"] = _eval_summary(payload["baseline"])
    return summary


def cmd_export(args) -> int:
    from .export import export_model

    result = export_model(args.model, args.out, args.zip, args.force, args.dtype)
    print(json.dumps({"out": str(result.folder), "zip": str(result.zip_path) if result.zip_path else None,
                      "remote_code": result.heterogeneous, "parameters": result.parameters, "files": result.files}))
    return 0


def cmd_cache(args) -> int:
    from . import cache

    if args.action == "clear":
        freed = cache.clear(args.kind)
        print(json.dumps({"cleared": args.kind or "all", "bytes_freed": freed}))
    else:
        print(json.dumps(cache.info(), indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"prune": cmd_prune, "eval": cmd_eval, "export": cmd_export, "cache": cmd_cache,
                "compare": cmd_compare}[args.command](args)
    except SlimGPTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory: lower --nsamples, --seqlen or --batch-size", file=sys.stderr)
        return 1
