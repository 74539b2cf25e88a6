"""The command line's options (flag names are a contract: other tools call them; tests/cli/parser_contract.json
records them). Only light modules are imported here, so `--help` and argument errors answer before torch loads.
The options of a command's settings are built from the fields of its settings dataclasses (methods/settings.py,
methods/shear/settings.py, training/settings.py), whose metadata holds each flag, help text and choices
(base/options.py); what is no setting (the model, the data's calibration, the output) is written here."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.methods import registry
from slimgpt_core.methods.settings import PruneSettings, SurgeonSettings
from slimgpt_core.methods.shear.settings import ShearSettings
from slimgpt_core.schedules.schedule import AUTO_FITNESS_SAMPLES, parse_ratio_list
from slimgpt_core.training.settings import PretrainSettings, RecoverSettings, ScaleSettings


def ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {value}")
    return value


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def floats(text: str) -> list[float]:
    try:
        return parse_ratio_list(text)
    except SlimGPTError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read a list of integers from {text!r}") from None


def align(text: str) -> int | None:
    return None if text == "auto" else positive(text)


def comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


CONVERTERS = {"ratio": ratio, "positive": positive, "floats": floats, "ints": ints, "float": float, "int": int,
              "align": align}
# how a flag's text becomes its field's value, where the two differ ("none": no perplexity)
READERS = {"names": comma_list, "name_or_none": lambda text: None if text.lower() == "none" else text,
           "names_or_none": lambda text: [] if text.lower() == "none" else comma_list(text)}


def settings_options(group, settings_class: type, choices: dict | None = None) -> None:
    """One option per field of `settings_class` (its own fields only, not inherited ones) that carries "cli"
    metadata; `choices` overrides a field's (e.g. the registry's method names)."""
    inherited = {f.name for base in settings_class.__mro__[1:] if hasattr(base, "__dataclass_fields__")
                 for f in fields(base)}
    for f in fields(settings_class):
        cli = f.metadata.get("cli")
        if cli is None or f.name in inherited:
            continue
        if isinstance(f.default, bool):  # a switch; `negate`: the flag turns the field off
            group.add_argument(cli["flag"], *cli["aliases"], action="store_true", help=cli["help"])
            continue
        default = cli["flag_default"] if cli["flag_default"] is not MISSING else (
            None if f.default is MISSING else f.default)
        group.add_argument(cli["flag"], *cli["aliases"], type=CONVERTERS.get(cli["kind"]),
                           choices=(choices or {}).get(f.name, cli["choices"]), help=cli["help"],
                           default=default, metavar=cli["metavar"])


def settings_from_args(settings_class: type, args: argparse.Namespace, **given):
    """The settings an argument namespace asks for: every field with a flag read from `args`, `given` for the rest
    (those without a flag keep their defaults)."""
    values = {}
    for f in fields(settings_class):
        cli = f.metadata.get("cli")
        if cli is None:
            continue
        value = getattr(args, cli["flag"].lstrip("-").replace("-", "_"))
        if cli["read"] is not None:
            value = READERS[cli["read"]](value)
        values[f.name] = not value if cli["negate"] else value
    return settings_class(**values, **given)


def prune_settings_from_args(args: argparse.Namespace) -> PruneSettings:
    """A prune's settings with the method's own (`surgeon`) read from the same flags."""
    return settings_from_args(PruneSettings, args, batch_size=args.batch_size, device=args.device,
                              surgeon=settings_from_args(SurgeonSettings, args))


def common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="hub id, local HF folder, .gguf file, a pruned run folder, or an alias: default/smollm2, "
                        "stories260k (offline assets)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, fp16 on CUDA), float32, float16, bfloat16")
    p.add_argument("--batch-size", type=positive, default=8, help="sequences per forward pass")


def ppl_options(p, default: str | None, help: str, windows: int | None) -> None:
    """--ppl TEXT(S), --ppl-seqlen, --ppl-windows: the perplexity a command measures before and after."""
    p.add_argument("--ppl", default=default, help=help)
    p.add_argument("--ppl-seqlen", type=positive, default=128, help="perplexity window length")
    p.add_argument("--ppl-windows", type=positive, default=windows, help="at most this many perplexity windows")


def training_device_options(p, dtype_help: str) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when available, bf16 autocast), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", help=dtype_help)


def runs_option(p) -> None:
    p.add_argument("--runs", help="the workspace folder of runs (default: $SLIMGPT_RUNS, else runs/ in the project)")


def output_options(p, out_help: str, quiet_help: str = "no progress") -> None:
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help=quiet_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m slimgpt_core",
                                     description="SlimGPT structured pruning of causal LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (prune_parser, eval_parser, export_parser, compare_parser, runs_parser, shear_parser,
                recover_parser, pretrain_parser, cache_parser):
        add(sub)
    return parser


def prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune attention heads and FFN channels layer by layer with OBS compensation")
    common_options(p)
    settings_options(p.add_argument_group("pruning (PruneSettings)"), PruneSettings,
                     {"method": registry.names()})
    settings_options(p.add_argument_group("surgeon, kobd and obs-multishot (SurgeonSettings)"), SurgeonSettings)
    auto_options(p.add_argument_group("the auto schedule (--schedule auto)"))
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", default="c4", help="c4, wikitext2, tinystories, or a local .txt/.jsonl file")
    c.add_argument("--nsamples", type=positive, default=128, help="calibration sequences")
    c.add_argument("--seqlen", type=positive, default=2048, help="calibration sequence length")
    c.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows")
    ppl_options(p, None, "also measure dense and pruned perplexity on this text (e.g. wikitext2)", None)
    p.add_argument("--target-config", help="prune to another model's shape: its config.json (or folder / hub id)")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="folder for the pruned model and report.json (must not exist); default: a new "
                                 "folder in the workspace (--runs), where the studio lists it")
    o.add_argument("--label", default="", help="the run's label in the studio's list")
    runs_option(o)
    o.add_argument("--force", action="store_true", help="replace --out if it exists")
    o.add_argument("--quiet", action="store_true", help="no progress bar")


def auto_options(a) -> None:
    a.add_argument("--target-params", type=positive,
                   help="auto: parameters of the pruned model (default: --ratio of the decoder layers' parameters)")
    a.add_argument("--budget-scope", choices=["layers", "model"], default="layers",
                   help="auto: --ratio is a fraction of the decoder layers' parameters or of the whole model's")
    a.add_argument("--min-keep", type=ratio, help="auto: every layer keeps at least this fraction of its KV groups "
                   "and of its FFN channels (default 0.1; at least one of each)")
    a.add_argument("--ceiling", type=ratio, help="auto: at most this fraction of a layer's KV groups or channels "
                   "removed (the same as --min-keep 1-C)")
    a.add_argument("--auto-seconds", "--search-seconds", dest="auto_seconds", type=float, default=600.0,
                   help="auto: the fast schedule, then a KL search refining it until this many seconds have passed "
                        "(0: the fast schedule only)")
    a.add_argument("--search-generations", type=positive, help="auto: stop the search after this many generations")
    a.add_argument("--fitness-samples", type=positive, default=AUTO_FITNESS_SAMPLES,
                   help="auto: calibration sequences (other windows, seed+1) the KL is measured on: the fast phase "
                        "on the first 8, the search on all")
    a.add_argument("--fitness-seqlen", type=positive, default=128, help="auto: their length")


def eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity, zero-shot tasks and speed of a model (dense or pruned)")
    common_options(e)
    e.add_argument("--ppl", help="perplexity text: wikitext2, tinystories, c4, or a local .txt/.jsonl file "
                                 "(default wikitext2 when neither --tasks nor --speed is given)")
    e.add_argument("--seqlen", type=positive, default=128, help="perplexity window length")
    e.add_argument("--ppl-windows", "--max-windows", dest="ppl_windows", type=positive,
                   help="at most this many perplexity windows (default: all); same name as prune's")
    e.add_argument("--tasks", help="zero-shot tasks, comma separated: boolq,piqa,hellaswag,winogrande,arc_easy,"
                                   "arc_challenge,openbookqa")
    e.add_argument("--limit", type=positive, help="at most this many documents per task")
    e.add_argument("--speed", action="store_true", help="measure prefill latency and decode tokens/s")
    e.add_argument("--speed-batches", type=ints, default=[1, 8], help="batch sizes for --speed")
    e.add_argument("--speed-lengths", type=ints, default=[128, 512], help="prompt lengths for --speed")
    e.add_argument("--new-tokens", type=positive, default=32, help="tokens generated per point for --speed")
    e.add_argument("--baseline", help="also evaluate this model (e.g. the dense source) the same way, side by side")
    e.add_argument("--no-cache", action="store_true", help="recompute instead of reusing cached results")
    e.add_argument("--json", help="write the results here as JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bars")


def export_parser(sub) -> None:
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


def compare_parser(sub) -> None:
    g = sub.add_parser("compare", help="grid of methods and ablations × ratios, table and plots")
    g.add_argument("--model", default="default")
    g.add_argument("--device", default="auto")
    g.add_argument("--ratios", default="0.2,0.5")
    g.add_argument("--variants", default="slimgpt,magnitude,wanda-sp,surgeon,kobd,obs-multishot,minitron,"
                                         "slimgpt-nocomp,slimgpt-approx,slimgpt-greedy,slimgpt-dense,slimgpt-uniform,"
                                         "slimgpt-linear")
    g.add_argument("--calib", default="c4")
    g.add_argument("--nsamples", type=positive, default=32)
    g.add_argument("--seqlen", type=positive, default=256)
    g.add_argument("--seed", type=int, default=0)
    ppl_options(g, "wikitext2", "perplexity text of every grid point", 64)
    g.add_argument("--tasks", help="zero-shot tasks, comma separated (default: none)")
    g.add_argument("--limit", type=positive, default=50)
    g.add_argument("--auto-generations", type=positive, default=100, help="slimgpt-auto: search generations")
    g.add_argument("--auto-seconds", type=float, help="slimgpt-auto: stop each search after this many seconds")
    g.add_argument("--out", required=True, help="folder for compare.md, compare.csv, compare.json and plots")
    g.add_argument("--quiet", action="store_true")


def runs_parser(sub) -> None:
    w = sub.add_parser("runs", help="list the workspace's runs (newest first), or delete one")
    runs_option(w)
    w.add_argument("--delete", metavar="NAME", help="remove this run's folder from disk")
    w.add_argument("--json", action="store_true", help="print the listing as JSON")


def shear_parser(sub) -> None:
    s = sub.add_parser("shear", help="Sheared-LLaMA: learn masks to a target shape (layers, groups, heads, FFN, "
                                     "hidden), then cut the model to it")
    common_options(s)
    s.set_defaults(batch_size=4)
    s.add_argument("--target", required=True,
                   help='the shape: JSON such as \'{"layers": 24, "kv_groups": 2, "heads": 6, "ffn": 1024, '
                        '"hidden": 512}\' (missing keys keep the source\'s), a config.json, or a model folder / hub id')
    s.add_argument("--method", choices=registry.names("shape"), default="shear",
                   help="shear: learned masks (Sheared-LLaMA); minitron: one-shot activation importance to the "
                        "same shape (forward only, --nsamples windows of --data)")
    s.add_argument("--nsamples", type=positive, default=128, help="minitron: calibration sequences")
    s.add_argument("--data", default="c4", help="training text, comma separated: c4, tinystories, wikitext2, files")
    s.add_argument("--seqlen", type=positive, default=256, help="tokens per sequence")
    settings_options(s.add_argument_group("mask learning (ShearSettings)"), ShearSettings)
    ppl_options(s, None, "also measure dense and sheared perplexity on this text (e.g. wikitext2)", None)
    output_options(s, "folder for the sheared model and report.json (must not exist)")
    scale_options(s)


def scale_options(p: argparse.ArgumentParser) -> None:
    """Training past one process (launch with torchrun) and runs that resume."""
    settings_options(p.add_argument_group("torchrun and resuming (ScaleSettings)"), ScaleSettings)


def recover_parser(sub) -> None:
    r = sub.add_parser("recover", help="LoRA recovery fine-tune of a (pruned) model, merged and saved as a new run")
    r.add_argument("--model", required=True, help="a pruned run folder (or any model, as for prune)")
    settings_options(r.add_argument_group("recovery (RecoverSettings)"), RecoverSettings)
    training_device_options(r, "weights' dtype while training and saved (float32, bfloat16)")
    output_options(r, "folder for the recovered run (must not exist)", "no progress bar")
    scale_options(r)


def pretrain_parser(sub) -> None:
    t = sub.add_parser("pretrain", help="continued pre-training of a run on a mix of domains (dynamic batch "
                                        "loading, Sheared-LLaMA), full or LoRA, optionally distilled from a teacher")
    t.add_argument("--model", required=True, help="a run folder (sheared or pruned by any method) or any model")
    t.add_argument("--reference", default="source", help="whose per-domain held-out loss is the reference: source "
                                                         "(the model the run was pruned from; the model itself "
                                                         "when unknown) or a model")
    t.add_argument("--teacher", help="distil from this model's next-token distribution (KL): source (the model the "
                                     "run was pruned from), default, stories260k, a folder")
    settings_options(t.add_argument_group("continued pre-training (PretrainSettings)"), PretrainSettings)
    training_device_options(t, "weights' dtype while training and saved")
    t.add_argument("--out", help="folder for the new run (default: a new run in the workspace)")
    t.add_argument("--label", default="", help="the run's label in the studio")
    runs_option(t)
    t.add_argument("--force", action="store_true", help="replace --out if it exists")
    t.add_argument("--quiet", action="store_true", help="no progress")
    scale_options(t)


def cache_parser(sub) -> None:
    c = sub.add_parser("cache", help="show or clear cache/")
    c.add_argument("action", choices=["info", "clear"])
    c.add_argument("--kind", choices=["models", "tokens", "stats", "results"], help="only this part of the cache")
