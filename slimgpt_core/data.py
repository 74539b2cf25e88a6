"""Text for calibration and perplexity: named sources (offline asset files first, else the hub) or local files.

Calibration windows are drawn with a seed from the tokenised text and cached under cache/tokens/.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch

from slimgpt_core.base import assets
from slimgpt_core.base.cache import get_tensors
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.models import hub_error, require_hub

SOURCES = ("c4", "wikitext2", "tinystories")
# Gemma, Gemma 2 and Gemma 3 share this tokenizer and are trained with <bos> first: without it dense Gemma 3 270M
# reads a WikiText-2 perplexity near 380 instead of 46. Llama-style tokenizers also add a <bos> when asked, but the
# published llama / SmolLM2 / stories260k numbers are measured on plain windows, so the rule names the family.
BOS_FIRST_TOKENIZERS = ("GemmaTokenizer", "GemmaTokenizerFast")


def _split_blank_lines(text: str) -> list[str]:
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def _read_jsonl(path: Path, field: str = "text") -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise SlimGPTError(f"{path} line {n} is not valid JSON") from None
            if not isinstance(row, dict) or field not in row:
                raise SlimGPTError(f"{path} line {n} has no {field!r} field")
            yield str(row[field])


def _wikitext_rows(text: str) -> list[str]:
    """The hub dataset's `text` column: one row per line of the raw file, blank lines as ''."""
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def _hub_documents(source: str, split: str) -> Iterator[str]:
    try:
        import datasets
        if source == "c4":
            files = {"train": "en/c4-train.00000-of-01024.json.gz",
                     "validation": "en/c4-validation.00000-of-00008.json.gz"}
            ds = datasets.load_dataset("allenai/c4", data_files={split: files[split]}, split=split, streaming=True)
        elif source == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        else:
            ds = datasets.load_dataset("roneneldan/TinyStories", split="validation" if split != "train" else "train",
                                       streaming=True)
        for row in ds:
            yield row["text"]
    except SlimGPTError:
        raise
    except Exception as exc:  # datasets/hub raise many kinds when offline
        raise hub_error(f"dataset {source} ({split})", exc) from None


def documents(source: str, split: str = "train") -> tuple[Iterator[str], str]:
    """Documents of a named source or a local .txt/.jsonl file, and a description for cache keys.

    Named sources prefer the offline asset files. Offline, WikiText-2 calibration uses the validation
    file (the train split is not among the assets) and C4 the first 1,000 train documents."""
    if source in SOURCES:
        local = {
            ("c4", "train"): ("data", "c4", "c4-train.00000-of-01024.first1000.jsonl"),
            ("c4", "validation"): ("data", "c4", "c4-train.00000-of-01024.first1000.jsonl"),
            ("wikitext2", "train"): ("data", "wikitext-2-raw", "wiki.valid.raw"),
            ("wikitext2", "test"): ("data", "wikitext-2-raw", "wiki.test.raw"),
            ("tinystories", "train"): ("data", "tinystories", "tinystories_val_head.txt"),
            ("tinystories", "test"): ("data", "tinystories", "tinystories_val_head.txt"),
        }.get((source, split))
        path = assets.asset_path(*local) if local else None
        if path is not None:
            if source == "c4":
                return _read_jsonl(path), f"asset:{path.name}"
            text = path.read_text(encoding="utf-8")
            docs = _wikitext_rows(text) if source == "wikitext2" else _split_blank_lines(text)
            return iter(docs), f"asset:{path.name}"
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise SlimGPTError(f"{source} ({split}) is not in the offline assets and the hub is switched off "
                               f"(HF_HUB_OFFLINE): set {assets.ENV_VAR} or pass a local .txt/.jsonl file")
        require_hub(f"dataset {source} ({split})")
        return _hub_documents(source, split), f"hub:{source}:{split}"
    path = Path(source).expanduser()
    if not path.exists():
        raise SlimGPTError(f"unknown data source {source!r}: not one of {', '.join(SOURCES)} and no such file")
    if path.suffix == ".jsonl":
        return _read_jsonl(path), f"file:{path.resolve()}:{path.stat().st_mtime_ns}"
    if path.suffix in (".txt", ".raw", ".md"):
        return iter(_split_blank_lines(path.read_text(encoding="utf-8"))), f"file:{path.resolve()}:{path.stat().st_mtime_ns}"
    raise SlimGPTError(f"cannot read {path}: use a .txt (documents separated by blank lines) or .jsonl (field 'text') file")


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    for tok, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{idx}:{tok}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def window_bos(tokenizer) -> int | None:
    """The <bos> id every calibration and evaluation window starts with for this tokenizer's model family (None:
    windows are plain text)."""
    names = {type(tokenizer).__name__, str(getattr(tokenizer, "init_kwargs", {}).get("tokenizer_class"))}
    if names.isdisjoint(BOS_FIRST_TOKENIZERS):
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise SlimGPTError(f"the {type(tokenizer).__name__} tokenizer has no <bos> token, which its models need "
                           "at the start of every window")
    return int(bos)


def _cached_tensor(key: str, compute) -> torch.Tensor:
    return get_tensors("tokens", key, lambda: {"tokens": compute()})["tokens"]


def _tokenize_docs(tokenizer, docs: Iterator[str], max_tokens: int | None, joiner: str) -> torch.Tensor:
    """Join documents and tokenise in chunks until `max_tokens` (None: everything)."""
    ids: list[int] = []
    chunk: list[str] = []
    chars = 0

    def flush():
        if chunk:
            ids.extend(tokenizer(joiner.join(chunk) + joiner, add_special_tokens=False)["input_ids"])
            chunk.clear()

    for doc in docs:
        chunk.append(doc)
        chars += len(doc)
        if chars > 200_000:
            flush()
            chars = 0
            if max_tokens is not None and len(ids) >= max_tokens:
                break
    flush()
    return torch.tensor(ids, dtype=torch.long)


def calibration_tokens(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] windows drawn uniformly at random (seeded) from the tokenised source; for a family that
    needs it (`window_bos`) each is <bos> and the first seqlen - 1 tokens of the same draw."""
    if nsamples < 1 or seqlen < 2:
        raise SlimGPTError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    docs, desc = documents(source, "train")
    budget = max(4 * nsamples * seqlen, 262_144)
    bos = window_bos(tokenizer)
    key = f"calib|{tokenizer_fingerprint(tokenizer)}|{desc}|{nsamples}|{seqlen}|{seed}|{budget}"
    if bos is not None:
        key += f"|bos{bos}"

    def compute():
        stream = _tokenize_docs(tokenizer, docs, budget, "\n\n")
        if stream.numel() == 0:
            raise SlimGPTError(f"calibration text from {source} is empty")
        if stream.numel() < seqlen + 1:
            raise SlimGPTError(f"calibration text from {source} is too short: {stream.numel()} tokens, "
                               f"need more than --seqlen {seqlen}")
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, stream.numel() - seqlen + 1, (nsamples,), generator=gen)
        rows = torch.stack([stream[s:s + seqlen] for s in starts.tolist()])
        if bos is None:
            return rows
        return torch.cat([torch.full((nsamples, 1), bos, dtype=rows.dtype), rows[:, :-1]], 1)

    return _cached_tensor(key, compute)


def evaluation_tokens(tokenizer, source: str) -> torch.Tensor:
    """The whole test text as one token stream (SPEC protocol: WikiText-2 rows joined with blank lines)."""
    split = "test" if source in ("wikitext2", "tinystories") else "validation"
    docs, desc = documents(source, split)
    key = f"eval|{tokenizer_fingerprint(tokenizer)}|{desc}"

    def compute():
        text = "\n\n".join(docs)
        if not text.strip():
            raise SlimGPTError(f"evaluation text from {source} is empty")
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    return _cached_tensor(key, compute)
