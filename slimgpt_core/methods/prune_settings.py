"""A prune's settings (`PruneSettings`, defined in settings.py), checked against the model and turned into
per-layer removals."""
from __future__ import annotations

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.shapes import layer_shape
from slimgpt_core.methods import registry, settings as settings_module
from slimgpt_core.methods.settings import PruneSettings
from slimgpt_core.schedules.schedule import custom_ratios, layer_ratios, units_to_remove


METHODS = registry.names()


def validate_settings(settings: PruneSettings) -> None:
    settings_module.validate_settings(settings, METHODS)


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
        rep = q // kv
        if settings.keep_heads is not None:
            if len(settings.keep_heads) != n:
                raise SlimGPTError(f"keep_heads has {len(settings.keep_heads)} entries but the model has {n} layers")
            keep = settings.keep_heads[i]
            if not 1 <= keep <= q:
                raise SlimGPTError(f"layer {i} has {q} query heads: cannot keep {keep} (keep between 1 and {q})")
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
            if not 1 <= keep <= f:
                raise SlimGPTError(f"layer {i} has {f} FFN channels: cannot keep {keep}")
            ffn_rm.append(f - keep)
            ffn_r[i] = 1 - keep / f
        else:
            ffn_rm.append(f - aligned_width(f - units_to_remove(f, ffn_r[i]), f, settings.align))
            ffn_r[i] = ffn_rm[-1] / f if settings.align > 1 else ffn_r[i]
    return head_r, ffn_r, head_rm, ffn_rm


def aligned_width(keep: int, full: int, align: int) -> int:
    """The kept FFN width rounded to the nearest multiple of `align`, halves up (at least one multiple, at most the
    full width); a layer left whole stays whole."""
    if align <= 1 or keep == full or full < align:
        return keep
    return min(max(align, (keep + align // 2) // align * align), full // align * align)

