"""The commands: each reads its arguments into settings, calls one service (slimgpt_core/services/) and prints a
JSON summary on stdout; progress goes to stderr."""
from __future__ import annotations

import json
import os
from pathlib import Path

from slimgpt_core.base import cache
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.cli import progress
from slimgpt_core.cli.parser import comma_list, prune_settings_from_args, settings_from_args
from slimgpt_core.evaluation.zeroshot import parse_tasks
from slimgpt_core.methods.shear.settings import ShearSettings
from slimgpt_core.methods.shear.target import read_target
from slimgpt_core.services.compare import parse_variants, run_grid, write_outputs
from slimgpt_core.services.evaluate import EvalPlan, evaluate_named
from slimgpt_core.services.export import export_to
from slimgpt_core.services.pretrain import pretrain_to_folder
from slimgpt_core.services.prune import AutoRequest, Calibration, PruneRequest, prune_to_folder
from slimgpt_core.services.recover import recover_to_folder
from slimgpt_core.services.shear import ShearRequest, shear_to_folder
from slimgpt_core.training.distributed import join_process_group, leave_process_group, on_every_rank
from slimgpt_core.training.settings import PretrainSettings, RecoverSettings
from slimgpt_core.workspace import store as workspace


def use_runs(args) -> None:
    """--runs moves the workspace for this process (the studio reads the same variable)."""
    if getattr(args, "runs", None):
        os.environ["SLIMGPT_RUNS"] = str(Path(args.runs).expanduser())


def print_summary(summary: dict | None) -> int:
    if summary is not None:  # None: a process other than rank 0 of a torchrun job (rank 0 saves and prints)
        print(json.dumps(summary))
    return 0


def cmd_prune(args) -> int:
    rank, world, args.device = join_process_group(args.device)
    try:
        use_runs(args)
        request = PruneRequest(
            args.model, prune_settings_from_args(args),
            Calibration(args.calib, args.nsamples, args.seqlen, args.seed), args.out, args.force, args.label,
            args.dtype, args.ppl, args.ppl_seqlen, args.ppl_windows, args.target_config,
            AutoRequest(args.budget_scope, args.target_params, args.min_keep, args.ceiling, args.auto_seconds,
                        args.search_generations, args.fitness_samples, args.fitness_seqlen))
        bar = progress.PruneProgress(args.quiet or rank > 0)
        try:
            summary = prune_to_folder(request, bar, progress.bars(args.quiet), progress.auto_lines(args.quiet), rank)
        finally:
            bar.close()
        if rank == 0:
            print(json.dumps(summary))
        return 0
    finally:
        if world > 1:
            leave_process_group()


def cmd_eval(args) -> int:
    plan = EvalPlan(args.ppl or (None if args.tasks or args.speed else "wikitext2"), args.seqlen, args.ppl_windows,
                    parse_tasks(args.tasks) if args.tasks else [], args.limit, args.speed, args.speed_batches,
                    args.speed_lengths, args.new_tokens, 3, args.batch_size, not args.no_cache)
    bars = progress.bars(args.quiet)
    payload = evaluate_named(args.model, plan, args.device, args.dtype, bars)
    if args.baseline:
        payload["baseline"] = evaluate_named(args.baseline, plan, args.device, args.dtype, bars)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(path)
    print(json.dumps(eval_summary(payload)))
    return 0


def eval_summary(payload: dict) -> dict:
    summary = {"model": payload["model"]}
    if "perplexity" in payload:
        p = payload["perplexity"]
        summary.update(ppl=round(p["ppl"], 4), dataset=p["dataset"], seqlen=p["seqlen"], windows=p["windows"])
    if "tasks" in payload:
        summary["acc"] = {t: round(r["acc"], 4) for t, r in payload["tasks"].items()}
        summary["mean_acc"] = round(payload["tasks_mean_acc"], 4)
    if "speed" in payload:
        points = payload["speed"]["points"]
        summary["decode_tokens_per_s"] = {f"b{p['batch']}x{p['prompt_len']}": round(p["decode_tokens_per_s"], 1)
                                          for p in points}
        summary["prefill_ms"] = {f"b{p['batch']}x{p['prompt_len']}": round(p["prefill_ms"], 1) for p in points}
    if "baseline" in payload:
        summary["baseline"] = eval_summary(payload["baseline"])
    return summary


def cmd_export(args) -> int:
    print(json.dumps(export_to(args.model, args.out, args.format, args.zip, args.dtype, args.weight_type,
                               args.force)))
    return 0


def cmd_compare(args) -> int:
    variants = parse_variants(args.variants)
    tasks = parse_tasks(args.tasks) if args.tasks else []
    ratios = [float(r) for r in args.ratios.split(",")]
    for r in ratios:
        if not 0 <= r < 1:
            raise SlimGPTError(f"ratio must be in [0, 1), got {r}")
    bar = progress.PruneProgress(args.quiet)
    rows = run_grid(args.model, ratios, variants, args.calib, args.nsamples, args.seqlen, args.seed, args.ppl,
                    args.ppl_seqlen, args.ppl_windows, tasks, args.limit, device=args.device, callback=bar,
                    auto_generations=args.auto_generations, auto_seconds=args.auto_seconds)
    bar.close()
    paths = write_outputs(rows, args.out, compare_command(args, variants, tasks), {
        "model": args.model, "calibration": f"{args.calib} {args.nsamples}x{args.seqlen} seed {args.seed}",
        "perplexity": f"{args.ppl} windows of {args.ppl_seqlen}, at most {args.ppl_windows}",
        "tasks": f"{','.join(tasks) or 'none'} limit {args.limit}"})
    print(json.dumps({"rows": len(rows), "files": [str(p) for p in paths]}))
    return 0


def compare_command(args, variants: list[str], tasks: list[str]) -> str:
    """The equivalent command line, whatever called us (CLI, bench/compare.py)."""
    auto = ""
    if "slimgpt-auto" in variants:
        auto = f" --auto-generations {args.auto_generations}" + (
            f" --auto-seconds {args.auto_seconds}" if args.auto_seconds else "")
    return (f"python -m slimgpt_core compare --model {args.model} --ratios {args.ratios} --variants "
            f"{','.join(variants)} --calib {args.calib} --nsamples {args.nsamples} --seqlen {args.seqlen} "
            f"--seed {args.seed} --ppl {args.ppl} --ppl-seqlen {args.ppl_seqlen} --ppl-windows {args.ppl_windows}"
            + (f" --tasks {','.join(tasks)} --limit {args.limit}" if tasks else "") + auto + f" --out {args.out}")


def cmd_shear(args) -> int:
    args.device = join_process_group(args.device)[2]
    return on_every_rank(lambda: _shear(args))


def _shear(args) -> int:
    settings = settings_from_args(ShearSettings, args, batch_size=args.batch_size, device=args.device)
    request = ShearRequest(read_target(args.target), settings, comma_list(args.data), args.seqlen, args.method,
                           args.nsamples, args.ppl, args.ppl_seqlen, args.ppl_windows, "--seqlen")
    return print_summary(shear_to_folder(args.model, request, args.out, args.force, args.dtype,
                                         progress.shear_lines(args.quiet)))


def cmd_recover(args) -> int:
    args.device = join_process_group(args.device)[2]
    return on_every_rank(lambda: _recover(args))


def _recover(args) -> int:
    settings = settings_from_args(RecoverSettings, args, device=args.device)
    bar = progress.RecoverProgress(args.quiet)
    try:
        summary = recover_to_folder(args.model, settings, args.out, args.force, args.dtype, bar)
    finally:
        bar.close()
    return print_summary(summary)


def cmd_pretrain(args) -> int:
    args.device = join_process_group(args.device)[2]
    return on_every_rank(lambda: _pretrain(args))


def _pretrain(args) -> int:
    use_runs(args)
    settings = settings_from_args(PretrainSettings, args, device=args.device)
    return print_summary(pretrain_to_folder(args.model, settings, args.out, args.teacher, args.reference, args.dtype,
                                            args.force, args.label, progress.pretrain_lines(args.quiet)))


def cmd_cache(args) -> int:
    if args.action == "clear":
        freed = cache.clear(args.kind)
        print(json.dumps({"cleared": args.kind or "all", "bytes_freed": freed}))
    else:
        print(json.dumps(cache.info(), indent=1))
    return 0


def cmd_runs(args) -> int:
    use_runs(args)
    if args.delete:
        workspace.delete_run(args.delete)
        print(json.dumps({"deleted": args.delete}))
        return 0
    listed = workspace.list_runs()
    if args.json:
        print(json.dumps([workspace.as_dict(r) for r in listed], indent=1, default=str))
        return 0
    print(f"{'run':40} {'model':16} {'schedule':10} {'achieved':>8} {'ppl':>9} {'MB':>7}  label")
    for r in listed:
        s, ppl = r.summary, r.perplexity
        if r.broken:
            print(f"{r.name:40} broken: {r.broken}")
            continue
        ach = s.get("achieved_layer_ratio")
        achieved = "" if ach is None else f"{ach:.1%}"
        ppl_text = "" if ppl is None else f"{ppl['ppl']:.2f}"
        print(f"{r.name:40} {str(s.get('model', ''))[:16]:16} {str(s.get('schedule', ''))[:10]:10} {achieved:>8} "
              f"{ppl_text:>9} {r.size_bytes / 2**20:7.1f}  {r.label}")
    return 0


COMMANDS = {"prune": cmd_prune, "eval": cmd_eval, "export": cmd_export, "cache": cmd_cache, "compare": cmd_compare,
            "runs": cmd_runs, "shear": cmd_shear, "recover": cmd_recover, "pretrain": cmd_pretrain}
