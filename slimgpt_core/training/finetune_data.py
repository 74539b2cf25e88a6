"""Examples for fine-tuning: plain text cut into windows, or Alpaca-layout instruction files.

- Text (c4, tinystories, wikitext2 = the validation split offline, a .txt/.jsonl file with `text`): the source's
  documents joined with blank lines, tokenised, cut into non-overlapping windows of `seqlen`; every token carries
  loss. The held-out slice is the first windows of the stream, training uses the windows after it, so the two
  share no token.
- Instructions (.json list or .jsonl rows with `instruction`, optional `input`, `output`): Stanford Alpaca's prompt
  template; loss on the response only (prompt tokens are labelled IGNORE), as the Alpaca recipes of LLM-Pruner and
  SlimGPT train by default. The held-out examples are a seeded random subset, never trained on.
- The WikiText-2 test text is where perplexity is measured: it is refused as training data.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from slimgpt_core.base import assets
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.data import SOURCES, _cached_tensor, _tokenize_docs, documents, tokenizer_fingerprint
from slimgpt_core.training.loop import IGNORE

PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss


@dataclass
class FinetuneData:
    train: list[Example]
    heldout: list[Example]
    description: list[str]  # one line per source
    loss_on: str  # "all tokens" | "response only" | "all tokens (text) and response only (instructions)"


def _is_instruction_file(path: Path) -> bool:
    if path.suffix == ".json":
        return True
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        return False
                    return isinstance(row, dict) and "instruction" in row and "output" in row
    return False


def _refuse_test_split(source: str) -> None:
    path = Path(source).expanduser()
    test = assets.asset_path("data", "wikitext-2-raw", "wiki.test.raw")
    if path.name == "wiki.test.raw" or (test is not None and path.exists() and path.resolve() == test.resolve()):
        raise SlimGPTError(f"{source} is the WikiText-2 test split, on which perplexity is measured: it is never "
                           "trained on (use wikitext2, which trains on the validation split, or c4)")


def check_source(source: str) -> None:
    """Fail early, before a model is loaded, on a data source that cannot be read."""
    _refuse_test_split(source)
    if source in SOURCES:
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise SlimGPTError(f"training data {source!r} not found: not one of {', '.join(SOURCES)} and no such file")
    if path.suffix not in (".txt", ".raw", ".md", ".jsonl", ".json"):
        raise SlimGPTError(f"cannot read training data {path}: use a .txt, .jsonl (field 'text', or Alpaca rows) "
                           "or Alpaca .json file")


def text_windows(tokenizer, source: str, seqlen: int, max_windows: int) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows from the start of the source's token stream (n <= max_windows)."""
    docs, desc = documents(source, "train")
    budget = max_windows * seqlen
    key = f"finetune|{tokenizer_fingerprint(tokenizer)}|{desc}|{budget}"

    def compute():
        return _tokenize_docs(tokenizer, docs, budget, "\n\n")[:budget]

    stream = _cached_tensor(key, compute)
    n = stream.numel() // seqlen
    if n < 2:
        raise SlimGPTError(f"training text from {source} has {stream.numel()} tokens: too short for two windows of "
                           f"--seqlen {seqlen} (one held out, one to train on)")
    return stream[: n * seqlen].view(n, seqlen)


def read_instructions(path: Path) -> list[dict]:
    try:
        if path.suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
        else:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise SlimGPTError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
    if not isinstance(rows, list) or not rows:
        raise SlimGPTError(f"{path} must hold a non-empty list of {{instruction, input, output}} objects (Alpaca)")
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) \
                or not isinstance(row.get("output"), str):
            raise SlimGPTError(f"{path} item {n} has no 'instruction' and 'output' strings (Alpaca layout)")
    return rows


def instruction_example(tokenizer, row: dict, seqlen: int) -> Example:
    """Prompt + response + EOS, truncated to `seqlen`; only the response and EOS carry loss."""
    template = PROMPT_WITH_INPUT if str(row.get("input") or "").strip() else PROMPT_NO_INPUT
    prompt = template.format(instruction=row["instruction"], input=row.get("input") or "")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:seqlen]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:seqlen]
    return Example(ids, labels)


def _split(examples: list, n_heldout: int, seed: int, shuffle_heldout: bool) -> tuple[list, list]:
    order = list(range(len(examples)))
    if shuffle_heldout:
        random.Random(seed).shuffle(order)
    held = [examples[i] for i in order[:n_heldout]]
    train = [examples[i] for i in order[n_heldout:]]
    return train, held


def heldout_count(n: int, fraction: float, at_most: int) -> int:
    return max(1, min(at_most, int(fraction * n), n - 1))


def load_finetune_data(tokenizer, sources: list[str], seqlen: int, train_needed: int, heldout_fraction: float,
                       heldout_samples: int, seed: int = 0) -> FinetuneData:
    """Training and held-out examples from every source; `train_needed` examples in all are enough for the run
    (text sources are read only that far; fewer are cycled over in epochs)."""
    train, held, desc, kinds = [], [], [], set()
    per_source = -(-train_needed // len(sources))
    for source in sources:
        check_source(source)
        path = Path(source).expanduser()
        if source not in SOURCES and _is_instruction_file(path):
            rows = read_instructions(path)
            examples = [instruction_example(tokenizer, row, seqlen) for row in rows]
            examples = [e for e in examples if any(label != IGNORE for label in e.labels[1:])]
            if len(examples) < 2:
                raise SlimGPTError(f"{path} has fewer than two examples whose response fits in --seqlen {seqlen}")
            n_held = heldout_count(len(examples), heldout_fraction, heldout_samples)
            t, h = _split(examples, n_held, seed, shuffle_heldout=True)
            kinds.add("response only")
            desc.append(f"{path} (Alpaca instructions, {len(t)} train / {len(h)} held-out examples)")
        else:
            # the first `heldout_samples` windows are held out (a fixed slice, whatever the number of steps);
            # only a text too short for them and this source's share of training holds out `heldout_fraction`
            wanted = heldout_samples + per_source
            windows = text_windows(tokenizer, source, seqlen, wanted)
            short = windows.shape[0] < wanted
            n_held = heldout_count(windows.shape[0], heldout_fraction if short else 1.0, heldout_samples)
            examples = [Example(w.tolist(), w.tolist()) for w in windows]
            t, h = examples[n_held:], examples[:n_held]
            kinds.add("all tokens")
            desc.append(f"{source} (text, windows of {seqlen}: {len(h)} held-out then {len(t)} train)")
        train += t
        held += h
    loss_on = kinds.pop() if len(kinds) == 1 else "all tokens (text) and response only (instructions)"
    return FinetuneData(train, held, desc, loss_on)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batch_stream(examples: list[Example], batch_size: int, pad_id: int, seed: int = 0) -> Iterator[dict]:
    """Endless micro-batches: a seeded shuffle of the examples per epoch."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        size = min(batch_size, len(order))  # fewer examples than a batch: every batch is all of them
        for s in range(0, len(order) - size + 1, size):  # the ragged tail waits for the next epoch
            yield collate([examples[i] for i in order[s:s + size]], pad_id)


def fixed_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[dict]:
    return [collate(examples[s:s + batch_size], pad_id) for s in range(0, len(examples), batch_size)]
