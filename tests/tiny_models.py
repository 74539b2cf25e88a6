"""Tiny random decoders for exact-math tests (shapes, identities), never for quality claims."""
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from slimgpt_core.schedules import curves

# what each architecture needs beyond the shared sizes: sliding-window and global layers with a window shorter than
# the test sequences (so the two masks differ), Gemma's soft-capping, token ids inside the tiny vocabulary
_EXTRA = {
    "qwen2": lambda layers: dict(layer_types=["full_attention"] * layers),
    "qwen3": lambda layers: dict(layer_types=["full_attention"] * layers),
    "gemma2": lambda layers: dict(layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                                  + ["sliding_attention"] * (layers % 2), sliding_window=6,
                                  attn_logit_softcapping=5.0, final_logit_softcapping=3.0, query_pre_attn_scalar=8),
    "gemma3_text": lambda layers: dict(layer_types=(["sliding_attention"] * (layers - 1) + ["full_attention"]),
                                       sliding_window=6, query_pre_attn_scalar=8),
    "phi3": lambda layers: dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
# normalisations with per-channel weights worth randomising (q/k norms act per head_dim and must survive slicing)
_RANDOM_NORMS = ("qwen3", "gemma2", "gemma3_text", "phi3")


def tiny_model(arch: str = "llama", heads: int = 4, kv: int = 2, layers: int = 3, ffn: int = 48, hidden: int = 32,
               seed: int = 0, vocab: int = 101):
    """A tiny random decoder for exact-math tests (shapes, identities), never for quality claims."""
    torch.manual_seed(seed)
    kwargs = dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=128, head_dim=hidden // heads)
    kwargs.update(_EXTRA.get(arch, lambda n: {})(layers))
    config = AutoConfig.for_model(arch, **kwargs)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random weights with some spread, so every head matters differently
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif arch in _RANDOM_NORMS and "norm" in name:  # Gemma's norms scale by 1 + weight
                p.normal_(0.0 if arch.startswith("gemma") else 1.0, 0.2)
    model.config.use_cache = False
    return model


def auto_search_case(use_cache: bool = False):
    """The auto schedule's tiny case: a 3-layer GQA model, 12 × 24 calibration and 5 × 16 fitness tokens (seed 1),
    and the model's error curves on the calibration tokens (call it with SLIMGPT_CACHE pointing somewhere private)."""
    model = tiny_model(layers=3, hidden=32, heads=8, kv=4, ffn=40)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 101, (12, 24), generator=g)
    fitness = torch.randint(0, 101, (5, 16), generator=g)
    return model, tokens, fitness, curves.error_curves(model, tokens, device="cpu", use_cache=use_cache)
