"""The method registry: prune_model runs the function registered for the method, and names an unknown one."""
import copy

import pytest
import torch

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.methods import registry
from slimgpt_core.methods.minitron import prune_minitron
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from tests.tiny_models import tiny_model


def test_every_registered_method_resolves_to_a_function_and_its_own_settings():
    for method in [*registry.METHODS.values(), *registry.SHAPE_METHODS.values()]:
        assert callable(method.function()), method.name
        assert method.settings is None or hasattr(method.settings, "__dataclass_fields__"), method.name
    assert all(m.settings is not None for m in registry.SHAPE_METHODS.values())  # a shape method's settings, whole
    assert registry.names("shape") == ("shear", "minitron")


def test_an_unknown_method_is_one_sentence_naming_the_choices():
    with pytest.raises(SlimGPTError, match=r"unknown method 'nope' \(choose from slimgpt, magnitude, wanda-sp, "
                                           r"surgeon, kobd, obs-multishot, minitron\)"):
        prune_model(tiny_model(), torch.zeros(2, 4, dtype=torch.long), PruneSettings(method="nope"))


def test_prune_model_gives_what_the_method_s_own_function_gives():
    """minitron through the registry against prune_minitron called directly on a copy: the same weights."""
    model = tiny_model()
    twin = copy.deepcopy(model)
    tokens = torch.randint(0, 101, (4, 8), generator=torch.Generator().manual_seed(1))
    settings = PruneSettings(ratio=0.5, method="minitron", device="cpu")
    prune_model(model, tokens, settings)
    prune_minitron(twin, tokens, copy.deepcopy(settings))
    a, b = model.state_dict(), twin.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert model.model.layers[-1].mlp.down_proj.in_features < 48  # it did prune
