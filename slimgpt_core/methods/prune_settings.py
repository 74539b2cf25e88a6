"""A prune's settings (`PruneSettings`, defined in settings.py), checked against the model and turned into
per-layer removals."""
from __future__ import annotations

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.shapes import head_units, layer_shape
from slimgpt_core.methods import registry, settings as settings_module
from slimgpt_core.methods.settings import PruneSettings
from slimgpt_core.schedules.schedule import custom_ratios, layer_ratios, units_to_remove


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


METHODS = registry.names()
# the layer-wise pipeline's methods: in a layer with one KV head they remove query heads inside the group (the others
# remove whole KV groups only, so they leave such a layer's heads)
QUERY_HEAD_METHODS = ("slimgpt", "magnitude", "wanda-sp", "obs-multishot")


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
        kv, rep = head_units(q, kv, settings.method in QUERY_HEAD_METHODS)  # kv: the layer's attention units
        if settings.keep_heads is not None:
            keep = _layer_entry(settings.keep_heads, i, n, "keep_heads")
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
            keep = _layer_entry(settings.keep_ffn, i, n, "keep_ffn")
            if not 0 <= keep <= f:  # 0: the layer's FFN goes
                raise SlimGPTError(f"layer {i} has {f} FFN channels: cannot keep {keep}")
            ffn_rm.append(f - keep)
            ffn_r[i] = 1 - keep / f
        else:
            ffn_rm.append(ffn_units_removed(f, ffn_r[i], settings.align))
            ffn_r[i] = ffn_rm[-1] / f if layer_align(f, settings.align) > 1 else ffn_r[i]
    return head_r, ffn_r, head_rm, ffn_rm


def _layer_entry(values: list[int], i: int, n: int, name: str) -> int:
    """Layer i's entry of a per-layer list, which must have one entry per layer."""
    if len(values) != n:
        raise SlimGPTError(f"{name} has {len(values)} entries but the model has {n} layers")
    return values[i]


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

