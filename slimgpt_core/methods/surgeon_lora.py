"""Low-rank recovery between LLM Surgeon shots (van der Ouderaa et al. §3.5; the authors' released code never
inserts its adapters): a few LoRA steps on the shot's calibration sequences, merged back into plain weights
before the next shot re-estimates the curvature. Off by default (`--surgeon-lora-steps 0`).

The adapters come from the recovery path (recover.add_lora / merge_lora, peft) and train through training.train,
so this file only turns calibration tokens into training batches and keeps the model whole when stopped."""
from __future__ import annotations

from typing import Callable

import torch

from slimgpt_core.training.finetune_data import Example, batch_stream
from slimgpt_core.training.loop import OptimizerConfig, train
from slimgpt_core.training.recover import add_lora, drop_lora, merge_lora, resolve_targets
from slimgpt_core.training.settings import DEFAULT_TARGETS

RANK, ALPHA, LR = 8, 16.0, 1e-4


def lora_steps(model, tokens: torch.Tensor, steps: int, batch_size: int, device: torch.device, seed: int = 0,
               should_stop: Callable[[], bool] | None = None) -> None:
    """`steps` LoRA steps on `tokens` [N, S] (next-token loss on every position), merged into `model` in place.
    Stopped or failing: the adapters are dropped and the weights are as they came."""
    examples = [Example(row.tolist(), row.tolist()) for row in tokens]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}  # peft freezes them all
    peft_model = add_lora(model, RANK, ALPHA, 0.0, resolve_targets(model, list(DEFAULT_TARGETS)), seed)
    try:
        train(peft_model, batch_stream(examples, batch_size, pad_id=0, seed=seed), steps,
              OptimizerConfig(lr=LR, schedule="constant"), device, bf16=False, should_stop=should_stop)
    except BaseException:
        _restore(drop_lora(peft_model), flags)
        raise
    merged = merge_lora(peft_model)
    assert merged is model  # peft unwraps the very model it wrapped: the caller's reference stays valid
    _restore(merged, flags)
    model.eval()


def _restore(model, flags: dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, True))
