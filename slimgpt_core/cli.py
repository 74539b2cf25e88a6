"""Command line: `python -m slimgpt_core prune|eval ...` (flag names are a contract: other tools call them)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from slimgpt_core import data
from slimgpt_core.base import cache
from slimgpt_core.base.atomic import check_output_folder
from slimgpt_core.base.devices import resolve_device
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.shapes import check_context_length, target_shape
from slimgpt_core.evaluation.evaluate import cached_perplexity
from slimgpt_core.workspace.gguf import export_gguf
from slimgpt_core.evaluation.speed import measure_speed
from slimgpt_core.evaluation.zeroshot import parse_tasks, zero_shot
from slimgpt_core.methods.activations import activation_streams, check_memory
from slimgpt_core.methods.minitron import shape_run
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings, plan_removals
from slimgpt_core.methods.shear.target import read_target, resolve_target
from slimgpt_core.methods.shear.train import ShearSettings, shear_model
from slimgpt_core.models import load_config, load_model
from slimgpt_core.schedules.global_allocation import BudgetSpec
from slimgpt_core.schedules.refine import AutoConfig, auto_schedule
from slimgpt_core.schedules.schedule import parse_ratio_list
from slimgpt_core.services.compare import parse_variants, run_grid, write_outputs
from slimgpt_core.services.pretrain_job import load_companion, save_pretrained_run
from slimgpt_core.services.recover import save_recovered_run
from slimgpt_core.services.shear_run import (check_training_memory, describe_step as describe_shear_step,
                                             save_shear_run, target_summary, training_tokens)
from slimgpt_core.training.distributed import join_process_group, on_every_rank
from slimgpt_core.training.pretrain import (PretrainSettings, describe_step as describe_pretrain_step, describe_update,
                                            pretrain, summary as pretrain_summary)
from slimgpt_core.training.recover import RecoverSettings, load_source_report, recover, summary as recovery_summary
from slimgpt_core.workspace import store as workspace
from slimgpt_core.workspace.exports import export_model
from slimgpt_core.workspace.store import META, add_measurement, new_run_name, runs_root


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


def _align(text: str) -> int | None:
    return None if text == "auto" else _positive(text)


def _floats(text: str) -> list[float]:
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


def _ppl_options(p: argparse.ArgumentParser, default: str | None, help: str, windows: int | None) -> None:
    """--ppl TEXT(S), --ppl-seqlen, --ppl-windows: the perplexity a command measures before and after."""
    p.add_argument("--ppl", default=default, help=help)
    p.add_argument("--ppl-seqlen", type=_positive, default=128, help="perplexity window length")
    p.add_argument("--ppl-windows", type=_positive, default=windows, help="at most this many perplexity windows")


def _training_device_options(p: argparse.ArgumentParser, dtype_help: str) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when available, bf16 autocast), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", help=dtype_help)


def _runs_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", help="the workspace folder of runs (default: $SLIMGPT_RUNS, else runs/ in the project)")


def _scale_options(p: argparse.ArgumentParser) -> None:
    """Training past one process (launch with torchrun) and runs that resume."""
    p.add_argument("--checkpoint-dir", help="folder for sharded checkpoints a killed run resumes from")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each layer's activations in the backward pass (less memory, more compute)")


def _scale_settings(args) -> dict:
    return dict(checkpoint_folder=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
                activation_checkpointing=args.activation_checkpointing)


def _use_runs(args) -> None:
    """--runs moves the workspace for this process (the studio reads the same variable)."""
    if getattr(args, "runs", None):
        os.environ["SLIMGPT_RUNS"] = str(Path(args.runs).expanduser())


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
    p.add_argument("--budget-scope", choices=["layers", "model"], default="layers",
                   help="auto: --ratio is a fraction of the decoder layers' parameters or of the whole model's")
    p.add_argument("--min-keep", type=_ratio, help="auto: every layer keeps at least this fraction of its KV groups "
                   "and of its FFN channels (default 0.1; at least one of each)")
    p.add_argument("--ceiling", type=_ratio, help="auto: at most this fraction of a layer's KV groups or channels "
                   "removed (the same as --min-keep 1-C)")
    p.add_argument("--auto-seconds", "--search-seconds", dest="auto_seconds", type=float, default=600.0,
                   help="auto: the fast schedule, then a KL search refining it until this many seconds have passed "
                        "(0: the fast schedule only)")
    p.add_argument("--search-generations", type=_positive, help="auto: stop the search after this many generations")
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
    p.add_argument("--align", type=_align, default=None, metavar="N|auto",
                   help="keep a multiple of N FFN channels in every pruned layer (32: llama.cpp's Q8_0 blocks, 256: "
                   "its K-quants; 1: any width); auto (default): 32 where the dense width is a multiple of 32 and at "
                   "least 512 wide")
    p.add_argument("--ffn-group-floor", type=_positive, default=64, help="smallest FFN group (1 with ceiling 1: greedy)")
    p.add_argument("--ffn-group-ceiling", type=_positive, default=1024, help="largest FFN group")
    p.add_argument("--dense-inputs", action="store_true",
                   help="calibrate every layer on the dense model's inputs (no error accumulation)")
    _ppl_options(p, None, "also measure dense and pruned perplexity on this text (e.g. wikitext2)", None)
    p.add_argument("--method", choices=["slimgpt", "magnitude", "wanda-sp", "surgeon", "kobd", "obs-multishot",
                                        "minitron"],
                   default="slimgpt", help="SlimGPT, or a baseline from the seed papers (same pipeline, events and "
                                           "export); surgeon: LLM Surgeon (KFAC, global threshold, --shots); kobd: "
                                           "its costs without update; obs-multishot: layer-wise OBS in --shots passes; "
                                           "minitron: activation importance, no update")
    p.add_argument("--no-compensation", action="store_true", help="ablation: OBS choice without weight update")
    p.add_argument("--shots", type=_positive, default=3,
                   help="surgeon, kobd, obs-multishot: shots with linearly rising sparsity")
    p.add_argument("--surgeon-units", choices=["heads", "rows"], default="heads",
                   help="surgeon/kobd units: heads (KV groups + FFN channels: a smaller model) or rows (every row "
                        "and column, the paper's units: zeros, the model keeps its size)")
    p.add_argument("--fisher", choices=["empirical", "true"], default="empirical",
                   help="surgeon/kobd curvature: labels from the data, or sampled from the model")
    p.add_argument("--surgeon-update", choices=["dead-rows", "both", "columns"], default="dead-rows",
                   help="surgeon, heads units: a KV group/FFN channel goes through its o_proj/down_proj columns (cost "
                        "and update) and its q/k/v/gate/up rows are dead (default); both: summed costs, rows and "
                        "columns compensated (over-compensates, docs/surgeon.md); columns: summed costs, columns only")
    p.add_argument("--surgeon-lora-steps", type=int, default=0,
                   help="surgeon/kobd: LoRA steps (rank 8, lr 1e-4) on the calibration data after every shot, "
                        "merged before the next (off: 0)")
    p.add_argument("--kfac-positions", type=_positive,
                   help="surgeon/kobd: token positions per sequence feeding the KFAC factors (sub-sample; CPU)")
    p.add_argument("--target-config", help="prune to another model's shape: its config.json (or folder / hub id)")
    p.add_argument("--offload-activations", choices=["auto", "never", "always"], default="auto",
                   help="calibration activations in pinned CPU memory (auto: when they do not fit the GPU)")
    p.add_argument("--tf32", action="store_true", help="TF32 for layer forwards on CUDA (statistics stay fp32)")
    p.add_argument("--no-accumulation", action="store_true",
                   help="skip the reference forward that measures accumulated error (faster)")
    p.add_argument("--out", help="folder for the pruned model and report.json (must not exist); default: a new "
                                 "folder in the workspace (--runs), where the studio lists it")
    p.add_argument("--label", default="", help="the run's label in the studio's list")
    _runs_option(p)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="perplexity, zero-shot tasks and speed of a model (dense or pruned)")
    _common(e)
    e.add_argument("--ppl", help="perplexity text: wikitext2, tinystories, c4, or a local .txt/.jsonl file "
                                 "(default wikitext2 when neither --tasks nor --speed is given)")
    e.add_argument("--seqlen", type=_positive, default=128, help="perplexity window length")
    e.add_argument("--ppl-windows", "--max-windows", dest="ppl_windows", type=_positive,
                   help="at most this many perplexity windows (default: all); same name as prune's")
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
    x.add_argument("--out", required=True, help="checkpoint folder to write (must not exist); with --format gguf "
                   "the .gguf file")
    x.add_argument("--zip", action="store_true", help="also write OUT.zip")
    x.add_argument("--dtype", default="auto", help="weights' dtype: auto (as stored), float32, float16, bfloat16")
    x.add_argument("--format", choices=("safetensors", "gguf"), default="safetensors",
                   help="safetensors for transformers, or one GGUF file for llama.cpp / Ollama / LM Studio")
    x.add_argument("--weight-type", default="q8_0", help="GGUF weights: f32, f16, bf16, q8_0, or a llama.cpp "
                   "quantization (q4_k_m, q4_k_s, q5_k_m, q6_k, q4_0, ...)")
    x.add_argument("--force", action="store_true", help="replace --out if it exists")

    g = sub.add_parser("compare", help="grid of methods and ablations × ratios, table and plots")
    g.add_argument("--model", default="default")
    g.add_argument("--device", default="auto")
    g.add_argument("--ratios", default="0.2,0.5")
    g.add_argument("--variants", default="slimgpt,magnitude,wanda-sp,surgeon,kobd,obs-multishot,minitron,"
                                         "slimgpt-nocomp,slimgpt-approx,slimgpt-greedy,slimgpt-dense,slimgpt-uniform,"
                                         "slimgpt-linear")
    g.add_argument("--calib", default="c4")
    g.add_argument("--nsamples", type=_positive, default=32)
    g.add_argument("--seqlen", type=_positive, default=256)
    g.add_argument("--seed", type=int, default=0)
    _ppl_options(g, "wikitext2", "perplexity text of every grid point", 64)
    g.add_argument("--tasks", help="zero-shot tasks, comma separated (default: none)")
    g.add_argument("--limit", type=_positive, default=50)
    g.add_argument("--auto-generations", type=_positive, default=100, help="slimgpt-auto: search generations")
    g.add_argument("--auto-seconds", type=float, help="slimgpt-auto: stop each search after this many seconds")
    g.add_argument("--out", required=True, help="folder for compare.md, compare.csv, compare.json and plots")
    g.add_argument("--quiet", action="store_true")

    w = sub.add_parser("runs", help="list the workspace's runs (newest first), or delete one")
    _runs_option(w)
    w.add_argument("--delete", metavar="NAME", help="remove this run's folder from disk")
    w.add_argument("--json", action="store_true", help="print the listing as JSON")

    s = sub.add_parser("shear", help="Sheared-LLaMA: learn masks to a target shape (layers, groups, heads, FFN, "
                                     "hidden), then cut the model to it")
    _common(s)
    s.set_defaults(batch_size=4)
    s.add_argument("--target", required=True,
                   help='the shape: JSON such as \'{"layers": 24, "kv_groups": 2, "heads": 6, "ffn": 1024, '
                        '"hidden": 512}\' (missing keys keep the source\'s), a config.json, or a model folder / hub id')
    s.add_argument("--method", choices=["shear", "minitron"], default="shear",
                   help="shear: learned masks (Sheared-LLaMA); minitron: one-shot activation importance to the "
                        "same shape (forward only, --nsamples windows of --data)")
    s.add_argument("--nsamples", type=_positive, default=128, help="minitron: calibration sequences")
    s.add_argument("--data", default="c4", help="training text, comma separated: c4, tinystories, wikitext2, files")
    s.add_argument("--steps", type=_positive, default=200, help="optimisation steps")
    s.add_argument("--seqlen", type=_positive, default=256, help="tokens per sequence")
    s.add_argument("--lr", type=float, default=1e-4, help="weights' learning rate")
    s.add_argument("--mask-lr", type=float, default=1.0, help="masks' (log α) learning rate")
    s.add_argument("--lambda-lr", type=float, default=1.0, help="Lagrange multipliers' learning rate (ascent)")
    s.add_argument("--freeze-weights", action="store_true", help="learn the masks only")
    s.add_argument("--seed", type=int, default=0)
    _ppl_options(s, None, "also measure dense and sheared perplexity on this text (e.g. wikitext2)", None)
    s.add_argument("--out", required=True, help="folder for the sheared model and report.json (must not exist)")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.add_argument("--quiet", action="store_true", help="no progress")

    r = sub.add_parser("recover", help="LoRA recovery fine-tune of a (pruned) model, merged and saved as a new run")
    r.add_argument("--model", required=True, help="a pruned run folder (or any model, as for prune)")
    r.add_argument("--data", default="c4", help="training data, comma separated: c4, tinystories, wikitext2 "
                                               "(validation split), .txt/.jsonl files, Alpaca .json/.jsonl files")
    r.add_argument("--steps", type=int, default=200, help="optimizer steps")
    r.add_argument("--rank", type=int, default=8, help="LoRA rank")
    r.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/rank)")
    r.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    r.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    r.add_argument("--warmup", type=int, help="linear warm-up steps (default: 5%% of --steps)")
    r.add_argument("--schedule", choices=["cosine", "constant"], default="cosine", help="lr after the warm-up")
    r.add_argument("--seqlen", type=int, default=256, help="training sequence length (text windows, max length)")
    r.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    r.add_argument("--grad-accumulation", type=int, default=1, help="micro-batches per optimizer step")
    r.add_argument("--target-modules", default="q,k,v,o,gate,up,down",
                   help="linear layers that get adapters, comma separated (q or q_proj, ...)")
    r.add_argument("--heldout", type=int, default=32, help="held-out examples for validation loss")
    r.add_argument("--eval-every", type=int, default=20, help="held-out loss every N steps (0: only at the end)")
    r.add_argument("--seed", type=int, default=0, help="seed for data order, held-out choice and LoRA init")
    _training_device_options(r, "weights' dtype while training and saved (float32, bfloat16)")
    _ppl_options(r, "wikitext2", "perplexity before and after on this text's test split ('none' to skip)", 64)
    r.add_argument("--out", required=True, help="folder for the recovered run (must not exist)")
    r.add_argument("--force", action="store_true", help="replace --out if it exists")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    _scale_options(r)

    _pretrain_parser(sub)

    c = sub.add_parser("cache", help="show or clear cache/")
    c.add_argument("action", choices=["info", "clear"])
    c.add_argument("--kind", choices=["models", "tokens", "stats", "results"], help="only this part of the cache")
    return parser


def _pretrain_parser(sub) -> None:
    t = sub.add_parser("pretrain", help="continued pre-training of a run on a mix of domains (dynamic batch "
                                        "loading, Sheared-LLaMA), full or LoRA, optionally distilled from a teacher")
    t.add_argument("--model", required=True, help="a run folder (sheared or pruned by any method) or any model")
    t.add_argument("--data", default="c4,tinystories", help="domains, comma separated: c4, tinystories, wikitext2 "
                                                           "(validation split; the test split is never trained on)")
    t.add_argument("--steps", type=int, default=400, help="optimizer steps")
    t.add_argument("--dynamic-mix", action="store_true", help="move the domain weights every --update-every steps "
                                                              "(Sheared-LLaMA Algorithm 1); without it the mix stays equal")
    t.add_argument("--update-every", type=int, help="steps between domain-weight updates (default: a tenth of --steps)")
    t.add_argument("--mix-variant", choices=["paper", "code"], default="paper",
                   help="paper: max(loss - reference, 0); code: the authors' code (no max, smoothed)")
    t.add_argument("--reference", default="source", help="whose per-domain held-out loss is the reference: source "
                                                         "(the model the run was pruned from; the model itself "
                                                         "when unknown) or a model")
    t.add_argument("--lora", action="store_true", help="train LoRA adapters (merged at the end) instead of all weights")
    t.add_argument("--rank", type=int, default=8, help="LoRA rank")
    t.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    t.add_argument("--target-modules", default="q,k,v,o,gate,up,down", help="LoRA: linear layers with adapters")
    t.add_argument("--teacher", help="distil from this model's next-token distribution (KL): source (the model the "
                                     "run was pruned from), default, stories260k, a folder")
    t.add_argument("--distill-weight", type=float, help="w in (1-w)·CE + w·KL (default 1 with --teacher)")
    t.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW, β 0.9/0.95)")
    t.add_argument("--schedule", choices=["cosine", "constant"], default="cosine", help="after a 5%% warm-up")
    t.add_argument("--seqlen", type=int, default=256, help="tokens per training window")
    t.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    t.add_argument("--grad-accumulation", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--heldout", type=int, default=16, help="held-out windows per domain (for the mix)")
    t.add_argument("--seed", type=int, default=0)
    _training_device_options(t, "weights' dtype while training and saved")
    _ppl_options(t, "tinystories,wikitext2", "perplexity before and after on these test texts ('none' to skip)", 64)
    t.add_argument("--out", help="folder for the new run (default: a new run in the workspace)")
    t.add_argument("--label", default="", help="the run's label in the studio")
    _runs_option(t)
    t.add_argument("--force", action="store_true", help="replace --out if it exists")
    t.add_argument("--quiet", action="store_true", help="no progress")
    _scale_options(t)


class _TerminalProgress:
    """Layer i/L, phase and elapsed time on one line (tqdm on stderr)."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def __call__(self, event) -> None:
        if self.quiet or event.kind != "progress":
            return
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
    bar = None if quiet else tqdm(desc=desc, unit=unit, file=sys.stderr)

    def update(done, total, *_):
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()
    return bar, update


def _ppl(model, tokenizer, source, seqlen, windows, batch, device, quiet, label, use_cache=True):
    bar, update = _bar(quiet, f"ppl {label}".strip(), "window")
    try:
        return cached_perplexity(model, tokenizer, source, seqlen, batch, windows, device, update, use_cache=use_cache)
    finally:
        if bar is not None:
            bar.close()


def _init_distributed(device: str) -> tuple[int, int, str]:
    """Under torchrun (WORLD_SIZE > 1): join the process group; gloo on CPU, NCCL on GPUs (one per rank)."""
    return join_process_group(device)


def cmd_prune(args) -> int:
    rank, world, args.device = _init_distributed(args.device)
    try:
        return _cmd_prune(args, rank)
    finally:
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()


def _cmd_prune(args, rank: int) -> int:
    _use_runs(args)
    if not args.out:  # into the workspace, under a name that says what it is
        args.out = runs_root() / new_run_name(f"{Path(args.model).stem}-{args.method}-{args.schedule}-{args.ratio:g}")
    out = check_output_folder(args.out, args.force)
    settings = PruneSettings(
        ratio=args.ratio, schedule=args.schedule, shape=args.shape, head_ratio=args.head_ratio,
        ffn_ratio=args.ffn_ratio, head_ratios=args.head_ratios, ffn_ratios=args.ffn_ratios,
        keep_heads=args.keep_heads, keep_ffn=args.keep_ffn, damp=args.damp, head_error=args.head_error,
        ffn_group_floor=args.ffn_group_floor, ffn_group_ceiling=args.ffn_group_ceiling,
        sequential=not args.dense_inputs, batch_size=args.batch_size, device=args.device, method=args.method,
        compensate=not args.no_compensation, shots=args.shots, surgeon_units=args.surgeon_units,
        fisher=args.fisher, surgeon_update=args.surgeon_update, kfac_positions=args.kfac_positions,
        surgeon_lora_steps=args.surgeon_lora_steps, offload_activations=args.offload_activations,
        tf32=args.tf32, track_accumulation=not args.no_accumulation, align=args.align)
    device = resolve_device(args.device)
    loaded = load_model(args.model, args.device, args.dtype)
    model = loaded.model
    if args.target_config:
        settings.keep_heads, settings.keep_ffn = _target(args.target_config, model)
    check_context_length(model.config, args.seqlen, "--seqlen")
    if args.schedule != "auto":  # auto: validated once the search has chosen the counts
        plan_removals(model, settings)  # validate the schedule against the model before any work
    check_memory(model, args.nsamples, args.seqlen, device, 2 * sum(activation_streams(settings)))
    tokens = data.calibration_tokens(loaded.tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
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
        report.settings["auto"] = {k: v for k, v in asdict(auto).items() if k not in ("history", "snapshots")}
    if rank > 0:
        return 0  # every rank holds the same pruned model; rank 0 writes it
    if args.ppl:
        model.to(device)
        evaluation["pruned_ppl"] = asdict(_ppl(model, loaded.tokenizer, args.ppl, args.ppl_seqlen, args.ppl_windows,
                                               args.batch_size, device, args.quiet, "pruned"))
        model.to("cpu")
    report.evaluation = evaluation
    workspace.save_run_at(model, loaded.tokenizer, report, out, args.force, args.label)
    if "pruned_ppl" in evaluation:  # listed with the run, like the studio's measurements
        add_measurement(out, "perplexity", evaluation["pruned_ppl"], batch_size=args.batch_size, device=str(device),
                        parameters=report.params_after)
    summary = {"out": str(out), "params_before": report.params_before, "params_after": report.params_after,
               "requested_ratio": round(report.requested_ratio, 4),
               "achieved_layer_ratio": round(report.achieved_layer_ratio, 4),
               "achieved_ratio": round(report.achieved_ratio, 4), "seconds": round(report.total_seconds, 1)}
    for key, value in evaluation.items():
        summary[key] = round(value["ppl"], 3)
    if report.shots:  # multi-shot methods: the allocation (a schedule for --keep-heads/--keep-ffn) and the curve
        summary.update(keep_heads=report.shots[-1].keep_heads, keep_ffn=report.shots[-1].keep_ffn,
                       shots=[{"shot": s.shot, "removed": round(s.removed_fraction, 4),
                               "heldout_ppl": round(s.heldout_ppl, 3)} for s in report.shots])
    print(json.dumps(summary))
    return 0


def _auto_schedule(args, loaded, tokens, settings):
    """The fast schedule for the budget, refined by the KL search for --auto-seconds (refine.py); its counts go
    into `settings`. --head-ratio/--ffn-ratio set the heads' and the FFN's budgets apart."""

    if args.min_keep is not None and args.ceiling is not None:
        raise SlimGPTError("give --min-keep or --ceiling, not both (--ceiling C is --min-keep 1-C)")
    min_keep = args.min_keep if args.min_keep is not None else 1.0 - args.ceiling if args.ceiling is not None else 0.1
    if args.auto_seconds < 0:
        raise SlimGPTError(f"--auto-seconds must be 0 or more, got {args.auto_seconds:g}")
    fitness = data.calibration_tokens(loaded.tokenizer, args.calib, args.fitness_samples, args.fitness_seqlen,
                                 args.seed + 1)
    budget = BudgetSpec(ratio=args.ratio, scope=args.budget_scope, target_params=args.target_params,
                        head_ratio=args.head_ratio, ffn_ratio=args.ffn_ratio, min_keep=min_keep)
    config = AutoConfig(budget=budget, max_seconds=args.auto_seconds, generations=args.search_generations,
                        refine=args.auto_seconds > 0, shape=args.shape, seed=args.seed, damp=args.damp,
                        batch_size=args.batch_size, device=args.device)
    shown = {"phase": None}

    def show(event):
        if args.quiet:
            return
        if event.phase != shown["phase"] or (event.phase == "search" and event.generation % 10 == 0):
            shown["phase"] = event.phase
            kl = f" · best {event.best} KL {event.best_kl:.4f}" if event.best and event.best_kl == event.best_kl else ""
            eta = f" · about {event.eta_s:.0f} s left" if event.eta_s is not None else ""
            print(f"auto: {event.phase} {event.fraction:.0%}{eta}{kl} · generation {event.generation} · "
                  f"{event.elapsed_s:.0f} s", file=sys.stderr)
    result = auto_schedule(loaded.model, tokens, fitness, config, show)
    loaded.model.to("cpu")
    if not args.quiet:
        print(f"auto: {result.describe()}", file=sys.stderr)
    settings.keep_heads, settings.keep_ffn = result.keep_heads, result.keep_ffn
    settings.head_ratios, settings.ffn_ratios = result.head_ratios, result.ffn_ratios
    return result


def _evaluate_one(name, args, device) -> dict:
    loaded = load_model(name, args.device, args.dtype)
    model = loaded.model.to(device)
    out: dict = {"model": name}
    if args.ppl:
        out["perplexity"] = asdict(_ppl(model, loaded.tokenizer, args.ppl, args.seqlen, args.ppl_windows,
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
    _record_in_workspace(Path(loaded.path), out, args, device)
    return out


def _record_in_workspace(folder: Path, out: dict, args, device) -> None:
    """Measurements of a workspace run are kept with it (listed by the studio with their provenance)."""

    if not (folder / META).exists():
        return  # not a run of ours: never write into someone's model folder
    measured = [("perplexity", out["perplexity"])] if "perplexity" in out else []
    measured += [("task", result) for result in (out.get("tasks") or {}).values()]
    measured += [("speed", out["speed"])] if "speed" in out else []
    for kind, value in measured:
        add_measurement(folder, kind, value, batch_size=args.batch_size, device=str(device))


def _target(spec: str, model):
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
    if args.format == "gguf":
        written = export_gguf(args.model, args.out, args.weight_type, overwrite=args.force)
        print(json.dumps({"out": str(written.path), "architecture": written.architecture,
                          "weight_type": written.weight_type, "bytes": written.bytes,
                          "tokenizer": written.tokenizer_source, "f16_fallback": written.fallback_tensors}))
        return 0
    result = export_model(args.model, args.out, args.zip, args.force, args.dtype)
    print(json.dumps({"out": str(result.folder), "zip": str(result.zip_path) if result.zip_path else None,
                      "remote_code": result.heterogeneous, "parameters": result.parameters, "files": result.files}))
    return 0


def cmd_shear(args) -> int:
    out = check_output_folder(args.out, args.force)
    device = resolve_device(args.device)
    loaded = load_model(args.model, args.device, args.dtype)
    model = loaded.model
    target = resolve_target(read_target(args.target), model)
    check_context_length(model.config, args.seqlen, "--seqlen")
    settings = ShearSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, mask_lr=args.mask_lr,
                             lambda_lr=args.lambda_lr, train_weights=not args.freeze_weights, seed=args.seed,
                             device=args.device)
    if args.method == "shear":
        check_training_memory(model, args.batch_size, args.seqlen, device, settings.train_weights)
    sources = [d.strip() for d in args.data.split(",") if d.strip()]
    steps, batch = (args.steps, args.batch_size) if args.method == "shear" else (args.nsamples, 1)
    tokens = training_tokens(loaded.tokenizer, sources, steps, batch, args.seqlen, args.seed)
    evaluation = {}
    if args.ppl:
        model.to(device)
        evaluation["dense_ppl"] = asdict(_ppl(model, loaded.tokenizer, args.ppl, args.ppl_seqlen, args.ppl_windows,
                                              8, device, args.quiet, "dense"))

    def progress(event):
        if not args.quiet:
            print(describe_shear_step(event), file=sys.stderr, flush=True)

    if args.method == "minitron":
        result = shape_run(model, tokens, target, args.batch_size, device, loaded.name)
    else:
        result = shear_model(model, tokens, target, settings, progress, model_name=loaded.name)
    result.report.settings.update(data=sources, seqlen=args.seqlen)
    if args.ppl:
        model.to(device)
        evaluation["sheared_ppl"] = asdict(_ppl(model, loaded.tokenizer, args.ppl, args.ppl_seqlen,
                                                args.ppl_windows, 8, device, args.quiet, "sheared"))
        model.to("cpu")
    result.report.evaluation = evaluation
    save_shear_run(model, loaded.tokenizer, result, out, args.force)
    summary = {"out": str(out), "method": args.method, "shape": target_summary(result.target, result.source),
               "kept_layers": result.kept_layers, "params_before": result.report.params_before,
               "params_after": result.report.params_after, "seconds": round(result.report.total_seconds, 1)}
    if result.history:
        last = result.history[-1]
        summary.update(final_loss=round(last.loss, 4), tokens=result.report.settings["tokens_seen"],
                       expected_at_end={k: round(v, 2) for k, v in last.expected.items()})
    for key, value in evaluation.items():
        summary[key] = round(value["ppl"], 3)
    print(json.dumps(summary))
    return 0


class _RecoverProgress:
    """Step i/N with train loss, held-out loss, tokens/s and ETA (tqdm on stderr)."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.heldout = quiet, None, None

    def __call__(self, event) -> None:
        if self.quiet:
            return
        if event.kind == "recover-phase" and event.phase != "train":
            print(f"recover: {event.phase} ({event.elapsed_s:.0f} s)", file=sys.stderr)
        elif event.kind == "heldout":
            self.heldout = event.loss
        elif event.kind == "train-step":
            if self.bar is None:
                self.bar = tqdm(total=event.steps, unit="step", desc="recover", file=sys.stderr)
            self.bar.n = event.step
            held = f" held-out {self.heldout:.3f}" if self.heldout is not None else ""
            self.bar.set_postfix_str(f"loss {event.train_loss:.3f}{held} {event.tokens_per_s:.0f} tok/s "
                                     f"ETA {event.eta_s:.0f} s")
            if event.step == event.steps:
                self.bar.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def cmd_recover(args) -> int:
    args.device = _init_distributed(args.device)[2]
    return on_every_rank(lambda: _cmd_recover(args))


def _cmd_recover(args) -> int:
    out = check_output_folder(args.out, args.force)
    settings = RecoverSettings(
        data=[d.strip() for d in args.data.split(",") if d.strip()], steps=args.steps, rank=args.rank,
        alpha=args.alpha, dropout=args.dropout, lr=args.lr, warmup_steps=args.warmup, schedule=args.schedule,
        seqlen=args.seqlen, batch_size=args.batch_size, grad_accumulation=args.grad_accumulation,
        target_modules=[t for t in args.target_modules.split(",") if t.strip()], heldout_samples=args.heldout,
        eval_every=args.eval_every, seed=args.seed, device=args.device,
        ppl_source=None if args.ppl.lower() == "none" else args.ppl, ppl_seqlen=args.ppl_seqlen,
        ppl_windows=args.ppl_windows, **_scale_settings(args))
    settings.validate()  # before loading anything
    loaded = load_model(args.model, "cpu", args.dtype)
    check_context_length(loaded.model.config, args.seqlen, "--seqlen")
    progress = _RecoverProgress(args.quiet)
    try:
        result = recover(loaded.model, loaded.tokenizer, settings, progress)
    finally:
        progress.close()
    if result is None:  # a process other than rank 0: rank 0 saves the run
        return 0
    save_recovered_run(result, loaded.tokenizer, out, load_source_report(loaded.path), loaded.path, args.force)
    print(json.dumps({"out": str(out), "source": loaded.path, **recovery_summary(result)}))
    return 0


def cmd_pretrain(args) -> int:
    args.device = _init_distributed(args.device)[2]
    return on_every_rank(lambda: _cmd_pretrain(args))


def _cmd_pretrain(args) -> int:
    _use_runs(args)
    settings = PretrainSettings(
        data=[d.strip() for d in args.data.split(",") if d.strip()], steps=args.steps, dynamic_mix=args.dynamic_mix,
        update_every=args.update_every, mix_variant=args.mix_variant, lr=args.lr, schedule=args.schedule,
        seqlen=args.seqlen, batch_size=args.batch_size, grad_accumulation=args.grad_accumulation,
        heldout=args.heldout, lora=args.lora, rank=args.rank, alpha=args.alpha,
        target_modules=[t for t in args.target_modules.split(",") if t.strip()], distill_weight=args.distill_weight,
        seed=args.seed, device=args.device,
        ppl=[] if args.ppl.lower() == "none" else [p.strip() for p in args.ppl.split(",") if p.strip()],
        ppl_seqlen=args.ppl_seqlen, ppl_windows=args.ppl_windows, **_scale_settings(args))
    settings.validate()  # before loading anything
    if not args.out:
        args.out = runs_root() / new_run_name(f"{Path(args.model).stem}-pretrain-{args.steps}")
    out = check_output_folder(args.out, args.force)
    loaded = load_model(args.model, "cpu", args.dtype)
    check_context_length(loaded.model.config, args.seqlen, "--seqlen")
    report = load_source_report(loaded.path)
    source = report.model if report is not None and report.model else None
    companions: dict[str, object] = {}

    def companion(name: str, what: str):
        if name == "source":
            if source is None:
                raise SlimGPTError(f"{args.model} has no report naming the model it was pruned from: give --{what} "
                                   "as a model")
            name = source
        if name not in companions:
            companions[name] = load_companion(name, loaded.model.config.vocab_size, what, args.dtype)
        return name, companions[name]

    teacher_name, teacher = companion(args.teacher, "teacher") if args.teacher else (None, None)
    reference_name, reference = (None, None)
    if args.reference != "source" or source is not None:
        reference_name, reference = companion(args.reference, "reference")

    def progress(event):
        if args.quiet:
            return
        if event.kind == "pretrain-step":
            print(describe_pretrain_step(event), file=sys.stderr, flush=True)
        elif event.kind == "domain-mix":
            print(describe_update(event), file=sys.stderr, flush=True)
        elif event.kind == "pretrain-phase" and event.phase != "train":
            print(f"pretrain: {event.phase} ({event.elapsed_s:.0f} s)", file=sys.stderr, flush=True)

    result = pretrain(loaded.model, loaded.tokenizer, settings, reference, teacher, progress,
                      reference_name=reference_name or "", teacher_name=teacher_name or "")
    if result is None:  # a process other than rank 0: rank 0 saves the run
        return 0
    save_pretrained_run(result, loaded.tokenizer, out, report, loaded.path, args.force, args.label)
    print(json.dumps({"out": str(out), "source": loaded.path, **pretrain_summary(result)}))
    return 0


def cmd_cache(args) -> int:
    if args.action == "clear":
        freed = cache.clear(args.kind)
        print(json.dumps({"cleared": args.kind or "all", "bytes_freed": freed}))
    else:
        print(json.dumps(cache.info(), indent=1))
    return 0


def cmd_runs(args) -> int:
    _use_runs(args)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"prune": cmd_prune, "eval": cmd_eval, "export": cmd_export, "cache": cmd_cache,
                "compare": cmd_compare, "runs": cmd_runs, "shear": cmd_shear, "recover": cmd_recover,
                "pretrain": cmd_pretrain}[args.command](args)
    except SlimGPTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory: lower --nsamples, --seqlen or --batch-size", file=sys.stderr)
        return 1
