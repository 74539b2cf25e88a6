import os

import pytest
import torch

from tests import ROOT

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers share two cores: one thread each (and for the CLIs, servers and llama.cpp they start), so
    # neither waits on the other's spinning threads
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


# The files that take longest (`--durations`, both workers busy), first: pytest-xdist gives each file to one worker
# (--dist loadfile) in the order collected (--no-loadscope-reorder), so a long file started last would keep one
# worker busy while the other has nothing left to run.
LONGEST_FIRST = ("studio/browser/test_browser.py", "methods/test_arch_gemma3_real.py",
                 "training/test_distributed.py", "studio/browser/test_browser_small.py",
                 "export/test_gguf_smollm2.py", "training/test_shear_distributed.py", "cli/test_cli_real.py",
                 "export/test_export_eval.py", "workspace/test_workspace.py", "studio/browser/test_browser_race.py",
                 "studio/browser/test_browser_editor.py", "training/test_recover.py", "methods/test_scale.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    tests = ROOT / "tests"
    items.sort(key=lambda item: rank.get(item.path.relative_to(tests).as_posix()
                                         if item.path.is_relative_to(tests) else "", len(rank)))


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
