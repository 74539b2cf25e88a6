"""What a SlimGPT-style prune is asked to do (`PruneSettings`), checked, and turned into per-layer removals."""
from __future__ import annotations

from dataclasses import dataclass

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.shapes import head_units, layer_shape
from slimgpt_core.methods import obs
from slimgpt_core.schedules.schedule import SCHEDULES, check_ratio, custom_ratios, layer_ratios, units_to_remove


@dataclass
class PruneSettings:
    ratio: float = 0.2
    schedule: str = "log"  # log | linear | uniform
    shape: float = 4.0  # last/first layer ratio for log and linear
    head_ratio: float | None = None  # mean ratio for heads only (default: ratio)
    ffn_ratio: float | None = None  # mean ratio for FFN channels only (default: ratio)
    head_ratios: list[float] | None = None  # custom per-layer ratios (override the schedule)
    ffn_ratios: list[float] | None = None
    keep_heads: list[int] | None = None  # custom per-layer query heads to keep (override ratios)
    keep_ffn: list[int] | None = None  # custom per-layer FFN channels to keep
    damp: float = 0.01
    head_error: str = "exact"  # exact | approx (authors' code)
    ffn_group_floor: int = 64
    ffn_group_ceiling: int = 1024
    sequential: bool = True  # False: every layer calibrated on the dense model's inputs
    batch_size: int = 8
    device: str = "auto"
    method: str = "slimgpt"  # slimgpt | magnitude | wanda-sp | surgeon | kobd | obs-multishot
    compensate: bool = True  # False (ablation): OBS chooses what to remove, weights are not updated
    shots: int = 3  # surgeon, kobd, obs-multishot: passes over the model, sparsity rising linearly across them
    surgeon_units: str = "heads"  # surgeon/kobd: heads (KV groups + FFN channels, smaller model) | rows (zeros)
    fisher: str = "empirical"  # surgeon/kobd: labels from the data | true (sampled from the model)
    surgeon_update: str = "dead-rows"  # surgeon, heads units: dead-rows (o_proj/down_proj column cost and update; the
    # unit's q/k/v/gate/up rows are dead) | both (summed costs, row and column updates) | columns (summed, columns)
    kfac_positions: int | None = None  # surgeon/kobd: token positions per sequence feeding A and G (sub-sample)
    surgeon_lora_steps: int = 0  # surgeon/kobd: LoRA steps (peft) on the calibration data after every shot; 0: off
    offload_activations: str = "auto"  # auto | never | always: calibration activations in (pinned) CPU memory
    tf32: bool = False  # TF32 matmuls in layer forwards on CUDA (statistics and OBS stay full fp32)
    track_accumulation: bool = True  # False: skip the reference forward that measures accumulated error
    align: int | None = None  # pruned layers keep a multiple of this many FFN channels; None: `layer_align` decides


# llama.cpp quantizes rows in blocks of 32 (Q8_0, Q4_0) and keeps a tensor whose rows are not a whole number of blocks
# in f16; on SmolLM2 at 50%, widths aligned to 32 decoded 1.72x dense against 1.37x unaligned at the same perplexity
# (docs/compare/gguf-smollm2), so aligned widths are the default wherever the dense width is itself aligned.
AUTO_ALIGN = 32
AUTO_ALIGN_MIN_BLOCKS = 16  # narrower layers stay unaligned: a block there would move the layer's ratio by over 1/32


def layer_align(full: int, align: int | None) -> int:
    """The FFN alignment a layer `full` channels wide gets: `align` when set, else AUTO_ALIGN where the dense width is
    a multiple of it and at least AUTO_ALIGN_MIN_BLOCKS blocks wide, else 1 (any width)."""
    if align is not None:
        return align
    return AUTO_ALIGN if full % AUTO_ALIGN == 0 and full >= AUTO_ALIGN * AUTO_ALIGN_MIN_BLOCKS else 1


METHODS = ("slimgpt", "magnitude", "wanda-sp", "surgeon", "kobd", "obs-multishot", "minitron")
# the layer-wise pipeline's methods: in a layer with one KV head they remove query heads inside the group (the others
# remove whole KV groups only, so they leave such a layer's heads)
QUERY_HEAD_METHODS = ("slimgpt", "magnitude", "wanda-sp", "obs-multishot")


def validate_settings(settings: PruneSettings) -> None:
    check_ratio(settings.ratio)
    if settings.offload_activations not in ("auto", "never", "always"):
        raise SlimGPTError(f"offload_activations must be auto, never or always, got {settings.offload_activations!r}")
    for name in ("head_ratio", "ffn_ratio"):
        if getattr(settings, name) is not None:
            check_ratio(getattr(settings, name), name.replace("_", " "))
    if settings.schedule not in SCHEDULES:
        raise SlimGPTError(f"unknown schedule {settings.schedule!r} (choose from {', '.join(SCHEDULES)})")
    if not settings.damp >= 0:
        raise SlimGPTError(f"damping must be >= 0, got {settings.damp}")
    if settings.head_error not in ("exact", "approx"):
        raise SlimGPTError(f"head error must be 'exact' or 'approx', got {settings.head_error!r}")
    if settings.batch_size < 1:
        raise SlimGPTError(f"batch size must be >= 1, got {settings.batch_size}")
    if settings.method not in METHODS:
        raise SlimGPTError(f"unknown method {settings.method!r} (choose from {', '.join(METHODS)})")
    if settings.align is not None and settings.align < 1:
        raise SlimGPTError(f"align must be >= 1, got {settings.align}")
    if settings.shots < 1:
        raise SlimGPTError(f"shots must be >= 1, got {settings.shots}")
    obs.dynamic_group_sizes(0, settings.ffn_group_floor, settings.ffn_group_ceiling)


def plan_removals(model, settings: PruneSettings) -> tuple[list[float], list[float], list[int], list[int]]:
    """Per-layer ratios and how many KV groups / channels each layer loses. Validates against the model."""
    validate_settings(settings)
    layers = model.model.layers
    n = len(layers)
    head_r = custom_ratios(settings.head_ratios, n) if settings.head_ratios is not None else layer_ratios(
        n, settings.head_ratio if settings.head_ratio is not None else settings.ratio, settings.schedule, settings.shape)
    ffn_r = custom_ratios(settings.ffn_ratios, n) if settings.ffn_ratios is not None else layer_ratios(
        n, settings.ffn_ratio if settings.ffn_ratio is not None else settings.ratio, settings.schedule, settings.shape)
    head_rm, ffn_rm = [], []
    for i, layer in enumerate(layers):
        q, kv, f = layer_shape(layer)
        kv, rep = head_units(q, kv, settings.method in QUERY_HEAD_METHODS)  # kv: the layer's attention units
        if settings.keep_heads is not None:
            if len(settings.keep_heads) != n:
                raise SlimGPTError(f"keep_heads has {len(settings.keep_heads)} entries but the model has {n} layers")
            keep = settings.keep_heads[i]
            if not 0 <= keep <= q:  # 0: the layer's attention goes
                raise SlimGPTError(f"layer {i} has {q} query heads: cannot keep {keep} (keep between 0 and {q})")
            if keep % rep:
                raise SlimGPTError(f"layer {i}: cannot keep {keep} query heads: under GQA heads go in groups of "
                                   f"{rep} sharing one KV head, so keep a multiple of {rep}")
            head_rm.append(kv - keep // rep)
            head_r[i] = 1 - keep / q
        else:
            head_rm.append(units_to_remove(kv, head_r[i]))
        if settings.keep_ffn is not None:
            if len(settings.keep_ffn) != n:
                raise SlimGPTError(f"keep_ffn has {len(settings.keep_ffn)} entries but the model has {n} layers")
            keep = settings.keep_ffn[i]
            if not 0 <= keep <= f:  # 0: the layer's FFN goes
                raise SlimGPTError(f"layer {i} has {f} FFN channels: cannot keep {keep}")
            ffn_rm.append(f - keep)
            ffn_r[i] = 1 - keep / f
        else:
            ffn_rm.append(ffn_units_removed(f, ffn_r[i], settings.align))
            ffn_r[i] = ffn_rm[-1] / f if layer_align(f, settings.align) > 1 else ffn_r[i]
    return head_r, ffn_r, head_rm, ffn_rm


def ffn_units_removed(full: int, ratio: float, align: int | None) -> int:
    """FFN channels a layer `full` wide loses at this ratio: whole channels, at least one kept, the kept width aligned
    as `layer_align` says."""
    return full - aligned_width(full - units_to_remove(full, ratio), full, layer_align(full, align))


def aligned_width(keep: int, full: int, align: int) -> int:
    """The kept FFN width rounded to the nearest multiple of `align`, halves up (at least one multiple, at most the
    full width); a layer left whole stays whole."""
    if align <= 1 or keep == full or full < align:
        return keep
    return min(max(align, (keep + align // 2) // align * align), full // align * align)

