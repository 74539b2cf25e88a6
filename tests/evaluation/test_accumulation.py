"""The accumulation profile's exact math on tiny random decoders (identities, by-hand fp64), never quality."""
import copy
import math

import pytest
import torch

from tests.tiny_models import tiny_model
from slimgpt_core.services.accumulation import (AccumulationProfile, _Sums, accumulation_profile, relative_errors,
                                                  stored_profile)
from slimgpt_core.evaluation.evaluate import perplexity
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.base.shapes import layer_shape


@pytest.fixture
def windows():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 101, (6, 16), generator=g)


def _pruned(dense, tokens, **kw):
    """A copy of `dense` pruned with a linear schedule: every layer keeps a different shape."""
    model = copy.deepcopy(dense)
    prune_model(model, tokens, PruneSettings(**{"ratio": 0.5, "schedule": "linear", "shape": 3.0,
                                                "ffn_group_floor": 4, **kw}), use_cache=False)
    return model


def _by_hand(dense, pruned, ids):
    """Layer by layer outside the model's forward: embeddings, rotary position embeddings, each layer called with
    no mask (causal under sdpa). Returns per layer (dense output, own output, pruned output) and both logits."""
    def start(model):
        h = model.model.embed_tokens(ids)
        pos = model.model.rotary_emb(h, torch.arange(ids.shape[1]).unsqueeze(0))
        return h, pos

    with torch.no_grad():
        hd, pos = start(dense)
        hp, _ = start(pruned)
        rows = []
        for ld, lp in zip(dense.model.layers, pruned.model.layers):
            own = lp(hd, position_embeddings=pos, attention_mask=None)
            hd, hp = ld(hd, position_embeddings=pos, attention_mask=None), lp(hp, position_embeddings=pos,
                                                                                attention_mask=None)
            rows.append((hd, own, hp))
        logits = [m.lm_head(m.model.norm(h)) for m, h in ((dense, hd), (pruned, hp))]
    return rows, logits


def test_a_copy_of_the_dense_model_has_no_error_and_no_divergence(tokens, windows):
    dense = tiny_model()
    p = accumulation_profile(dense, copy.deepcopy(dense), windows, batch_size=4)
    assert p.own_raw == p.total_raw == p.own_std == p.total_std == [0.0, 0.0, 0.0]
    assert p.kl == pytest.approx(0.0, abs=1e-7) and p.ppl == p.ppl_dense
    # pruned at ratio 0 the weights go through OBS with nothing removed: zero up to fp32 rounding
    p0 = accumulation_profile(dense, _pruned(dense, tokens, ratio=0.0), windows)
    assert max(p0.total_raw + p0.total_std + p0.own_std) < 1e-5 and p0.kl < 1e-8


def test_profile_equals_a_by_hand_fp64_computation_on_a_mixed_shape_model(tokens, windows):
    dense = tiny_model().double()
    pruned = _pruned(tiny_model(), tokens).double()
    shapes = [layer_shape(layer) for layer in pruned.model.layers]
    assert len(set(shapes)) == 3  # every layer has its own heads/FFN width
    p = accumulation_profile(dense, pruned, windows, batch_size=4)  # two batches (4 + 2 windows)
    rows, (logits_d, logits_p) = _by_hand(dense, pruned, windows)
    with torch.no_grad():
        torch.testing.assert_close(logits_d, dense(windows).logits, rtol=1e-10, atol=1e-10)  # the hand forward is right
    for i, (hd, own, hp) in enumerate(rows):
        s = hd.pow(2).mean(dim=(0, 1)).sqrt()  # the dense stream's RMS of each dimension at this layer
        assert p.own_std[i] == pytest.approx(float(((own - hd) / s).pow(2).mean().sqrt()), rel=1e-9)
        assert p.total_std[i] == pytest.approx(float(((hp - hd) / s).pow(2).mean().sqrt()), rel=1e-9)
        assert p.own_raw[i] == pytest.approx(float((own - hd).norm() / hd.norm()), rel=1e-9)
        assert p.total_raw[i] == pytest.approx(float((hp - hd).norm() / hd.norm()), rel=1e-9)
        assert p.dense_rms[i] == pytest.approx(float(hd.pow(2).mean().sqrt()), rel=1e-9)
    # layer 0 inherits nothing: its own error is its total
    assert p.own_raw[0] == pytest.approx(p.total_raw[0], rel=1e-12)
    assert p.own_std[0] == pytest.approx(p.total_std[0], rel=1e-12)
    assert p.total_std[-1] > p.own_std[-1] > 0  # deeper layers do inherit
    # KL(dense ‖ pruned) per position, every position of every window, by hand
    pd, pp = logits_d.softmax(-1), logits_p.softmax(-1)
    assert p.kl == pytest.approx(float((pd * (pd.log() - pp.log())).sum(-1).mean()), rel=1e-9)
    assert p.kl > 0


def test_layer_zero_own_equals_total_in_fp32(tokens, windows):
    dense = tiny_model("qwen2", 4, 2)
    p = accumulation_profile(dense, _pruned(dense, tokens), windows, batch_size=5)
    assert p.own_raw[0] == pytest.approx(p.total_raw[0], rel=1e-6)
    assert p.own_std[0] == pytest.approx(p.total_std[0], rel=1e-6)


def test_perplexities_are_the_evaluation_helpers_on_the_same_windows(tokens, windows):
    dense = tiny_model()
    pruned = _pruned(dense, tokens)
    p = accumulation_profile(dense, pruned, windows, batch_size=4)
    flat = windows.reshape(-1)
    assert p.ppl == pytest.approx(perplexity(pruned, flat, seqlen=16, batch_size=3).ppl, rel=1e-5)
    assert p.ppl_dense == pytest.approx(perplexity(dense, flat, seqlen=16, batch_size=3).ppl, rel=1e-5)
    assert p.ppl != pytest.approx(p.ppl_dense, rel=1e-3)


def test_standardised_error_ignores_the_scale_of_one_dimension_and_raw_does_not():
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(2, 50, 16, generator=g, dtype=torch.float64)
    pruned = dense + 0.1 * torch.randn(2, 50, 16, generator=g, dtype=torch.float64)
    scale = torch.ones(16, dtype=torch.float64)
    scale[5] = 1000.0  # an outlier dimension: both streams carry it 1000× larger

    def errors(d, p):
        sums = _Sums(1, 16)
        sums.add(0, d, p, p)
        return relative_errors(sums.total[0], sums.dense[0])

    raw, std = errors(dense, pruned)
    raw_scaled, std_scaled = errors(dense * scale, pruned * scale)
    assert std_scaled == pytest.approx(std, rel=1e-12)
    assert raw_scaled != pytest.approx(raw, rel=0.05)  # the outlier dimension's own error ratio decides raw
    # raw is the dense-energy-weighted mean of the per-dimension ratios, standardised the plain mean
    e2, d2 = ((pruned - dense) ** 2).sum((0, 1)), (dense ** 2).sum((0, 1))
    assert std == pytest.approx(math.sqrt(float((e2 / d2).mean())), rel=1e-12)
    assert raw == pytest.approx(math.sqrt(float(e2.sum() / d2.sum())), rel=1e-12)


def test_a_dimension_the_dense_stream_never_uses_is_left_out_not_divided_by_zero():
    dense = torch.ones(1, 4, 3, dtype=torch.float64)
    dense[..., 2] = 0.0
    pruned = dense * 1.5
    pruned[..., 2] = 0.25
    sums = _Sums(1, 3)
    sums.add(0, dense, pruned, pruned)
    raw, std = relative_errors(sums.total[0], sums.dense[0])
    assert std == pytest.approx(0.5) and math.isfinite(raw)


def test_record_round_trip_and_lookup_by_identity():
    p = AccumulationProfile([0.1], [0.2], [0.3], [0.4], [1.0], [0.5], 12.0, 10.0, 0.2, 4, 128, "wikitext2")
    rec = {"kind": "accumulation", **p.record(), "dense": "m"}
    assert set(rec["points"]) == {"own_raw", "total_raw", "own_std", "total_std", "dense_rms", "outlier_share"}
    assert stored_profile([rec], {"dataset": "wikitext2", "seqlen": 128, "windows": 4, "dense": "m"}) == p
    assert stored_profile([rec], {"dataset": "wikitext2", "seqlen": 64, "windows": 4, "dense": "m"}) is None
    assert stored_profile([{"kind": "perplexity", "dataset": "wikitext2"}], {"dataset": "wikitext2"}) is None


def test_the_offline_default_is_one_model_under_both_aliases(assets_root):
    from slimgpt_core.services.accumulation import same_model
    assert same_model("default", "smollm2") and same_model("stories260k", "stories260k")
    assert not same_model("stories260k", "default") and not same_model("default", "someorg/some-model")


def _entry(key: str, total: list[float], own: list[float], ppl: float = 20.0, kl: float = 0.1):
    from slimgpt_core.services.accumulation import DEMO_RUNS, DemoEntry
    run = next(r for r in DEMO_RUNS if r.key == key)
    profile = AccumulationProfile(own, total, own, total, [1.0, 1.0, 8.0], [0.1, 0.1, 0.9], ppl, 10.0, kl, 4, 16)
    return DemoEntry(run, None, object(), profile)


def test_the_story_follows_the_numbers_and_says_when_they_miss_the_point():
    from slimgpt_core.services.accumulation import inherited, story, twin_differences
    good = [_entry("slimgpt", [0.1, 0.2, 0.3], [0.1, 0.1, 0.1]), _entry("twin", [0.1, 0.3, 0.5], [0.1, 0.1, 0.1]),
            _entry("uniform", [0.2, 0.4, 0.6], [0.2, 0.1, 0.1])]
    text = story(good, "standardised")
    assert text["sequential"].startswith("log: sequential 0.300 vs dense inputs 0.500 at the last layer, lower")
    assert "deep layers inherit less" in text["schedule"] and "0.300 vs 0.600 at the last layer" in text["schedule"]
    assert "at layer 2 the model carries 0.300 while the layer alone adds 0.100" in text["own"]
    assert "goes from 1.00 to 8.00 at layer 2" in text["scale"] and "carry 90%" in text["scale"]
    assert twin_differences(good, "raw") == {"slimgpt": pytest.approx([0.0, -0.1, -0.2])}
    assert inherited(good, "raw")["uniform"] == pytest.approx([0.0, 0.3, 0.5])
    bad = [_entry("slimgpt", [0.1, 0.2, 0.7], [0.1, 0.1, 0.1]), _entry("twin", [0.1, 0.3, 0.5], [0.1, 0.1, 0.1]),
           _entry("uniform", [0.2, 0.4, 0.6], [0.2, 0.1, 0.1])]
    text = story(bad, "raw")
    assert "0.700 vs dense inputs 0.500 at the last layer, not lower" in text["sequential"]
    assert "does not end lower than uniform" in text["schedule"] and "raw scale" in text["schedule"]
