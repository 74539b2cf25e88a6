"""Decoder-layer forwards over calibration activations: capture a layer's inputs, run it, collect one linear
layer's input statistics. Micro-batched; activations may live in (pinned) CPU memory while the layer is on the GPU."""
from __future__ import annotations

import torch

from slimgpt_core.methods import obs


class _StopForward(Exception):
    """Raised in a hook once the needed inputs are captured, to skip the rest of the forward."""


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    return obj


class LayerKwargs(dict):
    """Layer 0's keyword arguments (a dict, as every caller passes them), with every layer's own in `per_layer`:
    sliding-window and global layers (Gemma 2/3, Qwen with sliding windows) get different masks and Gemma 3's
    local layers a different rotary embedding."""

    def __init__(self, per_layer: list[dict]):
        super().__init__(per_layer[0])
        self.per_layer = per_layer

    def layer(self, i: int) -> dict:
        return self.per_layer[i]


class _KwargsRecorder(torch.nn.Module):
    """Stands in for a decoder layer for one forward: records the kwargs the model passes it and hands the hidden
    states on unchanged (no layer computes; the last one stops the forward)."""

    def __init__(self, layer, into: list, i: int, last: bool):
        super().__init__()
        for name in ("attention_type", "layer_type", "is_sliding"):  # what a model's loop may read from its layers
            if hasattr(layer, name):
                setattr(self, name, getattr(layer, name))
        self.into, self.i, self.last = into, i, last

    def forward(self, *args, **kwargs):
        self.into[self.i] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values",
                                                                          "past_key_value", "use_cache")}
        if self.last:
            raise _StopForward
        return args[0] if args else kwargs["hidden_states"]


def capture_layer_inputs(model, tokens: torch.Tensor, batch_size: int, device: torch.device):
    """Hidden states entering layer 0 for every calibration sample, and the layers' other kwargs (`LayerKwargs`).

    Kwargs come from a batch of one so that they broadcast over any batch size, with stand-ins for the layers
    (transformers 5 passes position_embeddings etc. as kwargs); caches are dropped. Then a forward pre-hook on
    layer 0 takes its inputs."""
    layers = model.model.layers
    embed_device = model.get_input_embeddings().weight.device
    per_layer: list[dict] = [{} for _ in layers]
    real = list(layers)
    with torch.no_grad():
        try:
            for i, layer in enumerate(real):
                layers[i] = _KwargsRecorder(layer, per_layer, i, i == len(real) - 1)
            model(tokens[:1].to(embed_device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for i, layer in enumerate(real):
                layers[i] = layer
    chunks: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        chunks.append((args[0] if args else kwargs["hidden_states"]).detach().to(device))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, tokens.shape[0], batch_size):
                try:
                    model(tokens[start:start + batch_size].to(embed_device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return torch.cat(chunks), LayerKwargs([_to(kw, device) for kw in per_layer])


class _TF32:
    """TF32 for the layer forwards only; restored afterwards."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.enabled
        return self

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _layer_device(layer) -> torch.device:
    return next(layer.parameters()).device


def _over_micro_batches(layer, x: torch.Tensor, kwargs: dict, batch_size: int, out: torch.Tensor | None = None,
                        tf32: bool = False, before=None) -> None:
    """Run `layer` on x one micro-batch at a time (x may live in CPU memory while the layer is on the GPU).

    A hook may end a forward early by raising `_StopForward`; the outputs of forwards that finish are written to
    `out` when given. `before(k)` runs before micro-batch k (to set what a replayed module returns)."""
    dev = _layer_device(layer)
    with torch.no_grad(), _TF32(tf32):
        for k, s in enumerate(range(0, x.shape[0], batch_size)):
            if before is not None:
                before(k)
            try:
                y = layer(x[s:s + batch_size].to(dev, non_blocking=True), **kwargs)
            except _StopForward:
                continue
            if out is not None:
                out[s:s + batch_size].copy_(y[0] if isinstance(y, tuple) else y, non_blocking=True)


def run_layer(layer, x: torch.Tensor, kwargs: dict, batch_size: int, out: torch.Tensor | None = None,
              tf32: bool = False) -> torch.Tensor:
    """Layer outputs for every sample; x may live in CPU memory while the layer is on the GPU."""
    out = torch.empty_like(x) if out is None else out
    _over_micro_batches(layer, x, kwargs, batch_size, out, tf32)
    return out


def collect_hessian(layer, linear: torch.nn.Linear, x: torch.Tensor, kwargs: dict, batch_size: int,
                    tf32: bool = False) -> torch.Tensor:
    """H = 2XXᵀ/N of `linear`'s inputs when `layer` runs on x; the forward stops at `linear`."""
    acc = obs.HessianAccumulator(linear.in_features, device=linear.weight.device)

    def hook(module, args):
        with _TF32(False):  # statistics in full fp32 whatever the forwards use
            acc.add_batch(args[0])
        raise _StopForward

    handle = linear.register_forward_pre_hook(hook)
    try:
        _over_micro_batches(layer, x, kwargs, batch_size, tf32=tf32)
    finally:
        handle.remove()
    acc.all_reduce()  # torch.distributed: every rank ends with the statistics of all shards
    return acc.H


def collect_layer_hessians(layer, x: torch.Tensor, kwargs: dict, batch_size: int,
                           tf32: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """H of o_proj's and of down_proj's inputs and the layer's outputs, in one forward pass over x (dense
    statistics: nothing is pruned between the two, so one pass serves both)."""
    attn, mlp = layer.self_attn.o_proj, layer.mlp.down_proj
    accs = [obs.HessianAccumulator(attn.in_features, attn.weight.device),
            obs.HessianAccumulator(mlp.in_features, mlp.weight.device)]

    def hook(acc):
        def add(module, args):
            with _TF32(False):
                acc.add_batch(args[0])
        return add

    handles = [attn.register_forward_pre_hook(hook(accs[0])), mlp.register_forward_pre_hook(hook(accs[1]))]
    try:
        out = run_layer(layer, x, kwargs, batch_size, tf32=tf32)
    finally:
        for h in handles:
            h.remove()
    for acc in accs:
        acc.all_reduce()
    return accs[0].H, accs[1].H, out


# Passes that keep what they capture, so that each layer's attention and MLP run once (issue 13). The layer's own
# forward still does the residual adds and norms: the attention (and the MLP) are replayed from the kept inputs.

def keep_on(t: torch.Tensor, where: torch.device) -> torch.Tensor:
    """t on `where` (pinned when that is the CPU and a GPU computes), to keep across passes."""
    if where.type == "cpu" and t.device.type == "cuda":
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
    return t.to(where)  # a fresh activation of a finished forward: nothing overwrites it


def capture_attention_inputs(layer, x: torch.Tensor, kwargs: dict, batch_size: int, where: torch.device,
                             acc: obs.HessianAccumulator | None = None, out: torch.Tensor | None = None,
                             tf32: bool = False) -> list[torch.Tensor]:
    """o_proj's inputs (the heads' attention outputs), one chunk per micro-batch, kept on `where`; with `acc`
    also their statistics. Without `out` the forward stops at o_proj; with it the layer runs to the end and
    writes its outputs there (dense reference and attention statistics in one pass)."""
    chunks: list[torch.Tensor] = []

    def hook(module, args):
        if acc is not None:
            with _TF32(False):
                acc.add_batch(args[0])
        chunks.append(keep_on(args[0], where))
        if out is None:
            raise _StopForward

    handle = layer.self_attn.o_proj.register_forward_pre_hook(hook)
    try:
        _over_micro_batches(layer, x, kwargs, batch_size, out, tf32)
    finally:
        handle.remove()
    if acc is not None:
        acc.all_reduce()
    return chunks


# the norm whose output only the module reads, in the decoder layers of every supported architecture (pre-norm,
# sequential attention then MLP); Gemma 2/3 norm the attention's output too and feed the MLP through their own norm
_FEEDS = {"self_attn": "input_layernorm", "mlp": "post_attention_layernorm"}
_GEMMA_FEEDS = {"self_attn": "input_layernorm", "mlp": "pre_feedforward_layernorm"}


class _Replayed:
    """While active, `module` returns `result()` instead of computing; the surrounding layer runs as usual. The
    norm that only feeds `module` (`_FEEDS`) passes its input through meanwhile: its output would be ignored."""

    def __init__(self, layer: torch.nn.Module, name: str, result, active: bool = True):
        self.module = getattr(layer, name) if active else None
        feeds = _GEMMA_FEEDS if hasattr(layer, "pre_feedforward_layernorm") else _FEEDS
        self.norm = getattr(layer, feeds[name], None) if active else None
        self.result = result

    def __enter__(self):
        if self.module is not None:
            self.module.forward = lambda *args, **kwargs: self.result()
        if self.norm is not None:
            self.norm.forward = lambda hidden_states: hidden_states
        return self

    def __exit__(self, *exc):
        for module in (self.module, self.norm):
            if module is not None:
                del module.forward


def _select(chunk: torch.Tensor, columns: torch.Tensor | None, dev: torch.device) -> torch.Tensor:
    chunk = chunk.to(dev, non_blocking=True)
    return chunk if columns is None else chunk.index_select(-1, columns.to(dev))


def collect_mlp_inputs(layer, x: torch.Tensor, kwargs: dict, batch_size: int, attn_inputs: list[torch.Tensor],
                       columns: torch.Tensor | None, acc: obs.HessianAccumulator | None, where: torch.device,
                       keep_inputs: bool = False, keep_attention: bool = False, tf32: bool = False
                       ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """down_proj's statistics after head pruning without a second attention pass: the attention's output is the
    (updated) o_proj applied to the kept heads' `columns` of its captured inputs. Returns the attention's outputs
    (with `keep_attention`) and down_proj's inputs (with `keep_inputs`), one chunk per micro-batch kept on `where`
    for `replay_outputs`, else None. Without `acc` (statistics from the cache) only the inputs are kept."""
    attn, dev = layer.self_attn, _layer_device(layer)
    attn_outputs = [] if keep_attention else None
    mlp_inputs = [] if keep_inputs else None
    current: dict[str, torch.Tensor] = {}

    def attention():
        y = attn.o_proj(current["z"])
        if attn_outputs is not None:
            attn_outputs.append(keep_on(y, where))
        return y, None

    def hook(module, args):
        if acc is not None:
            with _TF32(False):
                acc.add_batch(args[0])
        if mlp_inputs is not None:
            mlp_inputs.append(keep_on(args[0], where))
        raise _StopForward

    handle = layer.mlp.down_proj.register_forward_pre_hook(hook)
    try:
        with _Replayed(layer, "self_attn", attention):
            _over_micro_batches(layer, x, kwargs, batch_size, tf32=tf32,
                                before=lambda k: current.update(z=_select(attn_inputs[k], columns, dev)))
    finally:
        handle.remove()
    if acc is not None:
        acc.all_reduce()
    return attn_outputs, mlp_inputs


def replay_outputs(layer, x: torch.Tensor, kwargs: dict, batch_size: int, attn_inputs: list[torch.Tensor] | None,
                   columns: torch.Tensor | None, out: torch.Tensor, attn_outputs: list[torch.Tensor] | None = None,
                   mlp_inputs: list[torch.Tensor] | None = None, down_weight: torch.Tensor | None = None,
                   tf32: bool = False) -> torch.Tensor:
    """The pruned layer's outputs from what `collect_mlp_inputs` kept: the attention's outputs, else o_proj on the
    kept heads' `columns` of `attn_inputs`; down_proj's inputs at full width with `down_weight` (down_proj updated
    at full width, removed columns zero: cheaper than taking the kept channels' columns of its inputs), else the
    pruned MLP run again."""
    attn, mlp, dev = layer.self_attn, layer.mlp, _layer_device(layer)
    current = {"k": 0}

    def attention():
        if attn_outputs is not None:
            return attn_outputs[current["k"]].to(dev, non_blocking=True), None
        return attn.o_proj(_select(attn_inputs[current["k"]], columns, dev)), None

    def mlp_output():
        return torch.nn.functional.linear(mlp_inputs[current["k"]].to(dev, non_blocking=True), down_weight,
                                          mlp.down_proj.bias)

    with _Replayed(layer, "self_attn", attention), _Replayed(layer, "mlp", mlp_output,
                                                             active=mlp_inputs is not None):
        _over_micro_batches(layer, x, kwargs, batch_size, out, tf32, before=lambda k: current.update(k=k))
    return out
