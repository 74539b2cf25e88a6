"""Tiny random decoders for exact-math tests (shapes, identities), never for quality claims."""
import torch
from transformers import AutoConfig, AutoModelForCausalLM


def tiny_model(arch: str = "llama", heads: int = 4, kv: int = 2, layers: int = 3, ffn: int = 48, hidden: int = 32,
               seed: int = 0):
    """A tiny random decoder for exact-math tests (shapes, identities), never for quality claims."""
    torch.manual_seed(seed)
    kwargs = dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=101, max_position_embeddings=128, head_dim=hidden // heads)
    if arch == "qwen2":
        kwargs["layer_types"] = ["full_attention"] * layers
    config = AutoConfig.for_model(arch, **kwargs)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random weights with some spread, so every head matters differently
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.config.use_cache = False
    return model
