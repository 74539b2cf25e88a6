"""What the schedule editor in the browser needs to recompute a schedule's consequences on its own, built once.

Per layer the parameter count is linear in what the schedule removes (`studio._layer_params` with q = kv·rep):
    fixed + kv_groups · params_per_kv_group + channels · params_per_channel
so the browser gets those three numbers per layer, the layer's FFN alignment (`prune_settings.layer_align`), the
model's total, and the error curves (`curves.py`)
compacted, and evaluates `preview_schedule`'s parameters and ratios and `predict`'s errors itself while a bar moves.
No Streamlit here.
"""
from __future__ import annotations

from typing import Sequence

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.shapes import count_parameters, layer_shape
from slimgpt_core.methods.prune_settings import layer_align
from slimgpt_core.schedules.curves import LayerCurves, MAP_RATIOS, ModelCurves

SIGNIFICANT_DIGITS = 5  # relative errors sent at this precision: the predicted errors are estimates to a few %


def layer_param_terms(layer) -> dict[str, int]:
    """(fixed, per KV group, per FFN channel) parameters of a decoder layer, `studio._layer_params` split by unit."""
    attn, mlp = layer.self_attn, layer.mlp
    q, kv, f = layer_shape(layer)
    rep = q // kv
    d, hidden = attn.head_dim, attn.q_proj.in_features

    def has_bias(lin) -> int:
        return int(lin.bias is not None)

    per_group = hidden * d * (2 * rep + 2) + d * (rep * has_bias(attn.q_proj) + has_bias(attn.k_proj)
                                                  + has_bias(attn.v_proj))
    per_channel = 3 * hidden + has_bias(mlp.gate_proj) + has_bias(mlp.up_proj)
    norms = sum(p.numel() for name, p in layer.named_parameters() if "norm" in name)
    fixed = norms + hidden * (has_bias(attn.o_proj) + has_bias(mlp.down_proj))
    return {"n_kv": kv, "heads_per_unit": rep, "n_ffn": f, "kv_params": per_group, "ffn_params": per_channel,
            "fixed_params": fixed}


def _compact(values: Sequence[float]) -> list[float]:
    return [float(f"{v:.{SIGNIFICANT_DIGITS}g}") for v in values]


def _compact_counts(lc: LayerCurves) -> list[int] | dict[str, int]:
    """The FFN curve's channel counts: 0, step, 2·step, … , n−1 (how `ffn_curve` records them) as {step, last};
    any other list as it is."""
    counts = list(lc.ffn_counts)
    if len(counts) >= 2:
        step, last = counts[1] - counts[0], counts[-1]
        regular = list(range(0, last, step)) + [last] if step > 0 else None
        if counts[0] == 0 and regular == counts:
            return {"step": step, "last": last}
    return counts


def expand_counts(counts: list[int] | dict[str, int]) -> list[int]:
    """Inverse of the compaction above (the browser does the same)."""
    if isinstance(counts, dict):
        return list(range(0, counts["last"], counts["step"])) + [counts["last"]]
    return list(counts)


def editor_payload(model, curves: ModelCurves | None, preset_heads: Sequence[float],
                   preset_ffn: Sequence[float], align: int | None = None) -> dict:
    """Everything the editor computes from: per-layer shapes, parameter terms and FFN alignment (`align` as in
    PruneSettings), the model's total parameters, the preset (the ghost), and the error curves (None without them)
    with the sensitivity map's ratios."""
    layers = model.model.layers
    n = len(layers)
    if len(preset_heads) != n or len(preset_ffn) != n:
        raise SlimGPTError(f"the preset has {len(preset_heads)}/{len(preset_ffn)} ratios but the model has {n} "
                           "layers")
    terms = [layer_param_terms(layer) for layer in layers]
    for t in terms:
        t["align"] = layer_align(t["n_ffn"], align)
    payload = {
        "layers": terms,
        "total_params": count_parameters(model),
        "preset": {"hr": [float(r) for r in preset_heads], "fr": [float(r) for r in preset_ffn]},
        "map_ratios": list(MAP_RATIOS),
        "curves": None,
    }
    if curves is not None:
        if len(curves.layers) != n:
            raise SlimGPTError(f"the error curves have {len(curves.layers)} layers but the model has {n}")
        for i, (t, lc) in enumerate(zip(terms, curves.layers)):
            if (lc.n_kv, lc.n_ffn) != (t["n_kv"], t["n_ffn"]):
                raise SlimGPTError(f"layer {i}: the error curves are for {lc.n_kv} KV groups and {lc.n_ffn} "
                                   f"channels, the model has {t['n_kv']} and {t['n_ffn']}")
        payload["curves"] = [{"head_errors": _compact(lc.head_errors), "ffn_counts": _compact_counts(lc),
                              "ffn_errors": _compact(lc.ffn_errors)} for lc in curves.layers]
    return payload


def payload_curves(payload: dict) -> ModelCurves | None:
    """The curves exactly as the browser holds them (compacted), for `predict` and `sensitivity_map`."""
    if payload["curves"] is None:
        return None
    return ModelCurves([LayerCurves(t["n_kv"], t["heads_per_unit"], t["n_ffn"], list(c["head_errors"]), [],
                                    expand_counts(c["ffn_counts"]), list(c["ffn_errors"]), [], 0.0, 0.0)
                        for t, c in zip(payload["layers"], payload["curves"])])
