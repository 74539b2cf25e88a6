"""Every method by name: its settings class and the function that runs it. `prune_model`, the command line's
choices and the studio look methods up here; a new method is one entry.

Run functions and heavy settings classes are named as "module:attribute" and imported when first used, so this
table (and the command line's parser that reads it) loads without torch."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.methods.settings import PruneSettings, SurgeonSettings


@dataclass(frozen=True)
class Method:
    name: str
    settings: type | str  # the dataclass holding the method's own fields
    run: str  # "module:function"
    kind: str = "prune"  # prune: run(model, tokens, settings, callback, should_stop, model_name[, use_cache]) ->
    # RunReport; shape: run(model, tokens, target, settings, progress, should_stop, model_name) -> ShearResult
    uses_cache: bool = False  # prune functions that read and write cached dense statistics take use_cache
    trains: bool = False  # shape methods that train (a memory check first, `steps` micro-batches of data)

    def settings_class(self) -> type:
        return _resolve(self.settings) if isinstance(self.settings, str) else self.settings

    def function(self) -> Callable:
        return _resolve(self.run)


PIPELINE = "slimgpt_core.methods.pipeline"
METHODS = {m.name: m for m in (
    Method("slimgpt", PruneSettings, f"{PIPELINE}:_prune_pass", uses_cache=True),
    Method("magnitude", PruneSettings, f"{PIPELINE}:_prune_pass", uses_cache=True),
    Method("wanda-sp", PruneSettings, f"{PIPELINE}:_prune_pass", uses_cache=True),
    Method("surgeon", SurgeonSettings, "slimgpt_core.methods.surgeon:prune_surgeon"),
    Method("kobd", SurgeonSettings, "slimgpt_core.methods.surgeon:prune_surgeon"),
    Method("obs-multishot", SurgeonSettings, f"{PIPELINE}:_prune_multishot", uses_cache=True),
    Method("minitron", PruneSettings, "slimgpt_core.methods.minitron:prune_minitron"),
    Method("shear", "slimgpt_core.methods.shear.train:ShearSettings", "slimgpt_core.methods.shape_runs:shear_run",
           kind="shape", trains=True),
)}
# minitron also cuts to a target shape (`shear --method minitron`): the same name among the shape methods
SHAPE_METHODS = {"shear": METHODS["shear"],
                 "minitron": Method("minitron", "slimgpt_core.methods.shear.train:ShearSettings",
                                    "slimgpt_core.methods.shape_runs:minitron_run", kind="shape")}


def names(kind: str = "prune") -> tuple[str, ...]:
    table = SHAPE_METHODS if kind == "shape" else METHODS
    return tuple(name for name, m in table.items() if m.kind == kind)


def lookup(name: str, kind: str = "prune") -> Method:
    table = SHAPE_METHODS if kind == "shape" else METHODS
    if name not in table or table[name].kind != kind:
        raise SlimGPTError(f"unknown method {name!r} (choose from {', '.join(names(kind))})")
    return table[name]


def _resolve(reference: str):
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)
