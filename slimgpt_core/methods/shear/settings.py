"""What a shear's optimisation is asked to do (train.py runs it), as a plain dataclass with nothing heavy
imported: the command line builds `shear`'s optimisation options from these fields (base/options.py)."""
from __future__ import annotations

from dataclasses import dataclass

from slimgpt_core.base.options import option
from slimgpt_core.training.settings import ScaleSettings, raise_first_failure


@dataclass
class ShearSettings(ScaleSettings):
    steps: int = option(200, "--steps", "optimisation steps", "positive")
    batch_size: int = 4  # the command line's --batch-size (shared with prune and eval; 4 for shear)
    lr: float = option(1e-4, "--lr", "weights' learning rate", "float")
    mask_lr: float = option(1.0, "--mask-lr", "masks' (log α) learning rate", "float")
    lambda_lr: float = option(1.0, "--lambda-lr", "Lagrange multipliers' learning rate (ascent)", "float")
    warmup: float = 0.1  # fraction of steps of linear learning-rate warm-up, then cosine to 0
    target_warmup: float = 0.2  # fraction of steps over which the target sparsity rises from 0
    clip: float = 1.0
    train_weights: bool = option(True, "--freeze-weights", "learn the masks only", negate=True)  # False: masks only
    seed: int = option(0, "--seed", None, "int")
    device: str = "auto"  # the command line's --device
    grad_accumulation: int = option(1, "--grad-accumulation", "micro-batches per optimizer step (one gate draw "
                                    "each)", "int")

    def validate(self) -> None:
        """One sentence for the first bad value (the per-rank batch rows are checked where the job starts)."""
        raise_first_failure([
            (self.steps >= 1 and self.batch_size >= 1,
             f"need steps >= 1 and batch size >= 1, got {self.steps} and {self.batch_size}"),
            (self.grad_accumulation >= 1, f"gradient accumulation must be at least 1, got {self.grad_accumulation}"),
            *self.scale_checks()])
