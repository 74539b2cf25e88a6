"""Run a llama-family model of ours under shear gates, through forward hooks (the modeling code is untouched).

Where gates multiply (SPEC §9): heads on the per-head attention output before o_proj; FFN channels on the input
of down_proj; a layer's gate on its o_proj and down_proj outputs; the hidden gate on the token embedding, on
o_proj and down_proj outputs and on every RMSNorm output, whose variance is taken over the open dimensions only.
The residual stream is then exactly zero outside the open dimensions, which makes the sliced model equal."""
from __future__ import annotations

import torch


def masked_rms_norm(norm, x: torch.Tensor, hidden_gate: torch.Tensor) -> torch.Tensor:
    """RMSNorm whose mean square runs over the open hidden dimensions only, output gated."""
    dtype = x.dtype
    h = x.to(torch.float32)
    open_dims = (hidden_gate != 0).sum().clamp(min=1)
    variance = h.pow(2).sum(-1, keepdim=True) / open_dims
    h = h * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * h.to(dtype) * hidden_gate.to(dtype)


class MaskedModel:
    """Hooks reading the current gates from `self.gates` (set them before each forward); `remove()` undoes."""

    def __init__(self, model):
        self.model = model
        self.gates: dict[str, torch.Tensor] = {}
        self.handles = []
        inner = model.model
        self._hook(inner.embed_tokens, self._embedding)
        norms = [inner.norm]
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            self.handles.append(attn.o_proj.register_forward_pre_hook(self._heads(i, attn.head_dim)))
            self._hook(attn.o_proj, self._block_output(i))
            self.handles.append(mlp.down_proj.register_forward_pre_hook(self._channels(i)))
            self._hook(mlp.down_proj, self._block_output(i))
            norms += [layer.input_layernorm, layer.post_attention_layernorm]
        for norm in norms:
            self._hook(norm, self._norm)

    def _hook(self, module, fn) -> None:
        self.handles.append(module.register_forward_hook(fn))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # hooks: each returns None (leave as is) when its structure is not masked

    def _embedding(self, module, args, out):
        z = self.gates.get("hidden")
        return None if z is None else out * z.to(out.dtype)

    def _norm(self, module, args, out):
        z = self.gates.get("hidden")
        return None if z is None else masked_rms_norm(module, args[0], z)

    def _heads(self, i: int, head_dim: int):
        def hook(module, args):
            kv, rep = self.gates.get("kv_groups"), self.gates.get("heads")
            if kv is None and rep is None:
                return None
            x = args[0]
            n_heads = x.shape[-1] // head_dim
            n_kv = kv.shape[-1] if kv is not None else n_heads // rep.shape[-1]
            gate = torch.ones(n_kv, n_heads // n_kv, dtype=x.dtype, device=x.device)
            if kv is not None:
                gate = gate * kv[i].to(x.dtype)[:, None]
            if rep is not None:
                gate = gate * rep[i].to(x.dtype)[None, :]
            # query head h belongs to KV group h // heads-per-group (transformers' repeat_kv order)
            scale = gate.reshape(n_heads, 1).expand(n_heads, head_dim).reshape(-1)
            return (x * scale,)
        return hook

    def _channels(self, i: int):
        def hook(module, args):
            z = self.gates.get("ffn")
            return None if z is None else (args[0] * z[i].to(args[0].dtype),)
        return hook

    def _block_output(self, i: int):
        def hook(module, args, out):
            layer, hidden = self.gates.get("layers"), self.gates.get("hidden")
            if layer is not None:
                out = out * layer[i].to(out.dtype)
            if hidden is not None:
                out = out * hidden.to(out.dtype)
            return out
        return hook
