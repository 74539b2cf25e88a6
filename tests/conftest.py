import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub


def tiny_model(arch: str = "llama", heads: int = 4, kv: int = 2, layers: int = 3, ffn: int = 48, hidden: int = 32,
               seed: int = 0):
    """A tiny random decoder for exact-math tests (shapes, identities), never for quality claims."""
    from transformers import AutoModelForCausalLM, AutoConfig

    torch.manual_seed(seed)
    kwargs = dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=101, max_position_embeddings=128, head_dim=hidden // heads)
    if arch == "qwen2":
        kwargs["layer_types"] = ["full_attention"] * layers
    config = AutoConfig.for_model(arch, **kwargs)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random weights with some spread, so every head matters differently
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.config.use_cache = False
    return model


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 101, (12, 24), generator=g)


@pytest.fixture(scope="session")
def assets_root():
    from slimgpt_core.base.assets import asset_root
    root = asset_root(required=True)
    assert (root / "models" / "stories260k" / "model.safetensors").exists()
    return root


@pytest.fixture
def app(tmp_path, monkeypatch):
    """The studio in AppTest with its own cache, workspace and an empty job board (jobs belong to the process)."""
    from streamlit.testing.v1 import AppTest

    from slimgpt_core.workspace.jobs import BOARD
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SLIMGPT_RUNS", str(tmp_path / "runs"))
    BOARD.forget_finished()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    assert not at.exception
    return at


@pytest.fixture(autouse=True)
def _transformers_logs_through_pytest():
    """transformers binds its log handler to the stderr of the moment; capsys swaps stderr between tests."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    yield


class DeviceMoves(torch.overrides.TorchFunctionMode):
    """Records the device named by every `tensor.to(...)` call (None when the call names none). A move to `pretend`
    (e.g. meta, a device without data) is recorded and not made: CPU-only tests can check that code sends tensors to
    the device it was given, as it would to a GPU."""

    def __init__(self, pretend: str | None = None):
        super().__init__()
        self.moves: list[torch.device | None] = []
        self.pretend = torch.device(pretend) if pretend else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            device = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
            device = torch.device(device) if device is not None else None
            self.moves.append(device)
            if device is not None and device == self.pretend:
                dtype = kwargs.get("dtype", next((a for a in args[1:] if isinstance(a, torch.dtype)), None))
                return args[0] if dtype is None else args[0].to(dtype=dtype)
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def one_thread_and_own_cache(tmp_path_factory):
    """For a training module: one BLAS thread (on a loaded shared machine two threads on these tiny matrices are
    many times slower) and a cache of its own, restored afterwards."""
    threads, old = torch.get_num_threads(), os.environ.get("SLIMGPT_CACHE")
    torch.set_num_threads(1)
    os.environ["SLIMGPT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    torch.set_num_threads(threads)
    if old is None:
        del os.environ["SLIMGPT_CACHE"]
    else:
        os.environ["SLIMGPT_CACHE"] = old
