"""Minitron's logit distillation (SPEC §9): forward KL from the teacher's next-token distribution to the
student's, temperature 1, averaged over the positions that carry loss; optionally beside the labels' loss.

    loss = (1 − w)·CE(labels) + w·KL(p_teacher ‖ p_student)      (w = 1: distillation only, Minitron's choice)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.training.loop import IGNORE, autocast_context


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions (where `mask` is true) of Σ_v p_t(v)·(log p_t(v) − log p_s(v)), in fp32."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    per_position = (log_t.exp() * (log_t - log_s)).sum(-1)
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def check_teacher(student, teacher) -> None:
    """The teacher must predict over the student's vocabulary."""
    vs, vt = student.config.vocab_size, teacher.config.vocab_size
    if vs != vt:
        raise SlimGPTError(f"the teacher's vocabulary ({vt} tokens) differs from the model's ({vs}): distillation "
                           "needs the same tokenizer (use the model this run was pruned from)")


def distillation_loss_fn(teacher, weight: float):
    """A training.train loss_fn: the labels' cross-entropy and the KL to `teacher`, mixed by `weight`."""
    if not 0.0 <= weight <= 1.0:
        raise SlimGPTError(f"distill weight must be in [0, 1], got {weight}")

    def loss_fn(model, batch, device, bf16=True):
        batch = {k: v.to(device) for k, v in batch.items()}
        mask = batch.get("attention_mask")
        with autocast_context(device, bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).logits
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).logits
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        kl = distillation_kl(logits[:, :-1], teacher_logits[:, :-1], keep)
        if weight == 1.0:
            return kl
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                             ignore_index=IGNORE)
        return (1 - weight) * ce + weight * kl

    return loss_fn
