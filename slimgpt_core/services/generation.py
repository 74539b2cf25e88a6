"""Greedy generations of the same prompts by several models, streamed token by token (what a user shows).

`transformers`' own `generate` does the decoding (do_sample=False, the model's KV cache); a streamer hands each
new token to the caller as it is produced and a stopping criterion answers Cancel between tokens. Models take
turns, one prompt at a time, so each one's tokens/s is measured alone on the machine. No Streamlit here."""
from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.base.events import Progress
from slimgpt_core.evaluation.llamacpp import greedy, open_gguf
from slimgpt_core.workspace.gguf import gguf_for
from slimgpt_core.workspace.model_pool import POOL

GGUF_PREFIX = "gguf:"  # a model given as "gguf:<run folder or model name>" runs in llama.cpp from its q8_0 GGUF
DEFAULT_PROMPTS = (
    "Once upon a time, there was a little girl named Lily. She",
    "The capital of France is",
    "Pruning a neural network means",
)


@dataclass
class GenerationStarted:
    """What a generation job will produce: the columns and rows a page draws while tokens arrive."""
    models: list[str]
    prompts: list[str]
    max_new_tokens: int
    kind: str = "generation"


@dataclass
class TokenStreamed:
    """The text one model has produced so far for one prompt."""
    model: str
    prompt: int  # index into the prompts
    text: str
    new_tokens: int
    seconds: float  # since the prompt went in
    kind: str = "token"


@dataclass
class Generation:
    model: str
    prompt: str
    text: str  # the continuation only, special tokens dropped
    token_ids: list[int]
    seconds: float  # prompt in to last token out
    first_token_s: float  # prompt in to first token out (the prefill)
    device: str = "cpu"

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: the tokens after the first over the time they took (the prefill is not in it)."""
        n = len(self.token_ids) - 1
        span = self.seconds - self.first_token_s
        return n / span if n > 0 and span > 0 else None


class _TokenStream(BaseStreamer):
    """`generate` calls put() with the prompt first, then with each new token."""

    def __init__(self, on_token: Callable[[list[int]], None]):
        self.on_token = on_token
        self.ids: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        self.on_token(self.ids)

    def end(self) -> None:
        pass


class _StopWhenAsked(StoppingCriteria):
    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(self.should_stop()), dtype=torch.bool, device=input_ids.device)


def greedy_generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, label: str = "",
                    on_text: Callable[[str, int, float], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> Generation:
    """The greedy continuation of `prompt`; on_text(text so far, tokens so far, seconds) after every token."""
    if not prompt.strip():
        raise SlimGPTError("the prompt is empty: give some text for the model to continue")
    if max_new_tokens < 1:
        raise SlimGPTError(f"max new tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    t0 = time.perf_counter()
    first: list[float] = []

    def on_token(ids: list[int]) -> None:
        now = time.perf_counter() - t0
        if not first:
            first.append(now)
        if on_text is not None:
            on_text(tokenizer.decode(ids, skip_special_tokens=True), len(ids), now)

    stream = _TokenStream(on_token)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else model.config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        (eos[0] if isinstance(eos, list) else eos)
    stops = StoppingCriteriaList([_StopWhenAsked(should_stop)] if should_stop is not None else [])
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, streamer=stream,
                             stopping_criteria=stops, pad_token_id=pad)
    seconds = time.perf_counter() - t0
    if should_stop is not None and should_stop():
        raise JobCancelled("generation was cancelled")
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    return Generation(label, prompt, tokenizer.decode(ids, skip_special_tokens=True), ids, seconds,
                      first[0] if first else seconds, str(device))


def generate_side_by_side(models: list[tuple[str, str]], prompts: list[str], max_new_tokens: int = 64,
                          device: str = "auto", dtype: str = "auto", callback: Callable | None = None,
                          should_stop: Callable[[], bool] | None = None) -> list[Generation]:
    """Every prompt through every model [(label, model name or run folder)], greedy, streamed as
    TokenStreamed events. Weights come from the model pool (loaded on first use) and stay where the pool
    keeps them; models take turns."""

    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise SlimGPTError("no prompt given: write at least one line of text")
    if not models:
        raise SlimGPTError("no model chosen: pick the dense model or at least one run")
    emit = callback or (lambda e: None)
    emit(GenerationStarted([label for label, _ in models], prompts, max_new_tokens))
    results, steps, done = [], len(models) * len(prompts), 0
    for label, name in models:
        emit(Progress(done, steps, f"{label}: loading", 0.0))
        if str(name).startswith(GGUF_PREFIX):  # the same model run by llama.cpp from its GGUF
            path = gguf_for_source(str(name)[len(GGUF_PREFIX):], device, dtype, gguf_for, should_stop)
            for k, prompt in enumerate(prompts):
                emit(Progress(done, steps, f"{label}: prompt {k + 1}/{len(prompts)}", 0.0))
                results.append(gguf_generate(path, label, prompt, max_new_tokens, on_text=lambda text, n, s, label=label,
                                             k=k: emit(TokenStreamed(label, k, text, n, s)), should_stop=should_stop))
                done += 1
            continue
        loaded = POOL.get(name, device, dtype)
        for k, prompt in enumerate(prompts):
            emit(Progress(done, steps, f"{label}: prompt {k + 1}/{len(prompts)}", 0.0))
            results.append(greedy_generate(
                loaded.model, loaded.tokenizer, prompt, max_new_tokens, label,
                lambda text, n, s, label=label, k=k: emit(TokenStreamed(label, k, text, n, s)), should_stop))
            done += 1
    emit(Progress(steps, steps, "done", 0.0))
    return results


def gguf_for_source(name: str, device: str, dtype: str, gguf_for, should_stop) -> "Path":
    """The q8_0 GGUF of a run folder (exported once into the workspace) or of a named model (from the pool)."""
    if Path(name).is_dir():
        return gguf_for(name, Path(name).name, "q8_0", cancel=should_stop)
    loaded = POOL.get(name, device, dtype)
    label = "dense-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(name).name)
    return gguf_for(loaded, label, "q8_0", cancel=should_stop)

def gguf_generate(path: str | Path, label: str, prompt: str, max_new_tokens: int, threads: int = 2,
                  on_text: Callable[[str, int, float], None] | None = None,
                  should_stop: Callable[[], bool] | None = None):
    """Greedy text from a GGUF in llama.cpp, streamed like generation.greedy_generate (same result type)."""
    if not prompt.strip():
        raise SlimGPTError("the prompt is empty: give some text for the model to continue")
    llm = open_gguf(path, n_ctx=max(512, max_new_tokens + 256), threads=threads)
    try:
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        out: list[int] = []
        eos = llm.token_eos()
        t0 = time.perf_counter()
        first = None
        for token in greedy(llm, ids, max_new_tokens, should_stop):
            if token == eos:
                break
            out.append(token)
            now = time.perf_counter() - t0
            first = now if first is None else first
            if on_text is not None:
                on_text(llm.detokenize(out).decode(errors="ignore"), len(out), now)
        seconds = time.perf_counter() - t0
    finally:
        llm.close()
    if should_stop is not None and should_stop():
        raise JobCancelled("generation was cancelled")
    return Generation(label, prompt, llm.detokenize(out).decode(errors="replace") if out else "", out, seconds,
                      first if first is not None else seconds, f"llama.cpp cpu, {threads} threads")
