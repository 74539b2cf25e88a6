"""The content-addressed cache under concurrent writers in separate processes, with a reader during the writes; then
entry by entry: names, hit / miss / corrupt counts, writes interrupted midway, a reader during a write, the model
fingerprint and the listing. Independent checks: hashlib, os.stat, /proc/self/fd."""
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig

from slimgpt_core.base import cache
from tests import ROOT

WRITER = """
import os, sys, time
from pathlib import Path
import torch
from slimgpt_core.base import cache
key, me, folder = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
value = {"writer": me, "payload": [me] * 20000}
tensors = {"H": torch.full((200, 200), float(me))}
(folder / f"ready{me}").touch()
for i in range(100000):
    if (folder / "stop").exists():
        break
    cache.store_json("results", key, value)
    cache.store_tensors("stats", key, tensors)
print(i)
"""


def test_writer_processes_and_a_reader_never_see_half_an_entry(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SLIMGPT_CACHE", str(root))
    sync = tmp_path / "sync"
    sync.mkdir()
    key = "concurrency"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, key, str(i), str(sync)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    try:
        while len(list(sync.glob("ready*"))) < 3:
            assert all(w.poll() is None for w in writers), [w.communicate()[1][-2000:] for w in writers]
            time.sleep(0.05)
        before = cache.STATS.copy()
        seen_json, seen_tensors = set(), set()
        for _ in range(150):  # read while all three write
            found = cache.lookup_json("results", key)
            if found is not None:
                assert set(found["payload"]) == {found["writer"]} and len(found["payload"]) == 20000
                seen_json.add(found["writer"])
            found = cache.lookup_tensors("stats", key)
            if found is not None:
                h = found["H"]
                assert h.shape == (200, 200) and bool((h == h[0, 0]).all())
                seen_tensors.add(int(h[0, 0]))
        (sync / "stop").touch()
        writes = [int(w.communicate(timeout=120)[0]) for w in writers]
    finally:
        (sync / "stop").touch()
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()  # reaped here: a zombie left behind is picked up by the next os.wait() (mutmut's)
    assert all(w.returncode == 0 for w in writers)
    assert min(writes) > 0 and seen_json and seen_json <= {0, 1, 2} and seen_tensors and seen_tensors <= {0, 1, 2}
    for folder, suffix in (("results", ".json"), ("stats", ".safetensors")):
        assert cache.STATS[f"{folder}.corrupt"] == before[f"{folder}.corrupt"]  # no half-written entry was read
        assert cache.STATS[f"{folder}.hit"] > before[f"{folder}.hit"]
        # one entry, no temporary files left behind
        assert [p.name for p in (root / folder).iterdir()] == [cache._path(folder, key, suffix).name]


def test_corrupt_and_foreign_entries_are_deleted_and_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path))
    cache.store_json("results", "a", {"x": 1})
    assert cache.lookup_json("results", "a") == {"x": 1}
    path = cache._path("results", "a", ".json")
    path.write_text('{"key": "b", "value": 2}')  # another key's entry under this name
    before = cache.STATS["results.corrupt"]
    assert cache.lookup_json("results", "a") is None and not path.exists()
    path.write_text("[1, 2]")  # valid JSON, not an entry
    assert cache.lookup_json("results", "a") is None and not path.exists()
    assert cache.STATS["results.corrupt"] == before + 2
    calls = []
    got = cache.get_tensors("tokens", "t", lambda: calls.append(1) or {"ids": torch.arange(5)})
    again = cache.get_tensors("tokens", "t", lambda: calls.append(1) or {"ids": torch.arange(5)})
    assert calls == [1] and torch.equal(got["ids"], again["ids"])
    info = cache.info()
    assert info["results"]["entries"] == 0 and info["tokens"]["entries"] == 1 and info["tokens"]["bytes"] > 0
    assert cache.clear("tokens") > 0 and cache.info()["tokens"]["entries"] == 0


# --- entry by entry, against hashlib, os.stat and /proc/self/fd ---------------------------------------------------
@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _delta(before, *names):
    return {n: cache.STATS[n] - before[n] for n in names}


def test_entries_are_named_by_the_hash_of_their_key(root):
    cache.store_json("results", "ppl|model|text", {"ppl": 12.5})
    cache.store_tensors("stats", "layer 3", {"H": torch.eye(3)})
    digest = lambda key: hashlib.sha256(key.encode()).hexdigest()[:32]  # noqa: E731
    assert [p.name for p in (root / "results").iterdir()] == [digest("ppl|model|text") + ".json"]
    assert [p.name for p in (root / "stats").iterdir()] == [digest("layer 3") + ".safetensors"]
    assert json.loads((root / "results" / (digest("ppl|model|text") + ".json")).read_text()) == \
        {"key": "ppl|model|text", "value": {"ppl": 12.5}}


def test_tensors_round_trip_and_count_hits_misses(root):
    before = cache.STATS.copy()
    names = ("stats.hit", "stats.miss", "stats.corrupt")
    assert cache.lookup_tensors("stats", "k") is None
    assert _delta(before, *names) == {"stats.hit": 0, "stats.miss": 1, "stats.corrupt": 0}
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    stored = {"t": base.t(), "half": torch.full((2,), 1.5, dtype=torch.bfloat16), "ids": torch.arange(4)}
    assert not stored["t"].is_contiguous()  # a transposed view is stored as its values
    cache.store_tensors("stats", "k", stored)
    got = cache.lookup_tensors("stats", "k")
    assert got.keys() == stored.keys()
    for name in stored:
        assert got[name].dtype == stored[name].dtype and torch.equal(got[name], stored[name])
    assert _delta(before, *names) == {"stats.hit": 1, "stats.miss": 1, "stats.corrupt": 0}

    calls = []
    compute = lambda: calls.append(1) or {"x": torch.ones(2)}  # noqa: E731
    assert torch.equal(cache.get_tensors("stats", "g", compute)["x"], torch.ones(2))
    assert torch.equal(cache.get_tensors("stats", "g", compute)["x"], torch.ones(2))
    assert calls == [1]  # computed once, then read back


def _bad_tensor_entries(path: Path, good: bytes):
    yield good[: len(good) // 2]  # truncated
    yield b"not a safetensors file at all"
    save_file({"x": torch.ones(2)}, str(path))  # a safetensors file without our key
    yield path.read_bytes()
    save_file({"x": torch.ones(2)}, str(path), metadata={"key": "another key"})  # written for another key
    yield path.read_bytes()


def test_bad_tensor_entries_are_deleted_and_counted(root):
    cache.store_tensors("stats", "k", {"x": torch.zeros(3)})
    path = cache._path("stats", "k", ".safetensors")
    good = path.read_bytes()
    for n, raw in enumerate(_bad_tensor_entries(path, good), start=1):
        path.write_bytes(raw)
        before = cache.STATS.copy()
        assert cache.lookup_tensors("stats", "k") is None and not path.exists()
        assert _delta(before, "stats.corrupt", "stats.hit", "stats.miss") == \
            {"stats.corrupt": 1, "stats.hit": 0, "stats.miss": 0}
    assert n == 4


@pytest.mark.parametrize("text", ["{\"key\": \"k\", \"val", "[1, 2]", "{\"key\": \"k\"}", "{\"key\": \"j\", \"value\": 1}",
                                  "\"just a string\""])
def test_bad_json_entries_are_deleted_and_counted(root, text):
    cache.store_json("results", "k", 1)
    path = cache._path("results", "k", ".json")
    path.write_text(text)
    before = cache.STATS.copy()
    assert cache.lookup_json("results", "k") is None and not path.exists()
    assert _delta(before, "results.corrupt", "results.hit", "results.miss") == \
        {"results.corrupt": 1, "results.hit": 0, "results.miss": 0}
    assert cache.lookup_json("results", "k") is None  # now simply absent
    assert _delta(before, "results.corrupt", "results.miss") == {"results.corrupt": 1, "results.miss": 1}
    cache.store_json("results", "k", None)  # a stored None reads back as a hit
    assert cache.lookup_json("results", "k") is None
    assert _delta(before, "results.hit") == {"results.hit": 1}


def test_two_readers_of_one_bad_entry(root, monkeypatch):
    """Another process deletes the bad entry between our read and our delete: still a plain miss for us."""
    import safetensors

    cache.store_json("results", "k", 1)
    path = cache._path("results", "k", ".json")
    path.write_text("[1, 2]")
    real_read_text = Path.read_text

    def read_then_deleted_elsewhere(self, *args, **kwargs):
        text = real_read_text(self, *args, **kwargs)
        self.unlink()
        return text

    with monkeypatch.context() as patched:
        patched.setattr(Path, "read_text", read_then_deleted_elsewhere)
        assert cache.lookup_json("results", "k") is None

    save_file({"x": torch.ones(2)}, str(cache._path("stats", "k", ".safetensors")), metadata={"key": "another"})
    real_open = safetensors.safe_open

    def open_then_deleted_elsewhere(filename, *args, **kwargs):
        opened = real_open(filename, *args, **kwargs)
        os.unlink(filename)
        return opened

    monkeypatch.setattr(safetensors, "safe_open", open_then_deleted_elsewhere)
    assert cache.lookup_tensors("stats", "k") is None
    assert list((root / "results").iterdir()) == [] and list((root / "stats").iterdir()) == []


class Interrupted(Exception):
    pass


def test_a_write_interrupted_midway_leaves_the_old_entry_and_no_temporary_file(root):
    cache.store_json("results", "k", "old")
    path = cache._path("results", "k", ".json")
    seen = {}

    def half_then(error):
        def write(tmp):
            seen["tmp"] = Path(tmp)
            Path(tmp).write_text('{"key": "k", "value": "ne')  # half an entry
            seen["reader"] = cache.lookup_json("results", "k")  # a reader during the write
            seen["listed"] = cache.info()["results"]["entries"]
            raise error
        return write

    cache._atomic_write(path, half_then(OSError(28, "No space left on device")))  # a full disk only costs speed
    assert seen["reader"] == "old" and seen["listed"] == 1
    tmp = seen["tmp"]  # a hidden sibling: same file system (atomic rename), not listed as an entry
    assert tmp.parent == path.parent and tmp.name.startswith(f".{path.name}.") and tmp.name.endswith(".tmp")
    with pytest.raises(Interrupted):  # anything else (Ctrl-C, a bug) propagates, and still leaves nothing
        cache._atomic_write(path, half_then(Interrupted()))
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert cache.lookup_json("results", "k") == "old"


def test_writes_close_their_files(root):
    cache.store_json("results", "warm-up", 0)
    fds = len(os.listdir("/proc/self/fd"))
    for i in range(20):
        cache.store_json("results", "k", i)
        cache.store_tensors("stats", "k", {"x": torch.full((2,), float(i))})
    assert len(os.listdir("/proc/self/fd")) == fds
    assert cache.lookup_json("results", "k") == 19 and cache.lookup_tensors("stats", "k")["x"][0] == 19


class Weights(nn.Module):
    """The least a fingerprint needs: a config and a state dict, with weights of any name and shape."""

    def __init__(self, tensors: dict[str, torch.Tensor], **config):
        super().__init__()
        self.config = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, **config)
        for name, t in tensors.items():
            self.register_buffer(name, t.clone())


def test_fingerprint_tells_models_apart(monkeypatch):
    w = torch.arange(24, dtype=torch.float32)
    fp = cache.model_fingerprint(Weights({"a": w}))
    assert len(fp) == 32 and int(fp, 16) >= 0  # 16 bytes, in hex
    assert cache.model_fingerprint(Weights({"a": w})) == fp  # the same weights, built again
    different = [Weights({"b": w}), Weights({"a": w.reshape(4, 6)}), Weights({"a": w.view(torch.int32)}),
                 Weights({"a": w}, rope_theta=5.0), Weights({"a": torch.cat([w[:-1], w[-1:] + 1])}),
                 Weights({"a": w, "b": w})]
    fps = [cache.model_fingerprint(m) for m in different]
    assert len(set(fps + [fp])) == len(fps) + 1  # name, shape, dtype, config, one value, an extra tensor

    one, other = Weights({"a": w}), Weights({"a": w})
    one.config.first, one.config.second = 1, 2
    other.config.second, other.config.first = 2, 1  # the same config, its keys in another order
    one.config.where = other.config.where = Path("/models/x")  # not JSON: written as text
    assert cache.model_fingerprint(one) == cache.model_fingerprint(other) != fp

    model = Weights({"a": w})
    assert cache.model_fingerprint(model) == fp
    with torch.no_grad():
        model.a[0] = 100.0
    assert cache.model_fingerprint(model) == fp  # remembered until told that the weights changed
    cache.forget_fingerprint(model)
    changed = cache.model_fingerprint(model)
    assert changed != fp and cache.model_fingerprint(Weights({"a": model.a})) == changed


def test_large_models_are_fingerprinted_by_strided_samples(monkeypatch):
    """Beyond FULL_HASH_BYTES of weights, a large tensor is hashed through a stride of its bytes: a byte on the
    stride changes the fingerprint, a byte off it does not; small tensors are still hashed in full."""
    monkeypatch.setattr(cache, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(cache, "SAMPLED_TENSOR_BYTES", 400)
    monkeypatch.setattr(cache, "SAMPLES_PER_TENSOR", 100)
    big = torch.zeros(300, dtype=torch.float32)  # 1200 bytes: stride 12
    small = torch.zeros(100, dtype=torch.float32)  # 400 bytes, not over SAMPLED_TENSOR_BYTES: every byte
    fp = cache.model_fingerprint(Weights({"big": big, "small": small}))

    def with_byte(name, index):
        t = {"big": big.clone(), "small": small.clone()}
        t[name].view(torch.uint8)[index] = 1
        return cache.model_fingerprint(Weights(t))

    assert with_byte("big", 12 * 7) != fp and with_byte("big", 12 * 99) != fp and with_byte("big", 0) != fp
    assert with_byte("big", 12 * 7 + 1) == fp and with_byte("big", 12 * 7 + 11) == fp and with_byte("big", 1199) == fp
    assert with_byte("small", 399) != fp and with_byte("small", 201) != fp
    # at or below FULL_HASH_BYTES in all, every byte counts
    monkeypatch.setattr(cache, "FULL_HASH_BYTES", 1600)
    assert with_byte("big", 12 * 7 + 1) != cache.model_fingerprint(Weights({"big": big, "small": small}))


def test_tokens_digest():
    ids = torch.arange(24).reshape(4, 6)
    d = cache.tokens_digest(ids)
    assert cache.tokens_digest(ids.clone()) == d
    assert len(d) == 24 + len("(4, 6)") and d.endswith("(4, 6)") and int(d[:24], 16) >= 0  # 12 bytes in hex, shape
    assert cache.tokens_digest(ids.t().contiguous().t()) == d  # the same values in another memory layout
    assert len({d, cache.tokens_digest(ids.reshape(6, 4)), cache.tokens_digest(ids + (ids == 23)),
                cache.tokens_digest(ids.to(torch.int32))}) == 4


def test_info_and_clear_count_bytes_on_disk(root):
    cache.store_json("results", "a", list(range(100)))
    cache.store_json("results", "b", "x")
    cache.store_tensors("tokens", "t", {"ids": torch.arange(1000)})
    (root / "results" / ".b.json.123.tmp").write_text("a write under way")  # counted in bytes, not as an entry
    (root / "README.md").write_text("kept")
    size = lambda kind: sum(p.stat().st_size for p in (root / kind).iterdir())  # noqa: E731
    results_bytes, tokens_bytes = size("results"), size("tokens")
    info = cache.info()
    assert info["results"] == {"entries": 2, "bytes": results_bytes}
    assert info["tokens"] == {"entries": 1, "bytes": tokens_bytes} and tokens_bytes > 8000
    assert info["stats"] == {"entries": 0, "bytes": 0} and info["root"] == {"path": str(root)}
    assert cache.clear("results") == results_bytes
    assert not (root / "results").exists() and (root / "tokens").is_dir()
    assert cache.info()["tokens"]["entries"] == 1
    cache.store_json("results", "c", "again")
    results_bytes = size("results")
    assert cache.clear() == tokens_bytes + results_bytes  # every kind's bytes, summed
    assert sorted(p.name for p in root.iterdir()) == ["README.md"]
    assert cache.clear() == 0


def test_clear_is_best_effort(root, monkeypatch):
    """An entry that cannot be removed (in use by another process, say) does not stop the rest."""
    cache.store_json("results", "stuck", 1)
    cache.store_json("results", "free", 2)
    stuck = cache._path("results", "stuck", ".json").name
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if os.fspath(path).endswith(stuck):
            raise PermissionError(13, "Permission denied")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    cache.clear("results")
    assert [p.name for p in (root / "results").iterdir()] == [stuck]
