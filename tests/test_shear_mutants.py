"""Sheared-LLaMA's masks, cut and mix update against computations written out here (issue 15: mutation testing).

The hard-concrete numbers are SPEC §9's written with literal constants (l = −0.1, r = 1.1, β = 2/3, log α in
[ln 0.01, ln 100], the eval gate σ(0.8·log α/β)); parameter counts come from real models cut to binary gates;
the mix update is Algorithm 1 with numbers."""
import math

import pytest
import torch

from conftest import tiny_model
from slimgpt_core.methods.shear import hard_concrete as hc
from slimgpt_core.methods.shear.cut import cut_model
from slimgpt_core.training.domain_mix import draw_domains, update_domain_weights
from slimgpt_core.methods.shear.masks import ShearMasks
from slimgpt_core.methods.shear.target import Shape, source_shape
from slimgpt_core.base.shapes import count_parameters

SOURCE = Shape(layers=3, kv_groups=2, heads=6, ffn=8, hidden=12)  # 3 query heads per group, head size 2
ALL = Shape(layers=2, kv_groups=1, heads=2, ffn=5, hidden=9)  # shrinks every structure
SOME = Shape(layers=3, kv_groups=2, heads=4, ffn=5, hidden=12)  # only heads per group (3 -> 2) and FFN


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z ≠ 0) = σ(log α − β·ln(−l/r)) with l = −0.1, r = 1.1, β = 2/3."""
    return torch.sigmoid(log_alpha.double() - 2 / 3 * math.log(0.1 / 1.1))


def masks_with_random_log_alpha(target: Shape, tied=False, seed=0, scale=2.0) -> ShearMasks:
    masks = ShearMasks(SOURCE, target, head_dim=2, vocab=101, tied=tied)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for la in masks.log_alpha.values():
            la.copy_(torch.randn(la.shape, generator=g) * scale)
    return masks


def test_a_mask_per_shrunk_structure_starting_nearly_dense():
    masks = ShearMasks(SOURCE, ALL, 2, 101, False)
    assert sorted(masks.names) == ["ffn", "heads", "hidden", "kv_groups", "layers"]
    shapes = {name: tuple(la.shape) for name, la in masks.log_alpha.items()}
    assert shapes == {"layers": (3,), "kv_groups": (3, 2), "heads": (3, 3), "ffn": (3, 8), "hidden": (12,)}
    assert all(torch.all(la == 5.0) and la.requires_grad for la in masks.log_alpha.values())
    assert [p is la for p, la in zip(masks.mask_parameters(), masks.log_alpha.values())] == [True] * 5
    assert all(torch.equal(lam, torch.zeros(2)) for lam in masks.lambda_parameters())
    assert list(masks.lambdas) == masks.names and len(masks.lambda_parameters()) == 5
    dense = float(keep_probability(torch.tensor(5.0)))  # 0.9991
    assert float(masks.expected_counts()["ffn"][0].detach()) == pytest.approx(8 * dense)
    some = ShearMasks(SOURCE, SOME, 2, 101, False)  # a structure kept whole gets no mask
    assert sorted(some.names) == ["ffn", "heads"] and list(some.lambdas) == some.names
    assert some.target_sparsity("heads") == pytest.approx(1 / 3) and some.target_sparsity("ffn") == 3 / 8
    assert ShearMasks(SOURCE, SOURCE, 2, 101, False).names == []


def test_expected_counts_and_shape_from_the_keep_probabilities():
    masks = masks_with_random_log_alpha(ALL)
    counts = masks.expected_counts()
    p = {name: keep_probability(la.detach()) for name, la in masks.log_alpha.items()}
    assert counts["layers"].shape == () and counts["ffn"].shape == (3,)
    for name in masks.names:
        assert torch.allclose(counts[name].double(), p[name].sum(-1), atol=1e-5), name
    shape = masks.expected_shape()
    by_hand = {"layers": float(p["layers"].sum()), "kv_groups": float(p["kv_groups"].sum(1).mean()),
               "heads_per_group": float(p["heads"].sum(1).mean()), "ffn": float(p["ffn"].sum(1).mean()),
               "hidden": float(p["hidden"].sum())}
    by_hand["heads"] = by_hand["kv_groups"] * by_hand["heads_per_group"]
    assert shape == pytest.approx(by_hand, rel=1e-5)
    some = masks_with_random_log_alpha(SOME).expected_shape()  # unmasked structures: the source's counts
    assert (some["layers"], some["kv_groups"], some["hidden"]) == (3, 2, 12)
    assert some["heads"] == pytest.approx(2 * some["heads_per_group"]) and some["heads_per_group"] < 3


@pytest.mark.parametrize("target", [ALL, SOME], ids=["all", "some"])
def test_lagrangian_by_hand(target):
    masks = masks_with_random_log_alpha(target, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for lam in masks.lambdas.values():
            lam.copy_(torch.randn(2, generator=g) * 3)
    warmup = 0.6
    total, gaps = masks.lagrangian(warmup)
    expected, expected_gaps = 0.0, {}
    keep = {"layers": target.layers, "kv_groups": target.kv_groups, "heads": target.heads_per_group,
            "ffn": target.ffn, "hidden": target.hidden}
    for name, la in masks.log_alpha.items():
        rows = la.detach().reshape(-1, la.shape[-1])  # one row per layer (or the single row)
        size = rows.shape[1]
        lam1, lam2 = masks.lambdas[name].detach().double().tolist()
        terms, row_gaps = [], []
        for row in rows:
            sparsity = 1 - float(keep_probability(row).sum()) / size
            gap = sparsity - warmup * (1 - keep[name] / size)
            terms.append(lam1 * gap + lam2 * gap * gap)
            row_gaps.append(gap)
        expected += sum(terms) / len(terms)
        expected_gaps[name] = sum(row_gaps) / len(row_gaps)
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert gaps == pytest.approx(expected_gaps, rel=1e-5, abs=1e-6)
    # both sides get gradients: the masks descend on it, the multipliers ascend
    total.backward()
    for name in masks.names:
        assert masks.log_alpha[name].grad.abs().sum() > 0 and masks.lambdas[name].grad.abs().sum() > 0
        assert masks.lambdas[name].grad[0] == pytest.approx(expected_gaps[name], rel=1e-5, abs=1e-6)


def _binary(masks: ShearMasks, seed: int) -> None:
    """Log α of ±30: every keep probability is 0 or 1 (to fp32), at least one entry open per row."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for la in masks.log_alpha.values():
            open_ = torch.rand(la.shape, generator=g) < 0.6
            open_[..., 0] |= ~open_.any(-1)
            la.copy_(torch.where(open_, 30.0, -30.0))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("target", [ALL, SOME], ids=["all", "some"])
def test_expected_parameters_count_the_model_cut_to_binary_gates(tied, target):
    """With every keep probability 0 or 1 the expectation is a count: that of the real model cut to those gates."""
    for seed in range(3):
        model = tiny_model(heads=6, kv=2, layers=3, ffn=8, hidden=12, seed=seed)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        assert source_shape(model) == SOURCE
        masks = ShearMasks(SOURCE, target, 2, 101, tied)
        _binary(masks, seed)
        gates = {name: (la.detach() > 0).float() for name, la in masks.log_alpha.items()}
        cut_model(model, gates)
        assert masks.expected_parameters() == pytest.approx(count_parameters(model), abs=1e-2)


def test_expected_parameters_with_fractional_probabilities():
    """Independent structures: each layer's count is multilinear in the kept entries, so its expectation is the
    count at the expected sizes, weighted by the layer's keep probability."""
    for target, tied in [(ALL, False), (ALL, True), (SOME, False)]:
        masks = masks_with_random_log_alpha(target, tied=tied, seed=3)
        p = {name: keep_probability(la.detach()) for name, la in masks.log_alpha.items()}
        hidden = float(p["hidden"].sum()) if "hidden" in p else 12.0
        total = hidden * (101 * (1 if tied else 2) + 1)  # embedding (+ untied head) and the final norm
        for layer in range(3):
            kv = float(p["kv_groups"][layer].sum()) if "kv_groups" in p else 2.0
            per_group = float(p["heads"][layer].sum()) if "heads" in p else 3.0
            ffn = float(p["ffn"][layer].sum()) if "ffn" in p else 8.0
            attention = hidden * 2 * (2 * kv * per_group + 2 * kv)  # q, o (kv·per_group heads); k, v (kv heads)
            mlp = 3 * hidden * ffn
            norms = 2 * hidden
            total += (float(p["layers"][layer]) if "layers" in p else 1.0) * (attention + mlp + norms)
        assert masks.expected_parameters() == pytest.approx(total, rel=1e-5)


def test_target_parameters_count_the_model_cut_to_the_target():
    for tied in (False, True):
        model = tiny_model(heads=6, kv=2, layers=3, ffn=8, hidden=12)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        masks = masks_with_random_log_alpha(ALL, tied=tied, seed=4)
        cut_model(model, masks.deterministic())
        assert source_shape(model) == ALL
        assert masks.target_parameters() == count_parameters(model)
        assert isinstance(masks.target_parameters(), int)


def test_deterministic_gates_keep_the_target_count_at_their_eval_values():
    masks = masks_with_random_log_alpha(ALL, seed=5)
    gates = masks.deterministic()
    keep = {"layers": 2, "kv_groups": 1, "heads": 2, "ffn": 5, "hidden": 9}
    assert list(gates) == masks.names
    for name, la in masks.log_alpha.items():
        la = la.detach()
        rows, values = la.reshape(-1, la.shape[-1]), gates[name].reshape(-1, la.shape[-1])
        assert not gates[name].requires_grad
        for row, value in zip(rows, values):
            top = set(sorted(range(len(row)), key=lambda j: -float(row[j]))[:keep[name]])
            for j in range(len(row)):
                expected = 1 / (1 + math.exp(-0.8 * float(row[j]) / (2 / 3))) if j in top else 0.0
                # fp32 sigmoid of 1.2·la: the argument's rounding moves it by (1 − σ)·|x|·2⁻²⁴ (|x| ≲ 6) plus a
                # few ulp of its own, under 17·2⁻²⁴ ≈ 1e-6
                assert float(value[j]) == pytest.approx(expected, rel=1e-6, abs=1e-7), (name, j)


def test_training_gates_follow_each_masks_own_log_alpha():
    masks = ShearMasks(SOURCE, ALL, 2, 101, False)
    _binary(masks, 6)
    sample = masks.sample()
    assert list(sample) == masks.names
    for name, la in masks.log_alpha.items():  # log α ±30: the stretched, clipped sample is exactly 1 or 0
        assert torch.equal(sample[name], (la.detach() > 0).float()), name
    with torch.no_grad():
        masks.log_alpha["ffn"].fill_(0.0)
    draws = torch.stack([masks.sample()["ffn"] for _ in range(400)])  # 400 × 24 draws
    assert ((draws > 0) & (draws < 1)).any() and draws.min() == 0 and draws.max() == 1
    assert float((draws != 0).float().mean()) == pytest.approx(float(keep_probability(torch.tensor(0.0))), abs=0.02)


def test_a_sample_is_the_stretched_clipped_concrete_of_its_uniforms():
    """z = clamp(σ((ln u − ln(1−u) + log α)/β)·1.2 − 0.1, 0, 1) with u drawn by the given generator, in log α's
    dtype and on its device (meta as the default device must not matter)."""
    log_alpha = torch.linspace(-6, 6, 500, dtype=torch.float64)
    with torch.device("meta"):
        z = hc.sample(log_alpha, torch.Generator().manual_seed(3))
    u = torch.rand(500, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / (2 / 3))
    assert z.dtype == torch.float64 and z.device.type == "cpu"
    assert torch.allclose(z, (s * 1.2 - 0.1).clamp(0, 1), rtol=0, atol=1e-12)
    torch.manual_seed(0)  # the global generator is not used
    assert torch.equal(z, hc.sample(log_alpha, torch.Generator().manual_seed(3)))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert hc.sample(log_alpha.float()).dtype == torch.float32
    finally:
        torch.set_default_dtype(default)
    assert hc.sample(torch.full((4,), -5.0), torch.Generator().manual_seed(0)).tolist() == [0.0] * 4


def test_clamp_keeps_log_alpha_within_a_hundredfold_odds():
    masks = masks_with_random_log_alpha(ALL, seed=7, scale=8.0)
    before = {name: la.detach().clone() for name, la in masks.log_alpha.items()}
    assert all((b.abs() > math.log(100)).any() for b in before.values())
    masks.clamp_()
    for name, la in masks.log_alpha.items():
        expected = before[name].clamp(math.log(0.01), math.log(100))
        assert torch.allclose(la.detach(), expected, rtol=0, atol=1e-6), name
        assert la.requires_grad


# the mix update (Sheared-LLaMA, Algorithm 1)


def test_mix_update_with_numbers():
    w = torch.tensor([0.25, 0.25, 0.5])
    losses, reference = torch.tensor([3.0, 2.0, 2.2]), torch.tensor([2.5, 2.0, 2.7])
    # paper: Δ = max(ℓ − ℓ_ref, 0) = (0.5, 0, 0); w·e^Δ = (0.25·1.6487, 0.25, 0.5), normalised
    e = math.exp(0.5)
    paper = update_domain_weights(w, losses, reference)
    assert paper.tolist() == pytest.approx([0.25 * e / (0.75 + 0.25 * e), 0.25 / (0.75 + 0.25 * e),
                                            0.5 / (0.75 + 0.25 * e)], rel=1e-6)
    # code: Δ = (0.5, 0, −0.5), then (1 − c)·w + c/3
    raw = [0.25 * e, 0.25, 0.5 / e]
    for c in (1e-4, 0.3):
        kw = {} if c == 1e-4 else {"smoothing": c}
        code = update_domain_weights(w, losses, reference, "code", **kw)
        assert code.tolist() == pytest.approx([(1 - c) * r / sum(raw) + c / 3 for r in raw], rel=1e-6)
    # a domain at weight 0 stays at 0 in the paper variant, and the others are normalised without it
    zero = update_domain_weights(torch.tensor([0.0, 0.5, 0.5]), losses, reference)
    assert zero.tolist() == pytest.approx([0.0, 0.5, 0.5], abs=1e-12)


@pytest.mark.parametrize("args, sentence", [
    ((torch.ones(3) / 3, torch.ones(3), torch.ones(2)), "weights, losses and reference losses need one entry per "
                                                        "domain"),
    ((torch.ones(2, 2) / 4, torch.ones(2, 2), torch.ones(2, 2)), "weights, losses and reference losses need one "
                                                                  "entry per domain"),
    ((torch.ones(3) / 3, torch.ones(3), torch.ones(3), "mean"), "variant must be 'paper' or 'code', got 'mean'"),
])
def test_mix_update_refuses_bad_input(args, sentence):
    with pytest.raises(ValueError) as info:
        update_domain_weights(*args)
    assert str(info.value) == sentence


def test_domains_drawn_from_the_given_generator():
    w = torch.tensor([0.2, 0.5, 0.3])
    a = draw_domains(w, 50, torch.Generator().manual_seed(0))
    torch.manual_seed(123)  # the global generator is neither used nor needed
    b = draw_domains(w, 50, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (50,)
    assert not torch.equal(a, draw_domains(w, 50, torch.Generator().manual_seed(1)))
    assert torch.equal(a, torch.multinomial(w, 50, replacement=True, generator=torch.Generator().manual_seed(0)))


# the cut, against a forward pass written out with plain torch ops


def _rms(x, weight, eps, open_dims):
    """RMSNorm over the open hidden dimensions only (the closed ones hold zeros)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / open_dims + eps) * weight


def _rope(x, theta):
    """Rotary embedding of [batch, heads, tokens, d] (rotate-half convention)."""
    d, n = x.shape[-1], x.shape[-2]
    freqs = torch.arange(n, dtype=torch.float32)[:, None] / theta ** (torch.arange(0, d, 2).float() / d)[None, :]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    rotated = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rotated * sin


def gated_forward(model, ids, gates):
    """Logits of the full-size `model` with every gate applied where SPEC §9 puts it: hidden gate on the
    embedding, on each block's output and on every norm's output; head gates (KV group × head within group) on
    the heads' outputs; channel gates on the FFN; a layer's gate on its two block outputs."""
    c = model.config
    n_heads, n_kv, hidden = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    d, rep, eps = hidden // n_heads, n_heads // n_kv, c.rms_norm_eps
    theta = c.rope_parameters["rope_theta"]
    z_hidden = gates.get("hidden", torch.ones(hidden))
    open_dims = float((z_hidden != 0).sum())
    x = model.model.embed_tokens.weight[ids] * z_hidden
    b, n = ids.shape
    causal = torch.full((n, n), float("-inf")).triu(1)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        z_layer = gates["layers"][i] if "layers" in gates else 1.0
        h = _rms(x, layer.input_layernorm.weight, eps, open_dims) * z_hidden
        q = (h @ attn.q_proj.weight.T).view(b, n, n_heads, d).transpose(1, 2)
        k = (h @ attn.k_proj.weight.T).view(b, n, n_kv, d).transpose(1, 2)
        v = (h @ attn.v_proj.weight.T).view(b, n, n_kv, d).transpose(1, 2)
        q, k = _rope(q, theta), _rope(k, theta)
        heads = []
        for head in range(n_heads):
            g = head // rep  # query head `head` reads KV group head // rep
            weights = torch.softmax(q[:, head] @ k[:, g].transpose(-1, -2) / math.sqrt(d) + causal, -1)
            z = gates["kv_groups"][i, g] if "kv_groups" in gates else 1.0
            if "heads" in gates:
                row = gates["heads"][i] if gates["heads"].dim() == 2 else gates["heads"][i, g]
                z = z * row[head % rep]
            heads.append(weights @ v[:, g] * z)
        out = torch.cat(heads, -1) @ attn.o_proj.weight.T
        x = x + out * z_layer * z_hidden
        h = _rms(x, layer.post_attention_layernorm.weight, eps, open_dims) * z_hidden
        a = torch.nn.functional.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)
        a = a * (gates["ffn"][i] if "ffn" in gates else 1.0)
        x = x + (a @ mlp.down_proj.weight.T) * z_layer * z_hidden
    return _rms(x, model.model.norm.weight, eps, open_dims) * z_hidden @ model.lm_head.weight.T


def _gates(target, seed, minitron=False):
    """Deterministic gates of random log α (values between 0 and 1, not binary); Minitron's head gate is one row
    per KV group, binary."""
    masks = masks_with_random_log_alpha(target, seed=seed)
    gates = masks.deterministic()
    if minitron and "heads" in gates:
        g = torch.Generator().manual_seed(seed)
        per_group = torch.zeros(3, 2, 3)
        for i in range(3):
            for group in range(2):
                per_group[i, group, torch.randperm(3, generator=g)[:target.heads_per_group]] = 1.0
        gates["heads"] = per_group
    return gates


@pytest.mark.parametrize("target, tied, minitron", [
    (ALL, False, False), (ALL, True, False), (ALL, False, True), (SOME, True, False), (SOME, False, True),
    (Shape(layers=2, kv_groups=2, heads=6, ffn=8, hidden=12), False, False),  # layers only
    (Shape(layers=3, kv_groups=1, heads=3, ffn=8, hidden=7), True, False),  # KV groups and hidden only
], ids=["all", "all-tied", "all-minitron", "some-tied", "some-minitron", "layers", "kv-hidden-tied"])
def test_cut_equals_the_gated_forward_written_out(target, tied, minitron):
    model = tiny_model(heads=6, kv=2, layers=3, ffn=8, hidden=12, seed=1)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():  # norms other than all-ones, so that slicing and scaling them matters
        for module in model.modules():
            if "RMSNorm" in type(module).__name__:
                module.weight.uniform_(0.5, 1.5)
    gates = _gates(target, seed=8, minitron=minitron)
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = gated_forward(model, ids, gates)
        cut_model(model, gates)
        logits = model(ids).logits
    assert (logits - expected).abs().max() < 2e-5
    model.set_attn_implementation("eager")  # eager attention repeats each KV head num_key_value_groups times
    with torch.no_grad():
        assert (model(ids).logits - expected).abs().max() < 2e-5
    assert source_shape(model) == target and count_parameters(model) == ShearMasks(
        SOURCE, target, 2, 101, tied).target_parameters()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers) == (target.hidden, target.layers)
    assert model.model.embed_tokens.embedding_dim == target.hidden
    for pos, layer in enumerate(model.model.layers):
        assert layer.self_attn.num_key_value_groups == target.heads_per_group
        assert layer.mlp.intermediate_size == target.ffn and layer.self_attn.layer_idx == pos
    # decoding with a KV cache (indexed by layer_idx) gives the full forward's last logits
    with torch.no_grad():
        first = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=first.past_key_values, use_cache=True).logits[:, -1]
    assert torch.allclose(step, logits[:, -1], atol=1e-5)


def test_cut_of_a_qwen2_model_keeps_the_kept_layers_types():
    model = tiny_model("qwen2", heads=6, kv=2, layers=3, ffn=8, hidden=12)
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    gates = {"layers": torch.tensor([0.0, 0.7, 0.9])}
    cut_model(model, gates)
    assert model.config.layer_types == ["sliding_attention", "full_attention"] and model.config.num_hidden_layers == 2


def test_cut_makes_its_tensors_on_the_models_device():
    """With meta (a device without data) as the default device, the CPU cut is unchanged: every tensor it makes
    names the model's device (on a GPU, a tensor made on the default device would be on the CPU)."""
    for target in (ALL, SOME, Shape(layers=2, kv_groups=1, heads=3, ffn=8, hidden=9)):  # last: heads, FFN whole
        a, b = tiny_model(heads=6, kv=2, layers=3, ffn=8, hidden=12), tiny_model(heads=6, kv=2, layers=3, ffn=8,
                                                                                 hidden=12)
        gates = _gates(target, seed=9)
        cut_model(a, gates)
        with torch.device("meta"):
            cut_model(b, gates)
        assert all(p.device.type == "cpu" for p in b.parameters())
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_cut_of_a_bf16_model_stays_bf16():
    model = tiny_model(heads=6, kv=2, layers=3, ffn=8, hidden=12).to(torch.bfloat16)
    full = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    gates = _gates(ALL, seed=10)
    cut_model(model, gates)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    dims = torch.nonzero(gates["hidden"]).flatten()
    z_hidden = gates["hidden"][dims]
    kept = torch.nonzero(gates["layers"]).flatten().tolist()
    emb = full["model.embed_tokens.weight"][:, dims] * z_hidden
    close = dict(rtol=2 ** -7, atol=0)  # bf16 rounding (twice at most; elementwise, the same on every CPU)
    assert torch.allclose(model.model.embed_tokens.weight.float(), emb, **close)
    untied_norm = full["model.norm.weight"][dims] * z_hidden  # untied head: the hidden gate folds into the norm
    assert torch.allclose(model.model.norm.weight.float(), untied_norm, **close)
    for pos, i in enumerate(kept):
        layer = model.model.layers[pos]
        norm = full[f"model.layers.{i}.input_layernorm.weight"][dims] * z_hidden
        assert torch.allclose(layer.input_layernorm.weight.float(), norm, **close)
        channels = torch.nonzero(gates["ffn"][i]).flatten()
        down = full[f"model.layers.{i}.mlp.down_proj.weight"][dims][:, channels]
        down = down * (gates["layers"][i] * z_hidden)[:, None] * gates["ffn"][i][channels][None, :]
        assert torch.allclose(layer.mlp.down_proj.weight.float(), down, **close)
