"""Prefill and decode speed of a dense model and its pruned runs: llama.cpp (GGUF weight types) and transformers.

    python bench/gguf_speed.py --dense default --runs runs/gguf-smollm2-0.2,runs/gguf-smollm2-0.35,runs/gguf-smollm2-0.5
        [--weight-types q8_0,q4_k_m] [--threads 2] [--prompts 128,512] [--new 128] [--repeats 5]
        [--no-transformers] [--work DIR] [--json OUT.json] [--ppl-windows 0]

Each model is exported once into --work (GGUF per weight type). Measured per repeat, the models in turn (the order
rotated every repeat), so that a change of load on the machine reaches all of them alike: llama.cpp prefill of each
prompt length (one batch, fresh cache) and decode of --new tokens at batch 1; transformers (float32, the same
threads) the same. Printed: medians with the spread (min–max) in tokens/s, the speed-up against the dense model of
the same engine and weight type, file sizes and how many tensors llama.cpp could not quantize (rows that are not a
multiple of the block), and the load average before and after. llama.cpp's worker threads spin: another busy
process on the machine collapses its figures, so run it on a quiet machine and read the load average printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from slimgpt_core.evaluation import llamacpp  # noqa: E402
from slimgpt_core.workspace.gguf import export_gguf  # noqa: E402
from slimgpt_core.models import load_model  # noqa: E402
from slimgpt_core.workspace.store import read_run  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dense", default="default", help="the dense model (alias, folder or .gguf)")
    ap.add_argument("--runs", default="", help="run folders, comma separated")
    ap.add_argument("--weight-types", default="q8_0,q4_k_m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", default="128,512", help="prefill lengths")
    ap.add_argument("--new", type=int, default=128, help="decoded tokens at batch 1")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--ppl-windows", type=int, default=0, help="also WikiText-2 perplexity of each GGUF (128-token "
                    "windows) and of the PyTorch model")
    ap.add_argument("--work", default="cache/gguf_bench", help="where the GGUF files are written (reused)")
    ap.add_argument("--json", help="write every sample and the table here")
    return ap.parse_args(argv)


def label_of(source: str) -> str:
    path = Path(source)
    if path.is_dir() and (path / "report.json").exists():
        summary = read_run(path).summary
        ratio = summary.get("achieved_layer_ratio")
        align = json.loads((path / "report.json").read_text())["settings"].get("align", 1)
        aligned = ", align auto" if align is None else f", align {align}" if align > 1 else ""
        return f"{path.name} ({ratio:.0%}{aligned})" if ratio is not None else path.name
    return f"dense ({source})"


def gguf_file(source: str, loaded, weight_type: str, work: Path) -> tuple[Path, int]:
    """The model's GGUF in `work` (written once); returns it and how many tensors stayed wider than asked."""
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(source).name)
    out = work / f"{name}.{weight_type}.gguf"
    if not out.exists():
        export_gguf(loaded, out, weight_type)
    types = llamacpp.tensor_types(out)
    asked = {"q8_0": "Q8_0", "q4_k_m": ("Q4_K", "Q6_K"), "f16": "F16", "f32": "F32", "bf16": "BF16"}.get(weight_type)
    wide = sum(1 for name, t in types.items() if name.endswith("weight") and not name.endswith("norm.weight")
               and asked is not None and t not in (asked if isinstance(asked, tuple) else (asked,)))
    return out, wide


def transformers_speed(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) with the model's KV cache, greedy, batch 1."""
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(torch.tensor([prompt]), use_cache=True)
        prefill = time.perf_counter() - t0
        past, token = out.past_key_values, out.logits[0, -1].argmax()
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token.view(1, 1), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax()
        return prefill, time.perf_counter() - t1


def summarise(values: list[float]) -> dict:
    values = sorted(values)
    return {"median": statistics.median(values), "min": values[0], "max": values[-1], "n": len(values)}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t_start = time.time()
    sources = [args.dense] + [r for r in args.runs.split(",") if r.strip()]
    weight_types = [w.strip() for w in args.weight_types.split(",") if w.strip()]
    prompts = [int(p) for p in args.prompts.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    labels = {s: label_of(s) for s in sources}
    models, files, sizes, wide = {}, {}, {}, {}
    for source in sources:
        loaded = load_model(source, "cpu", "float32")
        models[source] = loaded
        for wt in weight_types:
            files[source, wt], wide[source, wt] = gguf_file(source, loaded, wt, work)
            sizes[source, wt] = files[source, wt].stat().st_size
    n_ctx = max(prompts) + args.new + 8
    llms = {key: llamacpp.open_gguf(path, n_ctx=n_ctx, threads=args.threads, n_batch=max(prompts))
            for key, path in files.items()}
    rng = np.random.default_rng(0)
    vocab = int(models[args.dense].model.config.vocab_size)
    samples: dict[tuple, list[float]] = {}
    for r in range(args.repeats):
        order = sources[r % len(sources):] + sources[:r % len(sources)]  # rotated: each model leads in turn
        for length in prompts:
            prompt = rng.integers(100, vocab - 1, length).tolist()  # the same tokens for every model this round
            for source in order:
                for wt in weight_types:
                    llm = llms[source, wt]
                    measured = llamacpp.speed(llm, prompt, args.new if length == prompts[0] else 0)
                    samples.setdefault(("llama.cpp", wt, source, f"prefill {length}"), []).append(
                        measured.prefill_tokens_per_s)
                    if length == prompts[0]:
                        samples.setdefault(("llama.cpp", wt, source, f"decode {args.new}"), []).append(
                            measured.decode_tokens_per_s)
                if not args.no_transformers:
                    prefill, decode = transformers_speed(models[source].model, prompt,
                                                         args.new if length == prompts[0] else 0)
                    samples.setdefault(("transformers", "f32", source, f"prefill {length}"), []).append(length / prefill)
                    if length == prompts[0]:
                        samples.setdefault(("transformers", "f32", source, f"decode {args.new}"), []).append(
                            args.new / decode)
        print(f"repeat {r + 1}/{args.repeats} done ({time.time() - t_start:.0f} s)", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    table = {key: summarise(v) for key, v in samples.items()}
    measures = [f"prefill {p}" for p in prompts] + [f"decode {args.new}"]
    engines = [("llama.cpp", wt) for wt in weight_types] + ([] if args.no_transformers else [("transformers", "f32")])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"\nCPU {cpu}, {args.threads} threads, {args.repeats} repeats (models rotated), tokens/s median "
          f"[min–max] and × dense of the same engine and weights")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}\n")
    header = "| model | engine | weights | size MB | wide tensors | " + " | ".join(measures) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for engine, wt in engines:
        for source in sources:
            cells = []
            for m in measures:
                s = table[engine, wt, source, m]
                base = table[engine, wt, args.dense, m]["median"]
                cells.append(f"{s['median']:.1f} [{s['min']:.1f}–{s['max']:.1f}] ×{s['median'] / base:.2f}")
            size = f"{sizes[source, wt] / 2**20:.1f}" if engine == "llama.cpp" else "—"
            wide_n = str(wide[source, wt]) if engine == "llama.cpp" else "—"
            print(f"| {labels[source]} | {engine} | {wt} | {size} | {wide_n} | " + " | ".join(cells) + " |")
    ppl = {}
    if args.ppl_windows:
        from slimgpt_core.data import evaluation_tokens

        tokens = evaluation_tokens(models[args.dense].tokenizer, "wikitext2")
        windows = tokens[: args.ppl_windows * 128].view(args.ppl_windows, 128).numpy()
        print(f"\nWikiText-2 perplexity, {args.ppl_windows} windows of 128 tokens (± standard error of the mean NLL)")
        for source in sources:
            for wt in weight_types:
                llm = llamacpp.open_gguf(files[source, wt], n_ctx=128, threads=args.threads, logits_all=True)
                res = llamacpp.perplexity(llm, windows)
                llm.close()
                ppl[f"{labels[source]} {wt}"] = res.__dict__
                print(f"  {labels[source]} llama.cpp {wt}: {res.ppl:.3f} (nll {res.nll:.4f} ± {res.nll_se or 0:.4f})")
            from slimgpt_core.evaluation.evaluate import perplexity

            res = perplexity(models[source].model, torch.from_numpy(windows).reshape(-1), 128, 4)
            ppl[f"{labels[source]} transformers"] = res.__dict__
            print(f"  {labels[source]} transformers f32: {res.ppl:.3f} (nll {res.nll:.4f} ± {res.nll_se or 0:.4f})")
    print(f"\n{time.time() - t_start:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "cpu": cpu, "threads": args.threads, "repeats": args.repeats, "load_before": load_before,
            "load_after": load_after, "labels": labels,
            "sizes": {f"{labels[s]} {wt}": n for (s, wt), n in sizes.items()},
            "wide_tensors": {f"{labels[s]} {wt}": n for (s, wt), n in wide.items()},
            "samples": {" | ".join((e, w, labels[s], m)): v for (e, w, s, m), v in samples.items()},
            "perplexity": ppl}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
