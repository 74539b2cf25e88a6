"""Progress on the terminal (stderr): the callbacks the commands hand to the services."""
from __future__ import annotations

import sys

from tqdm import tqdm

from slimgpt_core.methods.shear.train import ShearStep
from slimgpt_core.schedules.refine import AutoResult
from slimgpt_core.services.shear import describe_step as describe_shear_step
from slimgpt_core.training.pretrain import describe_step as describe_pretrain_step, describe_update


class PruneProgress:
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


class RecoverProgress:
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


class Bar:
    """A counter for perplexity windows or tasks: `update(done, total)` (the evaluation's progress signature)."""

    def __init__(self, quiet: bool, desc: str, unit: str):
        self.bar = None if quiet else tqdm(desc=desc, unit=unit, file=sys.stderr)

    def update(self, done, total, *_):
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def bars(quiet: bool):
    """A factory of bars for the evaluation service: one bar per perplexity or task measurement."""
    return lambda desc, unit: Bar(quiet, desc, unit)


def shear_lines(quiet: bool):
    def show(event):
        if not quiet and isinstance(event, ShearStep):
            print(describe_shear_step(event), file=sys.stderr, flush=True)
    return show


def pretrain_lines(quiet: bool):
    def show(event):
        if quiet:
            return
        if event.kind == "pretrain-step":
            print(describe_pretrain_step(event), file=sys.stderr, flush=True)
        elif event.kind == "domain-mix":
            print(describe_update(event), file=sys.stderr, flush=True)
        elif event.kind == "pretrain-phase" and event.phase != "train":
            print(f"pretrain: {event.phase} ({event.elapsed_s:.0f} s)", file=sys.stderr, flush=True)
    return show


def auto_lines(quiet: bool):
    """The auto schedule's search: a line per phase and every tenth generation, then the schedule chosen."""
    shown = {"phase": None}

    def show(event):
        if quiet:
            return
        if isinstance(event, AutoResult):  # the schedule chosen, last
            print(f"auto: {event.describe()}", file=sys.stderr)
            return
        if event.phase != shown["phase"] or (event.phase == "search" and event.generation % 10 == 0):
            shown["phase"] = event.phase
            kl = f" · best {event.best} KL {event.best_kl:.4f}" if event.best and event.best_kl == event.best_kl else ""
            eta = f" · about {event.eta_s:.0f} s left" if event.eta_s is not None else ""
            print(f"auto: {event.phase} {event.fraction:.0%}{eta}{kl} · generation {event.generation} · "
                  f"{event.elapsed_s:.0f} s", file=sys.stderr)
    return show
