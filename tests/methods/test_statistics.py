"""The dense statistics (methods/statistics.py) edge by edge: the cases the mutation pass (tools/mutation.py,
docs/testing.md) showed untested. The cache's entries are read back with safetensors under keys written out here;
Hessians are compared with 2XᵀX/N of o_proj's and down_proj's inputs hooked on one plain forward (fp64); the
first-step scores with the OBS closed form; and the forwards each decoder layer runs are counted (a layer run
forward needlessly costs time, not accuracy, so only a count shows it)."""
import hashlib

import pytest
import torch
from safetensors import safe_open

from tests.device_moves import DeviceMoves
from tests.tiny_models import tiny_model
from slimgpt_core.base.errors import JobCancelled
from slimgpt_core.methods import obs, statistics
from slimgpt_core.methods.statistics import StatisticsCache, dense_hessians, dense_statistics
from slimgpt_core.base import cache


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _key(model, tokens, layer: int, module: str) -> str:
    return f"stats-v3|{cache.model_fingerprint(model)}|{cache.tokens_digest(tokens)}|{layer}|{module}"


def _entry(root, key: str):
    return root / "stats" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")


def _read(path) -> tuple[str, dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()["key"], {name: f.get_tensor(name) for name in f.keys()}


def _spd(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(3 * n, n, generator=torch.Generator().manual_seed(seed))
    return 2 * x.T @ x / (3 * n)


def _failing():
    raise AssertionError("computed although the cache holds it")


# --- the cache ---------------------------------------------------------------------------------------------

def test_entries_are_keyed_by_model_tokens_layer_and_module(own_cache, tokens):
    model = tiny_model()
    stats = StatisticsCache(model, tokens, True)
    assert stats.reused == 0
    H, computed = _spd(6, 0), []
    assert stats.hessian(1, "attn", lambda: computed.append(1) or H, True) is H
    assert computed == [1]
    key = _key(model, tokens, 1, "attn")
    assert [p.name for p in (own_cache / "stats").iterdir()] == [_entry(own_cache, key).name]
    stored_key, tensors = _read(_entry(own_cache, key))
    assert stored_key == key and list(tensors) == ["H"] and torch.equal(tensors["H"], H)
    assert torch.equal(stats.hessian(1, "attn", _failing, True), H) and stats.reused == 1
    assert torch.equal(stats.lookup(1, "attn", True), H) and stats.reused == 2
    for layer, module in ((1, "mlp"), (0, "attn"), (2, "attn")):
        assert stats.lookup(layer, module, True) is None
    assert stats.reused == 2
    H2 = _spd(5, 1)
    assert stats.store(2, "mlp", H2, True) is H2
    assert torch.equal(_read(_entry(own_cache, _key(model, tokens, 2, "mlp")))[1]["H"], H2)
    assert torch.equal(stats.hessian(2, "mlp", _failing, True), H2) and stats.reused == 3
    # other calibration tokens: other entries
    assert StatisticsCache(model, tokens[:6], True).lookup(1, "attn", True) is None


def test_disabled_or_not_dense_never_touches_the_cache(own_cache, tokens, monkeypatch):
    model = tiny_model()
    H = _spd(6, 0)
    StatisticsCache(model, tokens, True).store(0, "attn", H, True)
    files = sorted(p.name for p in (own_cache / "stats").iterdir())
    fingerprints = []
    real = cache.model_fingerprint
    monkeypatch.setattr(cache, "model_fingerprint", lambda m: fingerprints.append(1) or real(m))
    before = dict(cache.STATS)
    off = StatisticsCache(model, tokens, False)
    assert fingerprints == []  # a disabled cache does not hash the weights
    other, calls = _spd(6, 2), []
    for _ in range(2):
        assert off.hessian(0, "attn", lambda: calls.append(1) or other, True) is other
    assert calls == [1, 1]
    assert off.lookup(0, "attn", True) is None
    assert off.store(0, "mlp", other, True) is other
    on = StatisticsCache(model, tokens, True)
    # not dense (calibrated on pruned inputs): computed, never read from or written to the cache
    assert on.hessian(0, "attn", lambda: calls.append(1) or other, False) is other and calls == [1, 1, 1]
    assert on.lookup(0, "attn", False) is None
    assert on.store(0, "attn", other, False) is other and on.store(1, "mlp", other, False) is other
    assert off.reused == on.reused == 0
    assert dict(cache.STATS) == before  # not even a miss counted
    assert sorted(p.name for p in (own_cache / "stats").iterdir()) == files
    assert torch.equal(_read(_entry(own_cache, _key(model, tokens, 0, "attn")))[1]["H"], H)  # not overwritten


def test_only_hessians_up_to_the_size_limit_are_cached(own_cache, tokens, monkeypatch):
    model = tiny_model()
    stats = StatisticsCache(model, tokens, True)
    H = _spd(6, 0)  # 36 fp32 values: 144 bytes
    for limit, kept in ((144, True), (143, False)):
        monkeypatch.setattr(statistics, "MAX_CACHED_STATISTIC_BYTES", limit)
        stats.hessian(limit, "attn", lambda: H, True)
        stats.store(limit, "mlp", H, True)
        for module in ("attn", "mlp"):
            assert _entry(own_cache, _key(model, tokens, limit, module)).exists() == kept, (limit, module)


# --- dense_hessians: Hessians and forwards -------------------------------------------------------------------

def _hooked_hessians(model, tokens) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """2XᵀX/N (fp64) of every layer's o_proj and down_proj inputs on one forward of all sequences."""
    inputs, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        for name, linear in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
            handles.append(linear.register_forward_pre_hook(
                lambda m, args, key=(i, name): inputs.__setitem__(key, args[0].detach().double())))
    with torch.no_grad():
        model(tokens, use_cache=False)
    for h in handles:
        h.remove()
    out = []
    for i in range(len(model.model.layers)):
        pair = []
        for name in ("attn", "mlp"):
            X = inputs[(i, name)].reshape(-1, inputs[(i, name)].shape[-1])
            pair.append(2 * X.T @ X / X.shape[0])
        out.append(tuple(pair))
    return out


class _Forwards:
    """The batch sizes of every completed forward of each decoder layer (a forward stopped by a hook is none)."""

    def __init__(self, model):
        self.batches = [[] for _ in model.model.layers]
        self.handles = [layer.register_forward_hook(self._hook(i), with_kwargs=True)
                        for i, layer in enumerate(model.model.layers)]

    def _hook(self, i):
        def hook(module, args, kwargs, output):
            self.batches[i].append((args[0] if args else kwargs["hidden_states"]).shape[0])
        return hook

    def counts(self) -> list[int]:
        return [len(b) for b in self.batches]

    def remove(self):
        for h in self.handles:
            h.remove()


def _pass(model, tokens, **kwargs):
    """One dense_hessians pass: the forwards per layer and the Hessians it yields (layer order checked)."""
    forwards = _Forwards(model)
    try:
        out = []
        for i, layer, H_attn, H_mlp in dense_hessians(model, tokens, **kwargs):
            assert i == len(out) and layer is model.model.layers[i]
            out.append((H_attn, H_mlp))
    finally:
        forwards.remove()
    return forwards, out


def _close(got, ref):
    for (a, m), (ra, rm) in zip(got, ref, strict=True):
        torch.testing.assert_close(a.double(), ra, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m.double(), rm, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("missing,forwards", [
    ({}, [3, 3, 3]),  # cold: each layer runs once, collecting both Hessians and the next layer's inputs
    ({(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp"), (2, "attn"), (2, "mlp")}, [3, 3, 3]),
    ({(0, "attn"), (0, "mlp"), (2, "attn"), (2, "mlp")}, [3, 3, 3]),  # layer 1 cached: run only to feed layer 2
    ({(2, "mlp")}, [3, 3, 3]),  # layers 0 and 1 cached: caught up through them once
    ({(0, "attn")}, [3, 0, 0]),  # the later layers are cached: never run (nothing after them needs inputs)
    ({(1, "attn"), (1, "mlp")}, [3, 3, 0]),
    ({(1, "mlp")}, [3, 3, 0]),
])
def test_hessians_from_any_mix_of_cache_and_forwards(own_cache, tokens, missing, forwards):
    model = tiny_model()
    reference = _hooked_hessians(model, tokens)
    cold_forwards, cold = _pass(model, tokens, batch_size=5)  # 12 sequences: batches of 5, 5, 2
    assert cold_forwards.counts() == [3, 3, 3] and cold_forwards.batches[0] == [5, 5, 2]
    _close(cold, reference)
    hits = cache.STATS["stats.hit"]
    for layer, module in missing:
        _entry(own_cache, _key(model, tokens, layer, module)).unlink()
    warm_forwards, warm = _pass(model, tokens, batch_size=5)
    assert warm_forwards.counts() == (forwards if missing else [0, 0, 0])
    assert cache.STATS["stats.hit"] == hits + 6 - len(missing)
    _close(warm, reference)
    for layer in range(3):
        for module in ("attn", "mlp"):
            assert _entry(own_cache, _key(model, tokens, layer, module)).exists()  # written back


@pytest.mark.parametrize("kept", ["attn", "mlp"])
def test_a_cached_hessian_is_used_as_it_is_when_its_partner_is_recomputed(own_cache, tokens, kept):
    model = tiny_model()
    _, cold = _pass(model, tokens, batch_size=5)
    marker = 3 * cold[2][0 if kept == "attn" else 1]  # not what a forward would give
    cache.store_tensors("stats", _key(model, tokens, 2, kept), {"H": marker})
    _entry(own_cache, _key(model, tokens, 2, "mlp" if kept == "attn" else "attn")).unlink()
    forwards, warm = _pass(model, tokens, batch_size=5)
    assert forwards.counts() == [3, 3, 3]
    assert torch.equal(warm[2][0 if kept == "attn" else 1], marker)
    assert torch.equal(_read(_entry(own_cache, _key(model, tokens, 2, kept)))[1]["H"], marker)  # not rewritten
    torch.testing.assert_close(warm[2][1 if kept == "attn" else 0], cold[2][1 if kept == "attn" else 0])


def test_defaults_batches_of_8_on_the_automatic_device(own_cache):
    model = tiny_model()
    tokens = torch.randint(0, 101, (17, 10), generator=torch.Generator().manual_seed(3))
    forwards, got = _pass(model, tokens)
    assert forwards.batches == [[8, 8, 1]] * 3
    assert all(H.device.type == "cpu" for pair in got for H in pair)
    _close(got, _hooked_hessians(model, tokens))
    other = tiny_model(seed=1)  # another fingerprint: nothing cached
    forwards = _Forwards(other)
    try:
        dense_statistics(other, tokens)
    finally:
        forwards.remove()
    assert forwards.batches == [[8, 8, 1]] * 3


class _NamedMoves(DeviceMoves):
    """DeviceMoves that also records each `tensor.to` called with the device None: `.to(None)` (a mutant's
    device) is a move that names no device, unlike a dtype-only cast."""

    def __init__(self, pretend):
        super().__init__(pretend)
        self.to_none = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to and ((len(args) > 1 and args[1] is None) or (kwargs or {}).get("device", 0) is None):
            self.to_none += 1
        return super().__torch_function__(func, types, args, kwargs)


@pytest.mark.parametrize("missing", [set(), {(2, "attn")}])
def test_layers_inputs_and_hessians_go_to_the_device_asked_for(own_cache, tokens, missing):
    """meta stands for a GPU: moves there are recorded, not made, so the CPU results stay checkable. With layer 2
    missing from the cache its inputs are caught up through layers 0 and 1 on the device, then those go home."""
    model = tiny_model()
    reference = _hooked_hessians(model, tokens)
    if missing:
        _pass(model, tokens, batch_size=5)
        _entry(own_cache, _key(model, tokens, 2, "attn")).unlink()
    with _NamedMoves("meta") as moves:
        got = [(H_attn, H_mlp) for _, _, H_attn, H_mlp in dense_hessians(model, tokens, 5, "meta")]
    _close(got, reference)
    assert moves.to_none == 0
    meta, cpu = torch.device("meta"), torch.device("cpu")
    n_params = len(list(model.model.layers[0].parameters()))
    # each layer's weights to the device and home again; in the catch-up layers 0 and 1 twice more
    assert moves.moves.count(meta) >= 3 * n_params + 6 + (2 * n_params if missing else 0)
    assert moves.moves.count(cpu) >= 3 * n_params + (2 * n_params if missing else 0)


# --- dense_statistics ----------------------------------------------------------------------------------------

def _closed_form_scores(W: torch.Tensor, H: torch.Tensor, group: int, damp: float):
    """OBS first-step errors (fp64): tr(W_S (H⁻¹_SS)⁻¹ W_Sᵀ) per group of columns, ‖w_c‖² / [H⁻¹]_cc per column,
    H⁻¹ of H + damp·mean(diag H)·I."""
    W, H = W.detach().double(), H.double()
    Hinv = torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=torch.float64))
    groups = []
    for s in range(0, W.shape[1], group):
        Ws = W[:, s:s + group]
        groups.append(float(((Ws @ torch.linalg.inv(Hinv[s:s + group, s:s + group])) * Ws).sum()))
    return groups, (W.pow(2).sum(0) / Hinv.diagonal()).tolist()


def test_scores_are_the_first_obs_step_and_nothing_is_removed(own_cache, tokens, monkeypatch):
    model = tiny_model()
    reference = _hooked_hessians(model, tokens)
    updates = []
    real = obs.remove_columns
    monkeypatch.setattr(obs, "remove_columns", lambda *a, **k: updates.append(1) or real(*a, **k))
    calls = []
    stats = dense_statistics(model, tokens, damp=0.2, batch_size=5, progress=lambda *a: calls.append(a))
    assert updates == []  # scoring only: no OBS update is applied
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert stats.heads_per_unit == [2, 2, 2]  # 4 query heads over 2 KV heads
    for layer, (H_attn, H_mlp), heads, ffn in zip(model.model.layers, reference, stats.head_scores,
                                                  stats.ffn_scores, strict=True):
        want_heads, _ = _closed_form_scores(layer.self_attn.o_proj.weight, H_attn, 16, 0.2)  # 2 heads × 8
        _, want_ffn = _closed_form_scores(layer.mlp.down_proj.weight, H_mlp, 1, 0.2)
        assert heads == pytest.approx(want_heads, rel=1e-4) and len(heads) == 2
        assert ffn == pytest.approx(want_ffn, rel=1e-4) and len(ffn) == 48
    default = dense_statistics(model, tokens, batch_size=5)  # from the cache, default damping 0.01
    want, _ = _closed_form_scores(model.model.layers[0].self_attn.o_proj.weight, reference[0][0], 16, 0.01)
    assert default.head_scores[0] == pytest.approx(want, rel=1e-4)
    assert default.head_scores[0] != pytest.approx(stats.head_scores[0], rel=1e-3)


@pytest.mark.parametrize("stop_at", [1, 3])
def test_cancelled_between_layers(own_cache, tokens, stop_at):
    model = tiny_model()
    asked, seen = [], []

    def should_stop():
        asked.append(1)
        return len(asked) == stop_at

    with pytest.raises(JobCancelled) as stopped:
        dense_statistics(model, tokens, batch_size=5, progress=lambda i, n: seen.append(i), should_stop=should_stop)
    assert str(stopped.value) == "statistics were cancelled"
    assert seen == list(range(1, stop_at)) and len(asked) == stop_at
    asked.clear()
    with pytest.raises(JobCancelled) as stopped:
        list(dense_hessians(model, tokens, 5, should_stop=should_stop, what="error curves"))
    assert str(stopped.value) == "error curves were cancelled"
    asked.clear()
    with pytest.raises(JobCancelled) as stopped:
        list(dense_hessians(model, tokens, 5, should_stop=should_stop))
    assert str(stopped.value) == "statistics were cancelled"


# --- a prune with cached statistics ----------------------------------------------------------------------------


def test_a_warm_cache_changes_where_statistics_come_from_never_how_outputs_are_computed(own_cache, monkeypatch):
    """Cached dense statistics (layer 0 of a sequential prune, whose heads are all kept here) must leave the pruned
    stream the cold run's bit for bit, or every later layer calibrates on other inputs (on SmolLM2 a warm prune
    chose other channels from layer 1 on). The outputs are replayed from the kept MLP inputs in both runs: on a
    tiny model both ways round alike, so the way each layer took is recorded too."""
    from slimgpt_core.methods import pipeline
    from slimgpt_core.methods.pipeline import prune_model
    from slimgpt_core.methods.prune_settings import PruneSettings
    real, taken = pipeline.replay_outputs, []

    def recording(layer, x, kwargs, batch_size, attn_inputs, columns, out, attn_outputs=None, mlp_inputs=None,
                  *rest):
        taken[-1].append((attn_outputs is not None, mlp_inputs is not None))
        return real(layer, x, kwargs, batch_size, attn_inputs, columns, out, attn_outputs, mlp_inputs, *rest)

    monkeypatch.setattr(pipeline, "replay_outputs", recording)
    tokens = torch.randint(0, 101, (8, 16), generator=torch.Generator().manual_seed(2))
    weights, reused = [], []
    for _ in ("cold", "warm"):
        taken.append([])
        model = tiny_model(seed=1, layers=4)
        report = prune_model(model, tokens, PruneSettings(ratio=0.3, device="cpu"), use_cache=True)
        weights.append(model.state_dict())
        reused.append(report.reused_statistics)
    assert reused == [0, 2]  # layer 0's attention and MLP statistics read back
    assert taken[0] == taken[1] and taken[0][0] == (True, True)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
