"""Run a GGUF in llama.cpp (llama-cpp-python): logits, greedy text, perplexity on windows, tokens/s.

llama-cpp-python is optional (it builds llama.cpp from source: `bash install-llamacpp.sh`); everything here imports
it through `import_llama_cpp`, which says in one sentence how to get it."""
from __future__ import annotations

import importlib
import math
import os
import re
import subprocess
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.base.events import Progress

INSTALL_HINT = "bash install-llamacpp.sh (builds llama.cpp from source: about ten minutes on two cores, once)"


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise SlimGPTError(f"llama.cpp is not installed here: run {INSTALL_HINT}") from None
    return llama_cpp


def llama_cpp_available() -> bool:
    try:
        import_llama_cpp()
    except SlimGPTError:
        return False
    return True


def open_gguf(path: str | Path, n_ctx: int = 512, threads: int = 2, logits_all: bool = False,
              f32_cache: bool = False, n_batch: int = 512):
    """A llama.cpp model on the CPU. `logits_all` keeps every position's logits (perplexity, comparisons);
    `f32_cache` keeps the KV cache in f32 (llama.cpp's default f16 cache rounds keys and values)."""
    llama_cpp = import_llama_cpp()
    path = Path(path)
    if not path.is_file():
        raise SlimGPTError(f"GGUF file not found: {path}")
    kwargs = {}
    if f32_cache:
        kwargs.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx),
                               n_ubatch=min(n_batch, n_ctx), n_threads=threads, n_threads_batch=threads,
                               logits_all=logits_all, verbose=False, n_gpu_layers=0, **kwargs)
    except ValueError as exc:  # llama-cpp-python reports a failed load as ValueError
        raise SlimGPTError(f"llama.cpp cannot load {path.name}: {exc}") from None


def logits(llm, tokens: Sequence[int]) -> np.ndarray:
    """Logits (positions × vocabulary, float32) of a fresh evaluation of `tokens` (needs `logits_all`)."""
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def last_logits(llm) -> np.ndarray:
    """The last evaluated position's logits, read from llama.cpp's context (llama-cpp-python keeps a copy only
    with `logits_all`)."""
    llama_cpp = import_llama_cpp()
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).copy()


def greedy(llm, tokens: Sequence[int], new_tokens: int, stop: Callable[[], bool] | None = None) -> Iterator[int]:
    """Greedy continuation, one token id at a time (argmax of the last position's logits)."""
    llm.reset()
    llm.eval(list(tokens))
    for _ in range(new_tokens):
        if stop is not None and stop():
            return
        token = int(np.argmax(last_logits(llm)))
        yield token
        llm.eval([token])


def token_text(llm, token: int) -> bytes:
    return llm.detokenize([token])


def stream_text(llm, prompt: str, new_tokens: int, stop: Callable[[], bool] | None = None) -> Iterator[str]:
    """Greedy text from a prompt, streamed as it decodes (bytes of split characters held back until complete)."""
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    pending = b""
    eos = llm.token_eos()
    for token in greedy(llm, ids, new_tokens, stop):
        if token == eos:
            break
        pending += llm.detokenize([token])
        try:
            text = pending.decode()
        except UnicodeDecodeError:
            continue
        pending = b""
        yield text


@dataclass
class GGUFPerplexity:
    windows: int
    seqlen: int
    tokens: int
    nll: float
    ppl: float
    nll_se: float | None
    seconds: float


def perplexity(llm, windows: np.ndarray, progress: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> GGUFPerplexity:
    """The project's protocol (evaluation/evaluate.py) in llama.cpp: each window evaluated from a fresh cache, every
    position predicts the next token of the window; mean NLL over them, standard error over the windows."""
    windows = np.asarray(windows)
    t0 = time.perf_counter()
    nlls = []
    for i, window in enumerate(windows):
        if should_stop is not None and should_stop():
            raise JobCancelled("evaluation was cancelled")
        scores = logits(llm, window.tolist()).astype(np.float64)[:-1]
        peak = scores.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(scores - peak).sum(axis=1)) + peak[:, 0]
        nll = log_norm - scores[np.arange(len(scores)), window[1:]]
        nlls.append(float(nll.mean()))
        if progress is not None:
            progress(i + 1, len(windows))
    mean = statistics.fmean(nlls)
    se = statistics.stdev(nlls) / math.sqrt(len(nlls)) if len(nlls) > 1 else None
    return GGUFPerplexity(len(nlls), windows.shape[1], int(windows.shape[0] * (windows.shape[1] - 1)), mean,
                          math.exp(mean), se, time.perf_counter() - t0)


@dataclass
class GGUFSpeed:
    prefill_tokens: int
    prefill_tokens_per_s: float
    decode_tokens: int
    decode_tokens_per_s: float


def speed(llm, prompt: Sequence[int], new_tokens: int) -> GGUFSpeed:
    """Prefill of `prompt` (one batch) and greedy decode of `new_tokens` at batch 1, timed separately."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(list(prompt))
    prefill = time.perf_counter() - t0
    token = int(np.argmax(last_logits(llm)))
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([token])
        token = int(np.argmax(last_logits(llm)))
    decode = time.perf_counter() - t1
    return GGUFSpeed(len(prompt), len(prompt) / prefill, new_tokens, new_tokens / decode if new_tokens else 0.0)


def gguf_metadata(path: str | Path) -> dict:
    """The file's key-value metadata (architecture, per-layer arrays, provenance), without loading weights."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()
            if not key.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                                   "tokenizer.ggml.scores"))}


def tensor_types(path: str | Path) -> dict[str, str]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in reader.tensors}


# ---------------------------------------------------------------- the studio: install, generate, speed

INSTALL_SCRIPT = Path(__file__).resolve().parents[2] / "install-llamacpp.sh"


def install_llama_cpp(callback: Callable | None = None, should_stop: Callable[[], bool] | None = None) -> str:
    """Build and install llama-cpp-python with the project's pinned version and options (install-llamacpp.sh), with
    the build's steps as progress. Returns the installed version; one sentence when the build fails."""
    if llama_cpp_available():
        return import_llama_cpp().__version__
    if not INSTALL_SCRIPT.exists():
        raise SlimGPTError(f"{INSTALL_SCRIPT.name} is missing from the project: llama.cpp cannot be built here")
    t0 = time.perf_counter()
    proc = subprocess.Popen(["bash", str(INSTALL_SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "LLAMACPP_VERBOSE": "1"})
    tail: list[str] = []
    try:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            step = re.search(r"\[(\d+)/(\d+)\]", line)  # ninja's "[12/127] Building CXX object ..."
            if step and callback is not None:
                callback(Progress(int(step.group(1)), int(step.group(2)), "building llama.cpp",
                                  time.perf_counter() - t0))
            if should_stop is not None and should_stop():
                proc.terminate()
                raise JobCancelled("the llama.cpp build was cancelled; nothing was installed")
    finally:
        proc.wait()
    if proc.returncode != 0:
        last = next((line for line in reversed(tail) if "error" in line.lower()), tail[-1] if tail else "")
        raise SlimGPTError(f"building llama.cpp failed (a C/C++ compiler and cmake are needed; "
                           f"last message: {last.strip()[:200]})")
    importlib.invalidate_caches()
    return import_llama_cpp().__version__



def speed_table(files: dict[str, Path], prompt_tokens: int = 128, new_tokens: int = 64, threads: int = 2,
                repeats: int = 3, callback: Callable | None = None,
                should_stop: Callable[[], bool] | None = None) -> list[dict]:
    """Prefill and decode tokens/s of each GGUF (label -> file), the models alternated within each repeat so that
    a change of load on the machine reaches all of them alike; medians and the spread (min-max)."""
    rng = np.random.default_rng(0)
    samples: dict[str, list[GGUFSpeed]] = {label: [] for label in files}
    models = {label: open_gguf(path, n_ctx=prompt_tokens + new_tokens + 8, threads=threads)
              for label, path in files.items()}
    try:
        for r in range(repeats):
            for i, (label, llm) in enumerate(models.items()):
                if should_stop is not None and should_stop():
                    raise JobCancelled("the speed measurement was cancelled")
                prompt = rng.integers(100, llm.n_vocab() - 1, prompt_tokens).tolist()
                samples[label].append(speed(llm, prompt, new_tokens))
                if callback is not None:
                    callback(Progress(r * len(models) + i + 1, repeats * len(models), f"llama.cpp {label}", 0.0))
    finally:
        for llm in models.values():
            llm.close()
    rows = []
    for label, runs in samples.items():
        pre = sorted(s.prefill_tokens_per_s for s in runs)
        dec = sorted(s.decode_tokens_per_s for s in runs)
        rows.append({"model": label, "file": str(files[label]), "threads": threads, "prompt_tokens": prompt_tokens,
                     "new_tokens": new_tokens, "repeats": repeats,
                     "prefill_tokens_per_s": statistics.median(pre), "prefill_spread": (pre[0], pre[-1]),
                     "decode_tokens_per_s": statistics.median(dec), "decode_spread": (dec[0], dec[-1])})
    return rows
