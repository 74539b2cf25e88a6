"""The architecture to shear to: whole-model counts, read from JSON, a config file or a model folder, checked
against the source model before any work."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.shapes import base_model_type, head_dim, layer_shape
from slimgpt_core.models import load_config

STRUCTURES = ("layers", "kv_groups", "heads", "ffn", "hidden")


@dataclass(frozen=True)
class Shape:
    """A uniform decoder shape: every layer has `heads` query heads in `kv_groups` KV groups and `ffn` channels."""
    layers: int
    kv_groups: int
    heads: int  # query heads per layer (kv_groups × heads per group)
    ffn: int
    hidden: int

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_groups

    def to_dict(self) -> dict:
        return asdict(self)


def source_shape(model) -> Shape:
    shapes = {layer_shape(layer) for layer in model.model.layers}
    if len(shapes) != 1:
        raise SlimGPTError("shear needs a source whose layers all have one shape (a dense model, not a pruned run)")
    q, kv, f = shapes.pop()
    return Shape(len(model.model.layers), kv, q, f, model.config.hidden_size)


def _from_config(config: dict) -> dict:
    per_layer = {k: config.get(k) for k in ("layer_num_attention_heads", "layer_num_key_value_heads",
                                             "layer_intermediate_size")}
    for key, values in per_layer.items():
        if values and len(set(values)) > 1:
            raise SlimGPTError(f"the target config's layers differ in shape ({key}): shear targets one shape for "
                               "every layer")
    pick = {key: values[0] for key, values in per_layer.items() if values}
    out = {"layers": config.get("num_hidden_layers"), "hidden": config.get("hidden_size"),
           "heads": pick.get("layer_num_attention_heads", config.get("num_attention_heads")),
           "kv_groups": pick.get("layer_num_key_value_heads",
                                 config.get("num_key_value_heads", config.get("num_attention_heads"))),
           "ffn": pick.get("layer_intermediate_size", config.get("intermediate_size"))}
    if config.get("head_dim") is not None:
        out["head_dim"] = config["head_dim"]
    elif out["hidden"] and out["heads"]:
        out["head_dim"] = out["hidden"] // out["heads"]
    return {k: v for k, v in out.items() if v is not None}


def read_target(spec: str) -> dict:
    """A JSON object ({"layers": 24, "kv_groups": 2, "heads": 6, "ffn": 1024, "hidden": 512}; missing keys keep
    the source's), a config.json, or a model folder / hub id whose shape to copy."""
    text = spec.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise SlimGPTError(f"cannot read the target as JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise SlimGPTError("the target must be a JSON object such as {\"layers\": 4, \"ffn\": 128}")
        unknown = sorted(set(raw) - set(STRUCTURES))
        if unknown:
            raise SlimGPTError(f"unknown target key(s) {', '.join(unknown)} (use {', '.join(STRUCTURES)})")
        return raw
    path = Path(spec)
    if path.is_file():
        try:
            return _from_config(json.loads(path.read_text()))
        except ValueError:
            raise SlimGPTError(f"{spec} is not a JSON config") from None
    return _from_config(load_config(spec)[0].to_dict())


def resolve_target(raw: dict, model) -> Shape:
    """The full target shape (missing entries: the source's), validated against `model`."""
    src = source_shape(model)
    values = {key: raw.get(key) for key in STRUCTURES}
    rep = src.heads // src.kv_groups
    if values["kv_groups"] is None:
        values["kv_groups"] = src.kv_groups
    if values["heads"] is None:  # keep the source's query heads per group
        values["heads"] = _int(values["kv_groups"], "kv_groups") * rep
    for key in ("layers", "ffn", "hidden"):
        if values[key] is None:
            values[key] = getattr(src, key)
    target = Shape(**{k: _int(v, k) for k, v in values.items()})
    names = {"layers": "layers", "kv_groups": "KV groups", "heads": "query heads", "ffn": "FFN channels",
             "hidden": "hidden dimensions"}
    for key in STRUCTURES:
        t, s = getattr(target, key), getattr(src, key)
        if t < 1:
            raise SlimGPTError(f"the target must keep at least one of the {names[key]}, got {key}={t}")
        if t > s:
            raise SlimGPTError(f"the target has {t} {names[key]} but the source has only {s}: shear can only shrink")
    if target.heads % target.kv_groups:
        raise SlimGPTError(f"{target.heads} query heads do not divide into {target.kv_groups} KV groups: every group "
                           "must keep the same number of query heads")
    if target.heads_per_group > rep:
        raise SlimGPTError(f"the target has {target.heads_per_group} query heads per KV group but the source has "
                           f"{rep}: shear can only shrink")
    if target.hidden < src.hidden and str(base_model_type(model.config)).startswith("gemma"):
        # the cut folds the hidden gate into llama-style norms (weight · x); Gemma's scale by 1 + weight, and its
        # embedding by √hidden_size, which a reloaded checkpoint recomputes from the smaller size
        raise SlimGPTError(f"{model.config.model_type} cannot lose hidden dimensions (its norms scale by 1 + weight "
                           f"and its embedding by √hidden_size): keep hidden={src.hidden}")
    if raw.get("head_dim") not in (None, head_dim(model.config)):
        raise SlimGPTError(f"the target's head size {raw['head_dim']} differs from the model's "
                           f"{head_dim(model.config)}: heads cannot be resized")
    return target


def _int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise SlimGPTError(f"target {key} must be a whole number, got {value!r}")
    return int(value)
