"""Every method by name: the settings of its own and the function that runs it. `prune_model`, the command line's
choices and the studio look methods up here; a new method is one entry.

Each method owns its settings (as llm-compressor's modifiers do): a prune method with options of its own has its own
settings class, held by `PruneSettings` as one field (`settings.surgeon` for surgeon, kobd and obs-multishot), beside
what every prune needs; a shape method takes its own settings whole. Run functions are named as "module:function" and
imported when first used, so this table (and the command line's parser that reads it) loads without torch."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.methods.settings import SurgeonSettings
from slimgpt_core.methods.shear.settings import ShearSettings


@dataclass(frozen=True)
class Method:
    name: str
    settings: type | None  # the dataclass of the method's own options; None: only what every prune has
    run: str  # "module:function"
    kind: str = "prune"  # prune: run(model, tokens, settings, callback, should_stop, model_name[, use_cache]) ->
    # RunReport; shape: run(model, tokens, target, settings, progress, should_stop, model_name) -> ShearResult
    uses_cache: bool = False  # prune functions that read and write cached dense statistics take use_cache
    trains: bool = False  # shape methods that train (a memory check first, `steps` micro-batches of data)

    def function(self) -> Callable:
        module, _, attribute = self.run.partition(":")
        return getattr(importlib.import_module(module), attribute)


PIPELINE = "slimgpt_core.methods.pipeline"
METHODS = {m.name: m for m in (
    Method("slimgpt", None, f"{PIPELINE}:_prune_pass", uses_cache=True),
    Method("magnitude", None, f"{PIPELINE}:_prune_pass", uses_cache=True),
    Method("wanda-sp", None, f"{PIPELINE}:_prune_pass", uses_cache=True),
    Method("surgeon", SurgeonSettings, "slimgpt_core.methods.surgeon:prune_surgeon"),
    Method("kobd", SurgeonSettings, "slimgpt_core.methods.surgeon:prune_surgeon"),
    Method("obs-multishot", SurgeonSettings, f"{PIPELINE}:_prune_multishot", uses_cache=True),
    Method("minitron", None, "slimgpt_core.methods.minitron:prune_minitron"),
    Method("shear", ShearSettings, "slimgpt_core.methods.shape_runs:shear_run", kind="shape", trains=True),
)}
# minitron also cuts to a target shape (`shear --method minitron`): the same name among the shape methods
SHAPE_METHODS = {"shear": METHODS["shear"],
                 "minitron": Method("minitron", ShearSettings, "slimgpt_core.methods.shape_runs:minitron_run",
                                    kind="shape")}


def names(kind: str = "prune") -> tuple[str, ...]:
    table = SHAPE_METHODS if kind == "shape" else METHODS
    return tuple(name for name, m in table.items() if m.kind == kind)


def lookup(name: str, kind: str = "prune") -> Method:
    table = SHAPE_METHODS if kind == "shape" else METHODS
    if name not in table or table[name].kind != kind:
        raise SlimGPTError(f"unknown method {name!r} (choose from {', '.join(names(kind))})")
    return table[name]
