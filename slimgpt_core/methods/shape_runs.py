"""The shape methods (`shear --method ...`) behind one signature, as the registry names them: learn or score, then
cut the model to a target shape; a ShearResult back."""
from __future__ import annotations

from typing import Callable

from slimgpt_core.base.devices import resolve_device
from slimgpt_core.methods.minitron import shape_run
from slimgpt_core.methods.shear.target import Shape
from slimgpt_core.methods.shear.settings import ShearSettings
from slimgpt_core.methods.shear.train import ShearResult, shear_model


def shear_run(model, tokens, target: Shape, settings: ShearSettings, progress: Callable | None = None,
              should_stop: Callable[[], bool] | None = None, model_name: str = "") -> ShearResult:
    """Sheared-LLaMA: masks learned to the target with Lagrange multipliers, then the cut."""
    return shear_model(model, tokens, target, settings, progress, should_stop, model_name=model_name)


def minitron_run(model, tokens, target: Shape, settings: ShearSettings, progress: Callable | None = None,
                 should_stop: Callable[[], bool] | None = None, model_name: str = "") -> ShearResult:
    """Minitron: one forward pass of activation importance on `tokens`, then the same cut (no training)."""
    return shape_run(model, tokens, target, settings.batch_size, resolve_device(settings.device), model_name,
                     should_stop)
