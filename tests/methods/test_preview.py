"""The studio's instant previews against real runs, at engine level: the schedule preview's parameter counts
and the head-importance marks (`slimgpt_core.services.prune.preview_schedule`, `DenseStatistics.preview_removed`)."""
import pytest
import torch

from tests.tiny_models import tiny_model
from slimgpt_core.base import cache
from slimgpt_core.data import calibration_tokens
from slimgpt_core.models import load_model
from slimgpt_core.methods.activations import activation_device
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.methods.statistics import DenseStatistics, dense_statistics
from slimgpt_core.services.prune import preview_schedule
from slimgpt_core.base.shapes import describe_layers


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch,settings", [
    ("stories260k", PruneSettings(ratio=0.4, schedule="log", head_ratio=0.5, ffn_ratio=0.3)),
    ("qwen2", PruneSettings(ratio=0.5, schedule="linear", shape=3.0, ffn_group_floor=4)),  # q/k/v biases
    ("llama-1kv", PruneSettings(ratio=0.5, schedule="linear", ffn_group_floor=4)),  # query heads as the units
])
def test_schedule_preview_counts_the_parameters_of_the_real_run(arch, settings, tokens, own_cache):
    if arch == "stories260k":
        loaded = load_model("stories260k")
        model, calib = loaded.model, calibration_tokens(loaded.tokenizer, "tinystories", 4, 64)
    else:
        model, calib = (tiny_model("llama", 4, 1) if arch == "llama-1kv" else tiny_model(arch, 4, 2)), tokens
    dense_total, dense_layers = _parameters(model), _parameters(model.model.layers)
    preview = preview_schedule(model, settings)
    assert _parameters(model) == dense_total  # the preview does not touch the model
    prune_model(model, calib, settings, use_cache=False)
    assert (preview.params_before, preview.layer_params_before) == (dense_total, dense_layers)
    assert preview.params_after == _parameters(model)
    assert preview.layer_params_after == _parameters(model.model.layers)
    lists = describe_layers(model)
    assert preview.heads_kept == lists["layer_num_attention_heads"]
    assert preview.kv_kept == lists["layer_num_key_value_heads"]
    assert preview.ffn_kept == lists["layer_intermediate_size"]
    assert preview.achieved_layer_ratio == pytest.approx(1 - _parameters(model.model.layers) / dense_layers)


def _delete_statistics(root, layers):
    """Remove the cached dense Hessians of these layers (the key is in each file's metadata)."""
    from safetensors import safe_open
    removed = 0
    for path in (root / "stats").glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            key = f.metadata()["key"]
        if int(key.split("|")[-2]) in layers:
            path.unlink()
            removed += 1
    return removed


def test_dense_statistics_catch_up_through_cached_layers(own_cache):
    loaded = load_model("stories260k")
    tokens = calibration_tokens(loaded.tokenizer, "tinystories", 4, 64)
    cold = dense_statistics(loaded.model, tokens, batch_size=3)
    hits = cache.STATS["stats.hit"]
    warm = dense_statistics(load_model("stories260k").model, tokens, batch_size=3)
    assert cache.STATS["stats.hit"] == hits + 10  # every layer's two Hessians came from the cache
    assert _delete_statistics(own_cache, {3, 4}) == 4
    # layers 0-2 cached: layer 3's inputs are computed by running the dense model through layers 0, 1 and 2
    partial = dense_statistics(load_model("stories260k").model, tokens, batch_size=3)
    for a, b, c in ((cold.head_scores, warm.head_scores, partial.head_scores),
                    (cold.ffn_scores, warm.ffn_scores, partial.ffn_scores)):
        for la, lb, lc in zip(a, b, c):
            assert lb == pytest.approx(la, rel=1e-4) and lc == pytest.approx(la, rel=1e-4)
    assert cold.heads_per_unit == [2] * 5 and len(cold.ffn_scores[0]) == 172


def test_preview_marks_the_least_important_groups_and_match_a_real_run(own_cache):
    loaded = load_model("stories260k")
    tokens = calibration_tokens(loaded.tokenizer, "tinystories", 4, 64)
    stats = dense_statistics(loaded.model, tokens)
    ratios = [0.25, 0.5, 0.5, 0.75, 0.25]
    marks = stats.preview_removed(ratios)
    for scores, r, removed in zip(stats.head_scores, ratios, marks):
        k = round(r * 4)
        assert sorted(removed) == sorted(sorted(range(4), key=lambda u: scores[u])[:k])  # the k cheapest
        assert len(removed) == k and all(scores[u] <= min(scores[v] for v in range(4) if v not in removed)
                                         for u in removed)
    # a real run on dense inputs scores the same way and removes the cheapest group first
    report = prune_model(load_model("stories260k").model, tokens,
                         PruneSettings(head_ratios=ratios, ffn_ratio=0.0, sequential=False))
    for heads, scores, removed in zip(report.heads, stats.head_scores, marks):
        assert heads.scores == pytest.approx(scores, rel=1e-4)
        assert heads.removed[0] == removed[0]


def test_preview_removed_on_constructed_scores():
    stats = DenseStatistics([[3.0, 1.0, 2.0, 0.5], [1.0, 2.0]], [2, 1], [[0.1], [0.2]])
    assert stats.preview_removed([0.5, 0.0]) == [[3, 1], []]
    assert stats.preview_removed([0.75, 0.99]) == [[3, 1, 2], [0]]  # at least one group stays


def test_activation_placement_modes(tokens, monkeypatch):
    model = tiny_model()
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    for mode in ("auto", "never", "always"):  # on the CPU everything stays on the CPU
        assert activation_device(model, tokens, cpu, mode) == cpu
    assert activation_device(model, tokens, gpu, "always") == cpu  # decided without asking the GPU
    assert activation_device(model, tokens, gpu, "never") == gpu
    need = 4 * tokens.numel() * 32 * 4  # 4 buffers x tokens x hidden x fp32 bytes
    free = {}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 10 * need))
    free["bytes"] = 2 * need + 1  # fits in half the free memory
    assert activation_device(model, tokens, gpu, "auto") == gpu
    free["bytes"] = 2 * need
    assert activation_device(model, tokens, gpu, "auto") == cpu
    assert activation_device(model, tokens, gpu, "auto", buffers=2) == gpu
