"""What a training run is asked to do (LoRA recovery, continued pre-training), as plain dataclasses with nothing
heavy imported: the command line builds `recover`'s and `pretrain`'s options from these fields (flag, help and
choices in each field's metadata, base/options.py), so `--help` never loads torch.

`validate` checks the values alone; whether each data source can be read is checked beside the data loading
(`training.recover.check_recover_settings`, `training.pretrain.check_pretrain_settings`), before any model loads."""
from __future__ import annotations

from dataclasses import dataclass

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.options import option

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHORT_TARGETS = "q,k,v,o,gate,up,down"  # the command line's default: the same layers, resolved per model
LR_SCHEDULES = ("cosine", "constant")


def checkpoint_checks(folder: str | None, every: int, resume: bool) -> list[tuple[bool, str]]:
    """The checkpoint settings' checks, (holds, the sentence when it does not), for a settings object's validate."""
    return [(every >= 0, f"checkpoint-every must be 0 (none) or positive, got {every}"),
            (bool(folder) or not (resume or every), "checkpoints and --resume need a checkpoint folder")]


def raise_first_failure(checks: list[tuple[bool, str]]) -> None:
    """Refuse with the sentence of the first check that does not hold."""
    for ok, message in checks:
        if not ok:
            raise SlimGPTError(message)


@dataclass
class ScaleSettings:
    """Training past one process (launched with torchrun) and runs that resume: every training run has these."""
    checkpoint_folder: str | None = option(None, "--checkpoint-dir", "folder for sharded checkpoints a killed run "
                                           "resumes from")  # training/checkpoints.py
    checkpoint_every: int = option(0, "--checkpoint-every", "steps between checkpoints (0: none)", "int")
    resume: bool = option(False, "--resume", "continue from the latest checkpoint in --checkpoint-dir")
    activation_checkpointing: bool = option(False, "--activation-checkpointing", "recompute each layer's "
                                            "activations in the backward pass (less memory, more compute)")

    def scale_checks(self) -> list[tuple[bool, str]]:
        return checkpoint_checks(self.checkpoint_folder, self.checkpoint_every, self.resume)


@dataclass
class RecoverSettings(ScaleSettings):
    """LoRA recovery of a (pruned) model: its data, the adapters, the optimizer and the perplexity before/after."""
    data: list[str] = option(["c4"], "--data", "training data, comma separated: c4, tinystories, wikitext2 "
                             "(validation split), .txt/.jsonl files, Alpaca .json/.jsonl files", flag_default="c4",
                             read="names")
    steps: int = option(200, "--steps", "optimizer steps", "int")
    rank: int = option(8, "--rank", "LoRA rank", "int")
    alpha: float = option(16.0, "--alpha", "LoRA alpha (scale alpha/rank)", "float")
    dropout: float = option(0.05, "--dropout", "LoRA dropout", "float")
    lr: float = option(1e-4, "--lr", "peak learning rate (AdamW)", "float")
    warmup_steps: int | None = option(None, "--warmup", "linear warm-up steps (default: 5%% of --steps)",
                                      "int")  # None: 5% of the steps (at least 1)
    schedule: str = option("cosine", "--schedule", "lr after the warm-up", choices=list(LR_SCHEDULES))
    seqlen: int = option(256, "--seqlen", "training sequence length (text windows, max length)", "int")
    batch_size: int = option(4, "--batch-size", "sequences per micro-batch", "int")
    grad_accumulation: int = option(1, "--grad-accumulation", "micro-batches per optimizer step", "int")
    target_modules: list[str] = option(DEFAULT_TARGETS, "--target-modules", "linear layers that get adapters, comma "
                                       "separated (q or q_proj, ...)", flag_default=SHORT_TARGETS, read="names")
    heldout_fraction: float = 0.05  # used only when a source is too small for `heldout_samples`
    heldout_samples: int = option(32, "--heldout", "held-out examples for validation loss", "int")
    eval_every: int = option(20, "--eval-every", "held-out loss every N steps (0: only at the end)", "int")
    seed: int = option(0, "--seed", "seed for data order, held-out choice and LoRA init", "int")
    device: str = "auto"  # the command line's --device (with --dtype, the training device options)
    bf16: bool = True  # bf16 autocast on CUDA where supported; CPU trains in the weights' dtype
    ppl_source: str | None = option("wikitext2", "--ppl", "perplexity before and after on this text's test split "
                                    "('none' to skip)", read="name_or_none")  # None: skip perplexity before/after
    ppl_seqlen: int = option(128, "--ppl-seqlen", "perplexity window length", "positive")
    ppl_windows: int | None = option(64, "--ppl-windows", "at most this many perplexity windows",
                                     "positive")  # None: the whole test text

    def validate(self) -> None:
        """One sentence for the first bad value."""
        raise_first_failure([
            (self.rank >= 1, f"LoRA rank must be at least 1, got {self.rank}"),
            (self.steps >= 1, f"steps must be at least 1, got {self.steps}"),
            (self.alpha > 0, f"LoRA alpha must be positive, got {self.alpha}"),
            (0 <= self.dropout < 1, f"LoRA dropout must be in [0, 1), got {self.dropout}"),
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (self.seqlen >= 2, f"seqlen must be at least 2, got {self.seqlen}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.grad_accumulation >= 1, f"gradient accumulation must be at least 1, got {self.grad_accumulation}"),
            (self.heldout_samples >= 1, f"held-out samples must be at least 1, got {self.heldout_samples}"),
            (0 < self.heldout_fraction < 1, f"held-out fraction must be in (0, 1), got {self.heldout_fraction}"),
            (self.eval_every >= 0, f"eval-every must be 0 (end only) or positive, got {self.eval_every}"),
            (self.schedule in LR_SCHEDULES, f"unknown lr schedule {self.schedule!r} (cosine, constant)"),
            (bool(self.data), "no training data given"),
            (bool(self.target_modules), "no target modules given"),
            (self.ppl_windows is None or self.ppl_windows >= 1, f"ppl windows must be at least 1, got {self.ppl_windows}"),
            *self.scale_checks(),
        ])

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, round(0.05 * self.steps))


PPL_TEXTS = ("tinystories", "wikitext2", "c4")


@dataclass
class PretrainSettings(ScaleSettings):
    """Continued pre-training on a mix of domains (dynamic batch loading), full or LoRA, optionally distilled."""
    data: list[str] = option(["c4", "tinystories"], "--data", "domains, comma separated: c4, tinystories, wikitext2 "
                             "(validation split; the test split is never trained on)", flag_default="c4,tinystories",
                             read="names")
    steps: int = option(400, "--steps", "optimizer steps", "int")
    # False: the initial weights throughout (a static mix); the command line's default is the static mix
    dynamic_mix: bool = option(True, "--dynamic-mix", "move the domain weights every --update-every steps "
                               "(Sheared-LLaMA Algorithm 1); without it the mix stays equal")
    update_every: int | None = option(None, "--update-every", "steps between domain-weight updates (default: a tenth "
                                      "of --steps)", "int")  # the authors: 400 of 12,000 in their CPT
    mix_variant: str = option("paper", "--mix-variant", "paper: max(loss - reference, 0); code: the authors' code "
                              "(no max, smoothed)", choices=["paper", "code"])  # training/domain_mix.py
    initial_weights: list[float] | None = None  # None: equal
    reference_losses: list[float] | None = None  # None: the reference model's held-out loss per domain
    lr: float = option(1e-4, "--lr", "peak learning rate (AdamW, β 0.9/0.95)", "float")  # the authors' CPT rate
    warmup: float = 0.05  # fraction of steps of linear warm-up, then `schedule`
    schedule: str = option("cosine", "--schedule", "after a 5%% warm-up", choices=list(LR_SCHEDULES))
    betas: tuple[float, float] = (0.9, 0.95)
    seqlen: int = option(256, "--seqlen", "tokens per training window", "int")
    batch_size: int = option(4, "--batch-size", "sequences per micro-batch", "int")
    grad_accumulation: int = option(1, "--grad-accumulation", "micro-batches per optimizer step", "int")
    heldout: int = option(16, "--heldout", "held-out windows per domain (for the mix)", "int")
    lora: bool = option(False, "--lora", "train LoRA adapters (merged at the end) instead of all weights")
    rank: int = option(8, "--rank", "LoRA rank", "int")
    alpha: float = option(16.0, "--alpha", "LoRA alpha", "float")
    dropout: float = 0.05
    target_modules: list[str] = option(DEFAULT_TARGETS, "--target-modules", "LoRA: linear layers with adapters",
                                       flag_default=SHORT_TARGETS, read="names")
    distill_weight: float | None = option(None, "--distill-weight", "w in (1-w)·CE + w·KL (default 1 with --teacher)",
                                          "float")  # with a teacher: None = 1.0 (Minitron: KL only); 0 without one
    seed: int = option(0, "--seed", None, "int")
    device: str = "auto"  # the command line's --device (with --dtype, the training device options)
    bf16: bool = True  # CUDA: bf16 autocast where supported
    ppl: list[str] = option(["tinystories", "wikitext2"], "--ppl", "perplexity before and after on these test texts "
                            "('none' to skip)", flag_default="tinystories,wikitext2",
                            read="names_or_none")  # before and after; [] to skip
    ppl_seqlen: int = option(128, "--ppl-seqlen", "perplexity window length", "positive")
    ppl_windows: int | None = option(64, "--ppl-windows", "at most this many perplexity windows", "positive")

    @property
    def every(self) -> int:
        return self.update_every or max(1, self.steps // 10)

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.warmup * self.steps))

    def distill(self, has_teacher: bool) -> float:
        if self.distill_weight is None:
            return 1.0 if has_teacher else 0.0
        return self.distill_weight

    def validate(self) -> None:
        """One sentence for the first bad value."""
        raise_first_failure([
            (self.steps >= 1, f"steps must be at least 1, got {self.steps}"),
            (self.update_every is None or self.update_every >= 1,
             f"update-every must be at least 1, got {self.update_every}"),
            (self.mix_variant in ("paper", "code"), f"unknown mix variant {self.mix_variant!r} (paper, code)"),
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (0 <= self.warmup < 1, f"warm-up must be a fraction in [0, 1), got {self.warmup}"),
            (self.schedule in LR_SCHEDULES, f"unknown lr schedule {self.schedule!r} (cosine, constant)"),
            (self.seqlen >= 2, f"seqlen must be at least 2, got {self.seqlen}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.grad_accumulation >= 1, f"gradient accumulation must be at least 1, got {self.grad_accumulation}"),
            (self.heldout >= 1, f"held-out windows must be at least 1, got {self.heldout}"),
            (not self.lora or self.rank >= 1, f"LoRA rank must be at least 1, got {self.rank}"),
            (not self.lora or self.alpha > 0, f"LoRA alpha must be positive, got {self.alpha}"),
            (0 <= self.dropout < 1, f"LoRA dropout must be in [0, 1), got {self.dropout}"),
            (self.distill_weight is None or 0 <= self.distill_weight <= 1,
             f"distill weight must be in [0, 1], got {self.distill_weight}"),
            (self.ppl_windows is None or self.ppl_windows >= 1, f"ppl windows must be at least 1, got {self.ppl_windows}"),
            *self.scale_checks(),
        ])
        for name in self.ppl:
            if name not in PPL_TEXTS:
                raise SlimGPTError(f"unknown perplexity text {name!r} (tinystories, wikitext2)")
        for what, values in (("initial weights", self.initial_weights), ("reference losses", self.reference_losses)):
            if values is not None and len(values) != len(self.data):
                raise SlimGPTError(f"{what} need one value per domain ({len(self.data)}), got {len(values)}")
        if self.initial_weights is not None and (min(self.initial_weights) < 0 or sum(self.initial_weights) <= 0):
            raise SlimGPTError(f"initial weights must be non-negative with a positive sum, got {self.initial_weights}")
