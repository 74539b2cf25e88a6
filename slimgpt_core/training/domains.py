"""The domains of continued pre-training: per domain a held-out slice (for dynamic batch loading) and training
windows, plus the test text perplexity is measured on, which training never reads.

- c4: the C4 asset (first 1,000 train documents); wikitext2: the *validation* split (`wiki.valid.raw`; WikiText-2's
  test split is where perplexity is measured and is never trained on, checked here); tinystories: offline, the
  training text and the test text are the same asset file, so the file's token stream is split: training and
  held-out windows come from the first 4/5, perplexity is measured on the last 1/5 (as bench/shear_bench.py).
- Each domain's stream is cut into non-overlapping windows; the first `heldout` windows are held out, training
  uses the windows after them (no token shared).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.data import _cached_tensor, _tokenize_docs, documents, evaluation_tokens, tokenizer_fingerprint
from slimgpt_core.training.domain_mix import draw_domains
from slimgpt_core.training.finetune_data import _refuse_test_split

DOMAINS = ("c4", "tinystories", "wikitext2")
TRAIN_FRACTION = 0.8  # of a text whose training and test files are one file: the rest is test text


@dataclass
class Domain:
    name: str
    heldout: torch.Tensor  # [K, seqlen] windows for the per-domain held-out loss
    train: torch.Tensor  # [N, seqlen] windows to draw training sequences from
    description: str


def check_domains(names: list[str]) -> None:
    """One sentence for an unknown or repeated domain, before anything is loaded."""
    if not names:
        raise SlimGPTError("give at least one domain (--data c4,tinystories)")
    for name in names:
        if name not in DOMAINS:
            raise SlimGPTError(f"unknown domain {name!r}: pretrain mixes {', '.join(DOMAINS)} (WikiText-2's "
                               "validation split; its test split is never trained on)")
    if len(set(names)) != len(names):
        raise SlimGPTError(f"a domain is given twice in {','.join(names)}")


def _shares_test_file(name: str) -> bool:
    """Whether this source's training text and its perplexity text are the same file (offline tinystories)."""
    try:
        return documents(name, "train")[1] == documents(name, "test")[1]
    except SlimGPTError:  # no test split for this source (c4): nothing to keep apart
        return False


def training_stream(tokenizer, name: str, max_tokens: int) -> tuple[torch.Tensor, str]:
    """The tokens a domain may train on (at most `max_tokens` of them) and where they come from."""

    _refuse_test_split(name)
    docs, desc = documents(name, "train")
    # never the perplexity text: WikiText-2 trains on its validation split (offline) or its train split (hub)
    if name == "wikitext2":
        assert "wiki.test" not in desc and not _shares_test_file(name), f"WikiText-2 training text is {desc}"
    if _shares_test_file(name):  # offline tinystories: train on the first part, measure on the rest
        stream = evaluation_tokens(tokenizer, name)
        cut = int(TRAIN_FRACTION * stream.numel())
        return stream[:min(cut, max_tokens)], f"{name}: first {TRAIN_FRACTION:.0%} of the test file's tokens"
    key = f"pretrain|{tokenizer_fingerprint(tokenizer)}|{desc}|{max_tokens}"
    stream = _cached_tensor(key, lambda: _tokenize_docs(tokenizer, docs, max_tokens, "\n\n")[:max_tokens])
    return stream, f"{name}: {desc}"


def perplexity_tokens(tokenizer, name: str) -> torch.Tensor:
    """The text perplexity is measured on: the test split, or the part of a shared file training never reads."""
    stream = evaluation_tokens(tokenizer, name)
    if name in DOMAINS and _shares_test_file(name):
        return stream[int(TRAIN_FRACTION * stream.numel()):]
    return stream


def load_domains(tokenizer, names: list[str], seqlen: int, heldout: int, train_sequences: int) -> list[Domain]:
    """Held-out and training windows per domain; a domain is read only as far as the run can need (every
    sequence from it), and a short one is cycled over in epochs by the sampler."""
    check_domains(names)
    out = []
    for name in names:
        stream, desc = training_stream(tokenizer, name, (heldout + train_sequences) * seqlen)
        n = stream.numel() // seqlen
        if n < heldout + 1:
            raise SlimGPTError(f"domain {name} has {stream.numel()} tokens: too few for {heldout} held-out windows "
                               f"of {seqlen} and one to train on (lower --heldout or --seqlen)")
        windows = stream[: n * seqlen].view(n, seqlen)
        out.append(Domain(name, windows[:heldout], windows[heldout:],
                          f"{desc}; windows of {seqlen}: {heldout} held-out then {n - heldout} train"))
    return out


class DomainSampler:
    """Endless micro-batches for dynamic batch loading: each sequence draws its domain from `weights` (read at
    every batch, so an update applies from the next batch on) and takes that domain's next training window
    (a seeded shuffle per epoch of the domain)."""

    def __init__(self, domains: list[Domain], weights: torch.Tensor, batch_size: int, seed: int = 0):
        self._draw = draw_domains
        self.domains, self.weights, self.batch_size = domains, weights, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.orders = [torch.randperm(len(d.train), generator=self.generator) for d in domains]
        self.positions = [0] * len(domains)
        self.drawn = torch.zeros(len(domains), dtype=torch.long)  # sequences drawn per domain so far

    def __iter__(self):
        return self

    def _next_window(self, d: int) -> torch.Tensor:
        if self.positions[d] == len(self.orders[d]):  # the domain ran out: a new epoch of it
            self.orders[d] = torch.randperm(len(self.domains[d].train), generator=self.generator)
            self.positions[d] = 0
        window = self.domains[d].train[self.orders[d][self.positions[d]]]
        self.positions[d] += 1
        return window

    def state_dict(self) -> dict:
        """The position in every domain's shuffle, the generator, the counts and the current weights (JSON)."""
        return {"generator": self.generator.get_state().tolist(), "orders": [o.tolist() for o in self.orders],
                "positions": list(self.positions), "drawn": self.drawn.tolist(), "weights": self.weights.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.orders = [torch.tensor(o, dtype=torch.long) for o in state["orders"]]
        self.positions = list(state["positions"])
        self.drawn = torch.tensor(state["drawn"], dtype=torch.long)
        self.weights = torch.tensor(state["weights"], dtype=torch.float64)

    def __next__(self) -> dict[str, torch.Tensor]:
        picks = self._draw(self.weights, self.batch_size, self.generator).tolist()
        ids = torch.stack([self._next_window(d) for d in picks])
        self.drawn += torch.bincount(torch.tensor(picks), minlength=len(self.domains))
        return {"input_ids": ids, "labels": ids.clone()}
