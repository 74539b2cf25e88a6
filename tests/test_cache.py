"""The content-addressed cache under concurrent writers in separate processes, with a reader during the writes."""
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from slimgpt_core.base import cache

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
