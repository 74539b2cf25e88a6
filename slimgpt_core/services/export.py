"""Export: a run or model written as a checkpoint folder that transformers loads (and a zip), or as one GGUF file
for llama.cpp, for the command line (`export_to`) and the studio's Export page (`export_run`)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from slimgpt_core.workspace.exports import export_model
from slimgpt_core.workspace.gguf import export_gguf


def export_run(run_folder: str | Path, out: str | Path, make_zip: bool = True, dtype: str | None = None,
               overwrite: bool = True, callback: Callable | None = None, should_stop: Callable[[], bool] | None = None):
    """Write a workspace run as a loadable checkpoint (+ zip), in the dtype asked for ("as stored": the run's own
    dtype, its weight files copied as they are). The result names the run it came from."""

    return export_model(str(run_folder), out, make_zip, overwrite,
                        "auto" if not dtype or dtype in ("as stored", "as loaded") else dtype,
                        callback=callback, should_stop=should_stop)


def export_to(model: str, out: str | Path, format: str = "safetensors", make_zip: bool = False, dtype: str = "auto",
              weight_type: str = "q8_0", overwrite: bool = False) -> dict:
    """The command line's export: a summary of what was written."""
    if format == "gguf":
        written = export_gguf(model, out, weight_type, overwrite=overwrite)
        return {"out": str(written.path), "architecture": written.architecture, "weight_type": written.weight_type,
                "bytes": written.bytes, "tokenizer": written.tokenizer_source,
                "f16_fallback": written.fallback_tensors}
    result = export_model(model, out, make_zip, overwrite, dtype)
    return {"out": str(result.folder), "zip": str(result.zip_path) if result.zip_path else None,
            "remote_code": result.heterogeneous, "parameters": result.parameters, "files": result.files}
