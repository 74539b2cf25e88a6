"""Models held in memory by a long-lived process (the studio): a few, least recently used out.

Twenty runs of one model must not need twenty times its memory: pages ask the pool for a run's model when they
need its weights, and only `capacity` models stay loaded. A page that holds a model keeps it alive for as long
as it uses it; the pool only drops its own reference."""
from __future__ import annotations

import threading
from collections import OrderedDict

from slimgpt_core.models import LoadedModel, load_model


class ModelPool:
    def __init__(self, capacity: int = 3):
        self.capacity = capacity
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # how many times weights were read from disk (tests, benchmarks)

    def get(self, name: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
        key = (str(name), device, dtype)
        with self._lock:  # one load at a time: two tabs asking for one model load it once
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loaded = load_model(str(name), device, dtype)
            self.loads += 1
            self._insert(key, loaded)
            return loaded

    def put(self, name: str, loaded: LoadedModel, device: str = "auto", dtype: str = "auto") -> None:
        """Hand the pool a model already in memory (a run just made), saving a reload from disk."""
        with self._lock:
            self._insert((str(name), device, dtype), loaded)

    def forget(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self._models if k[0] == str(name)]:
                del self._models[key]

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._models)

    def _insert(self, key: tuple, loaded: LoadedModel) -> None:
        self._models[key] = loaded
        self._models.move_to_end(key)
        while len(self._models) > self.capacity:
            self._models.popitem(last=False)


POOL = ModelPool()
