"""Recovery: a short LoRA fine-tune of a pruned model (SlimGPT §4 / SPEC §2.7), merged back into plain weights.

    result = recover(model, tokenizer, RecoverSettings(data=["c4"], steps=200), callback, should_stop)
    result.model  # the same class as before (stock or SlimGPT mixed-shape), adapters merged

LoRA comes from `peft`: wrapping (add_lora) and merging (merge_lora) are separate steps around the generic loop in
training.py. WikiText-2 perplexity is measured before and after on the test split, which is never trained on.
`recover` changes `model` in place (pass a copy to keep the original); when cancelled or failing, the adapters are
dropped and the model keeps its original weights.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from slimgpt_core.base import devices
from slimgpt_core.base.cache import forget_fingerprint
from slimgpt_core.base.devices import resolve_device
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.events import RunReport
from slimgpt_core.base.shapes import FUSED_PROJECTIONS
from slimgpt_core.evaluation.evaluate import cached_perplexity
from slimgpt_core.training import loop
from slimgpt_core.training.finetune_data import batch_stream, check_source, fixed_batches, load_finetune_data
from slimgpt_core.training.checkpoints import CheckpointPlan
from slimgpt_core.training.distributed import (check_batch_rows, gathered_model, is_main, rank_world,
                                               shard_model, to_device)
from slimgpt_core.training.loop import (CountedStream, OptimizerConfig, TrainPlan, TrainResult, TrainStep,
                                        final_perplexity, run_training, trained_report)
from slimgpt_core.training.settings import RecoverSettings

def check_recover_settings(settings: RecoverSettings) -> None:
    """One sentence for the first bad value or unreadable training source, before anything is loaded."""
    settings.validate()
    for source in settings.data:
        check_source(source)


@dataclass
class RecoverPhase:
    """What recovery is doing between training steps (data, perplexity, merge)."""
    phase: str  # data | ppl-before | train | merge | ppl-after | done
    elapsed_s: float
    kind: str = "recover-phase"


@dataclass
class RecoverResult:
    model: torch.nn.Module  # merged: plain weights, same class as the input
    settings: RecoverSettings
    steps: list[TrainStep]  # per step: train loss, lr, tokens/s (held-out loss at evaluation steps)
    heldout: list[dict]  # [{"step", "loss"}], step 0 = before training
    ppl_before: dict | None  # evaluate.PerplexityResult as a dict
    ppl_after: dict | None
    data: list[str]  # what each source contributed
    loss_on: str
    train_examples: int
    heldout_examples: int
    trainable_parameters: int
    tokens_seen: int
    seconds: float
    train_seconds: float
    peak_memory_mb: float
    device: str
    autocast: str
    merge_max_abs_diff: float  # logits of the merged model vs the adapter-wrapped one, one held-out batch

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(1, len(self.steps))

    def record(self, source: str = "") -> dict:
        """What report.json keeps under `recovery`."""
        s = self.settings
        return {
            "source_run": source, "data": list(s.data), "data_detail": self.data, "loss_on": self.loss_on,
            "steps": s.steps, "rank": s.rank, "alpha": s.alpha, "dropout": s.dropout, "lr": s.lr,
            "schedule": f"{s.schedule}, linear warm-up {s.warmup} steps", "seqlen": s.seqlen,
            "batch_size": s.batch_size, "grad_accumulation": s.grad_accumulation,
            "target_modules": list(s.target_modules), "seed": s.seed, "device": self.device,
            "autocast": self.autocast, "train_examples": self.train_examples,
            "heldout_examples": self.heldout_examples, "trainable_parameters": self.trainable_parameters,
            "tokens_seen": self.tokens_seen, "seconds": round(self.seconds, 2),
            "seconds_per_step": round(self.seconds_per_step, 3), "peak_memory_mb": round(self.peak_memory_mb, 1),
            "merge_max_abs_diff": self.merge_max_abs_diff,
            "loss_curve": [{"step": e.step, "train_loss": e.train_loss, "heldout_loss": e.heldout_loss, "lr": e.lr,
                            "tokens_per_s": e.tokens_per_s} for e in self.steps],
            "heldout_curve": self.heldout, "ppl_before": self.ppl_before, "ppl_after": self.ppl_after,
        }


def linear_module_names(model) -> list[str]:
    """Names (last component) of the linear layers inside the decoder layers: what LoRA can target."""
    names = set()
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


FUSED_INTO = {part: fused for fused, parts in FUSED_PROJECTIONS.items() for part in parts}  # q_proj → qkv_proj


def resolve_targets(model, targets: list[str]) -> list[str]:
    """Accept q_proj or q (and so on), a fused layer standing for its parts (q_proj → qkv_proj where the model
    fuses them); refuse names the model's decoder layers do not have."""
    available = linear_module_names(model)
    out = []
    for t in targets:
        name = t.strip()
        name = name if name in available or name in FUSED_INTO else f"{name}_proj"
        if name not in available and FUSED_INTO.get(name) in available:
            name = FUSED_INTO[name]
        if name not in available:
            raise SlimGPTError(f"unknown target module {t.strip()!r}: this model's decoder layers have "
                               f"{', '.join(available)}")
        if name not in out:
            out.append(name)
    return out


def add_lora(model, rank: int, alpha: float, dropout: float, targets: list[str], seed: int = 0):
    """Wrap `model` (in place) with fresh LoRA adapters; only the adapters train. Returns the peft model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA's A matrices are drawn at random (B starts at zero)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merge_lora(peft_model):
    """Fold the adapters into the weights and return the plain model (its original class)."""
    return peft_model.merge_and_unload()


def drop_lora(peft_model):
    """Remove the adapters without merging: the model's original weights."""
    return peft_model.unload()


def training_memory_bytes(model, settings: RecoverSettings) -> int:
    """A rough upper estimate of training memory: weights, LoRA optimiser state and the activations one
    micro-batch keeps for the backward pass (per layer ~ 16 hidden-sized and 4 FFN-sized tensors per token, plus
    the logits and their gradient in fp32)."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = settings.batch_size * settings.seqlen
    element = 4
    layers = cfg.num_hidden_layers
    ffn = getattr(cfg, "layer_intermediate_size", None) or [cfg.intermediate_size] * layers
    per_token = sum(16 * cfg.hidden_size + 4 * f for f in ffn)
    activations = tokens * per_token * element + 3 * tokens * cfg.vocab_size * 4
    # A and B per target per layer, fp32, weights + grads + two Adam moments
    lora = 4 * 4 * settings.rank * 2 * cfg.hidden_size * layers * len(settings.target_modules)
    return int(weights + activations + lora)


def check_training_memory(model, settings: RecoverSettings, device: torch.device) -> None:
    need = training_memory_bytes(model, settings)
    if device.type == "cpu":
        need -= sum(p.numel() * p.element_size() for p in model.parameters())  # already in memory
    devices.check_free_memory(need, device, "recovery needs about",
                              f"lower --batch-size ({settings.batch_size}; raise --grad-accumulation to keep the "
                              f"effective batch), --seqlen ({settings.seqlen}) or --rank ({settings.rank}), or use a "
                              "device with more memory")


def _perplexity(model, tokenizer, settings: RecoverSettings, device, should_stop):
    if not settings.ppl_source:
        return None
    return asdict(cached_perplexity(model, tokenizer, settings.ppl_source, settings.ppl_seqlen, 8,
                                    settings.ppl_windows, device, should_stop=should_stop))


def _restore_flags(model, flags: dict[str, bool]):
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))
    return model


@dataclass
class _Trained:
    """What training hands to merging: the adapter-wrapped model, the loop's result and what came before."""
    peft_model: torch.nn.Module | None  # plain (unsharded) on rank 0; None on the other ranks
    trained: TrainResult
    ppl_before: dict | None
    trainable: int


def _checkpoint_plan(settings: RecoverSettings) -> CheckpointPlan | None:
    if not settings.checkpoint_folder:
        return None
    return CheckpointPlan(settings.checkpoint_folder, settings.checkpoint_every, settings.resume)


def _train_adapters(peft_model, pad_id: int, settings: RecoverSettings, data, heldout, device, callback,
                    should_stop) -> tuple[torch.nn.Module | None, TrainResult]:
    """The adapter-wrapped model sharded over the ranks and trained; gathered back to rank 0 when it was
    sharded (None on the other ranks)."""
    net = shard_model(peft_model, device, settings.bf16, settings.activation_checkpointing)
    optim = OptimizerConfig(lr=settings.lr, warmup_steps=settings.warmup, schedule=settings.schedule)
    stream = CountedStream(lambda: batch_stream(data.train, settings.batch_size, pad_id, settings.seed))
    plan = TrainPlan(settings.steps, optim, device, settings.grad_accumulation, heldout, settings.eval_every,
                     settings.bf16, callback, should_stop, checkpoint=_checkpoint_plan(settings))
    trained = run_training(net, stream, plan)
    if settings.activation_checkpointing:
        peft_model.get_base_model().activation_checkpointing_disable()
    if rank_world()[1] > 1:  # gather once; rank 0 rebuilds the same adapters around the gathered weights
        peft_model = gathered_model(net, lambda fresh: add_lora(fresh, settings.rank, settings.alpha,
                                                                settings.dropout, settings.target_modules))
        if peft_model is not None:
            peft_model.to(device)
    return peft_model, trained


def _merge(peft_model, heldout, device, bf16: bool, trainable_flags: dict[str, bool]):
    """The adapters folded into the weights, and the largest logit change that caused on one held-out batch."""
    probe = {k: v.to(device) for k, v in heldout[0].items()}
    with torch.no_grad(), loop.autocast_context(device, bf16):
        wrapped_logits = peft_model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    merged = _restore_flags(merge_lora(peft_model), trainable_flags)
    merged.eval()
    forget_fingerprint(merged)  # the weights changed in place: cached results must not match the old model
    with torch.no_grad(), loop.autocast_context(device, bf16):
        merged_logits = merged(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    return merged, float((merged_logits.float() - wrapped_logits.float()).abs().max())


def recover(model, tokenizer, settings: RecoverSettings, callback: Callable | None = None,
            should_stop: Callable[[], bool] | None = None) -> RecoverResult | None:
    """LoRA-fine-tune `model` on `settings.data`, merge the adapters, and measure perplexity before and after.

    Events: RecoverPhase between stages, training.HeldoutLoss and training.TrainStep while training.
    `should_stop()` is checked between training steps and during the first perplexity (JobCancelled; the
    model is left as it came). Once trained, the adapters are merged and measured without further checks.
    Under torchrun every rank calls this; rank 0 alone emits events and gets the result (None elsewhere)."""
    check_recover_settings(settings)
    callback = callback if is_main() else None
    emit = callback or (lambda e: None)
    device = resolve_device(settings.device)
    settings = dataclasses.replace(settings, target_modules=resolve_targets(model, settings.target_modules))
    check_batch_rows(settings.batch_size)
    check_training_memory(model, settings, device)
    t_start = time.perf_counter()
    emit(RecoverPhase("data", 0.0))
    needed = settings.steps * settings.batch_size * settings.grad_accumulation
    data = load_finetune_data(tokenizer, settings.data, settings.seqlen, needed, settings.heldout_fraction,
                              settings.heldout_samples, settings.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    heldout = fixed_batches(data.heldout, settings.batch_size, pad_id)
    home = next(model.parameters()).device
    trainable_flags = {name: p.requires_grad for name, p in model.named_parameters()}  # peft freezes them all
    phase = lambda name: emit(RecoverPhase(name, time.perf_counter() - t_start))  # noqa: E731
    phase("ppl-before")
    t = _train_or_restore(to_device(model, device), tokenizer, settings, data, heldout, device, callback, should_stop,
                          (home, trainable_flags, phase))
    if t.peft_model is None:
        return None
    # past this point the adapters are merged: stopping now would throw the trained weights away, so finish
    phase("merge")
    merged, diff = _merge(t.peft_model, heldout, device, settings.bf16, trainable_flags)
    ppl_after = final_perplexity(merged, home, phase, lambda m: _perplexity(m, tokenizer, settings, device, None))
    autocast = "bf16" if loop.uses_bf16(device, settings.bf16) else "none"
    return RecoverResult(
        merged, settings, t.trained.steps, [{"step": h.step, "loss": h.loss} for h in t.trained.heldout],
        t.ppl_before, ppl_after, data.description, data.loss_on, len(data.train), len(data.heldout), t.trainable,
        t.trained.tokens_seen, time.perf_counter() - t_start, t.trained.seconds, t.trained.peak_memory_mb,
        str(device), autocast, diff)


def _train_or_restore(model, tokenizer, settings, data, heldout, device, callback, should_stop, restore) -> _Trained:
    """Perplexity before (rank 0), adapters added and trained. When cancelled or failing in one process: the
    model as it came (adapters dropped, weights untouched, back where it was); a sharded model cannot be put
    back, so under torchrun the run ends."""
    home, trainable_flags, phase = restore
    peft_model = None
    try:
        ppl_before = _perplexity(model, tokenizer, settings, device, should_stop) if is_main() else None
        peft_model = add_lora(model, settings.rank, settings.alpha, settings.dropout, settings.target_modules,
                              settings.seed)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        phase("train")
        trained_model, trained = _train_adapters(peft_model, pad_id, settings, data, heldout, device, callback,
                                                 should_stop)
        return _Trained(trained_model, trained, ppl_before, trainable)
    except BaseException as exc:
        if rank_world()[1] == 1:
            _restore_flags((drop_lora(peft_model) if peft_model is not None else model).to(home), trainable_flags)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise SlimGPTError(f"out of memory on {device} while training: lower --batch-size "
                               f"({settings.batch_size}), --seqlen ({settings.seqlen}) or --rank ({settings.rank})") \
                from None
        raise


def recovered_report(result: RecoverResult, source_report=None, source: str = ""):
    """The source run's report (its pruning history) with the recovery recorded; a fresh one for a dense model."""
    report = trained_report(result.model, source_report, source, "recovery", result.record(source))
    for key, value in (("recovery_ppl_before", result.ppl_before), ("recovery_ppl_after", result.ppl_after)):
        if value is not None:
            report.evaluation[key] = value
    return report


def load_source_report(folder: str | Path):
    path = Path(folder) / "report.json"
    return RunReport.load(path) if path.exists() else None


def summary(result: RecoverResult) -> dict:
    """The JSON line the command line prints."""
    first = result.heldout[0]["loss"] if result.heldout else math.nan
    last = result.heldout[-1]["loss"] if result.heldout else math.nan
    out = {"steps": len(result.steps), "train_loss_first": round(result.steps[0].train_loss, 4),
           "train_loss_last": round(result.steps[-1].train_loss, 4), "heldout_loss_before": round(first, 4),
           "heldout_loss_after": round(last, 4), "seconds": round(result.seconds, 1),
           "seconds_per_step": round(result.seconds_per_step, 3), "peak_memory_mb": round(result.peak_memory_mb),
           "trainable_parameters": result.trainable_parameters, "merge_max_abs_diff": result.merge_max_abs_diff}
    for key, value in (("ppl_before", result.ppl_before), ("ppl_after", result.ppl_after)):
        if value is not None:
            out[key] = round(value["ppl"], 3)
            out["ppl"] = f"{value['dataset']} windows of {value['seqlen']}, {value['windows']} windows"
    return out
