"""The workspace: one folder of runs shared by the studio and the command line.

`runs/` at the project root (or `SLIMGPT_RUNS`). Each run is a folder written all at once (runs.atomic_folder):
the checkpoint, `report.json`, and two small files the listing reads instead of the report:
- `meta.json`: label, notes, creation time and a summary (model, method, schedule, ratios, parameters);
- `evaluations.json`: every measurement taken of the run, each with its provenance.
Folders whose name starts with "." are temporary (an export or run being written) and never listed."""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers

from slimgpt_core.base.assets import PROJECT_ROOT
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.events import RunReport
from slimgpt_core.export.checkpoint import export_checkpoint

RUNS_ENV = "SLIMGPT_RUNS"
META = "meta.json"
EVALUATIONS = "evaluations.json"
EVAL_LIBRARY = "lm_eval"  # its distribution name, also the key its version is recorded under
_write_lock = threading.Lock()  # read-modify-write of the small files within this process


def runs_root() -> Path:
    root = Path(os.environ.get(RUNS_ENV) or PROJECT_ROOT / "runs").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SlimGPTError(f"cannot create the runs folder {root}: {exc.strerror}") from None
    return root


def _write_json_atomic(path: Path, value) -> None:
    """Readers see the old file or the new one, never a torn write."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(value, indent=1, default=float))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SlimGPTError(f"could not write {path}: {exc.strerror or exc}") from None


def _read_json(path: Path):
    return json.loads(path.read_text())


def _read_object(path: Path) -> dict:
    """A JSON object from a file; {} when the file is missing, torn, or holds something else."""
    try:
        value = _read_json(path)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def shape_text(target: dict) -> str:
    """A shape run's target as the listing's schedule column: '24 L · 2×3 heads · FFN 1024 · d 512'."""
    per_group = target["heads"] // max(target["kv_groups"], 1)
    return (f"to {target['layers']} L · {target['kv_groups']}×{per_group} heads · FFN {target['ffn']} · "
            f"d {target['hidden']}")


def summary_of(report) -> dict:
    """What the listing shows of a run, taken from its report once, when the run is written."""
    s = report.settings or {}
    rec, pre = getattr(report, "recovery", None), getattr(report, "pretrain", None)
    pretrained_from = (pre or {}).get("source_run")  # the latest derivation first
    return {"model": report.model, "method": s.get("method", "slimgpt"), "schedule": s.get("schedule") or (shape_text(s["target"]) if s.get("target") else ""),
            "ratio": s.get("ratio"), "sequential": s.get("sequential", True),
            "calibration": {k: s.get(k) for k in ("calib", "nsamples", "seqlen", "seed")},
            "requested_ratio": report.requested_ratio, "achieved_layer_ratio": report.achieved_layer_ratio,
            "achieved_ratio": report.achieved_ratio, "params_before": report.params_before,
            "params_after": report.params_after,
            "source_run": (Path(pretrained_from).name if pretrained_from else None) or s.get("source_run")
            or (rec or {}).get("source"),
            "trained": [name for name, done in (("recovery", rec), ("pretrain", pre)) if done]}


def write_meta(folder: Path, report=None, label: str = "", notes: str = "", created: float | None = None) -> None:
    meta = {"label": label, "notes": notes, "created": created or time.time()}
    if report is not None:
        meta["summary"] = summary_of(report)
    _write_json_atomic(Path(folder) / META, meta)


@dataclass
class RunInfo:
    """One run as listed: read from meta.json and evaluations.json only (weights and report load on demand)."""
    name: str
    path: Path
    label: str = ""
    notes: str = ""
    created: float = 0.0
    summary: dict = field(default_factory=dict)
    evaluations: list[dict] = field(default_factory=list)
    size_bytes: int = 0
    broken: str | None = None  # why the folder is not a usable run

    @property
    def title(self) -> str:
        return f"{self.label} ({self.name})" if self.label and self.label != self.name else self.name

    @property
    def perplexity(self) -> dict | None:
        """The latest perplexity measured of this run."""
        found = [e for e in self.evaluations if e.get("kind") == "perplexity"]
        return found[-1] if found else None


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def read_run(path: Path) -> RunInfo:
    """A run folder as listed; a broken one (partial, corrupt) comes back with the reason, never an exception."""
    path = Path(path)
    info = RunInfo(path.name, path, created=path.stat().st_mtime)
    try:
        info.size_bytes = _folder_size(path)
        if not (path / "config.json").exists():
            info.broken = "no config.json: not a model folder"
        elif not any(path.glob("*.safetensors")):
            info.broken = "no .safetensors weights"
        if (path / META).exists():
            meta = _read_json(path / META)
            info.label, info.notes = meta.get("label", ""), meta.get("notes", "")
            info.created = meta.get("created", info.created)
            info.summary = meta.get("summary", {})
        elif (path / "report.json").exists():  # a run written before meta.json existed
            info.summary = summary_of(RunReport.load(path / "report.json"))
        if (path / EVALUATIONS).exists():
            info.evaluations = _read_json(path / EVALUATIONS)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:  # AttributeError: JSON not an object
        info.broken = f"unreadable: {type(exc).__name__}: {exc}"
    return info


def list_runs(root: Path | None = None) -> list[RunInfo]:
    """Every run in the workspace, newest first. Cheap: no weights and no report are read."""
    root = Path(root) if root else runs_root()
    runs = [read_run(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))]
    return sorted(runs, key=lambda r: r.created, reverse=True)


def run_path(name: str, root: Path | None = None) -> Path:
    if not name or "/" in name or name.startswith("."):  # "." and ".." start with "." too
        raise SlimGPTError(f"{name!r} is not a run name (a folder name inside the runs folder)")
    path = (Path(root) if root else runs_root()) / name
    if not path.is_dir():
        raise SlimGPTError(f"no run named {name!r} in {path.parent}")
    return path


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "run"


def new_run_name(base: str, root: Path | None = None) -> str:
    """A folder name not yet taken: the slug of `base`, with -2, -3, … when needed."""
    root = Path(root) if root else runs_root()
    base = slug(base)
    name, k = base, 2
    while (root / name).exists():
        name, k = f"{base}-{k}", k + 1
    return name


def save_run(model, tokenizer, report, name: str | None = None, label: str = "", notes: str = "",
             root: Path | None = None, overwrite: bool = False,
             extra: Callable[[Path], None] | None = None) -> RunInfo:
    """Write a run into the workspace at once: a failure leaves nothing behind and nothing listed. The one way a
    run is saved: the checkpoint, report.json and meta.json, and `extra(tmp)` for a method's own files (say
    shear.json) or measurements, all written into the folder before it appears."""

    root = Path(root) if root else runs_root()
    name = name or new_run_name(time.strftime("%Y%m%d-%H%M%S") + "-" + (label or report.model or "run"), root)

    def files(tmp: Path) -> None:
        write_meta(tmp, report, label or name, notes)
        if extra is not None:
            extra(tmp)

    export_checkpoint(model, tokenizer, root / name, report, overwrite=overwrite, extra=files)
    return read_run(root / name)


def save_run_at(model, tokenizer, report, out: str | Path, overwrite: bool = False, label: str = "",
                extra: Callable[[Path], None] | None = None) -> Path:
    """A run written at a path (say `prune --out "$SLIMGPT_RUNS/x"`): the workspace's own writer with the path's
    folder as the root, so it is listed by the studio like a run made there."""

    out = Path(out)
    return save_run(model, tokenizer, report, name=out.name, label=label, root=out.parent, overwrite=overwrite,
                    extra=extra).path


def update_meta(name: str, root: Path | None = None, **changes) -> RunInfo:
    """Change a run's label or notes (written atomically)."""
    path = run_path(name, root)
    with _write_lock:
        meta = _read_json(path / META) if (path / META).exists() else {"created": path.stat().st_mtime}
        meta.update({k: v for k, v in changes.items() if k in ("label", "notes")})
        _write_json_atomic(path / META, meta)
    return read_run(path)


def rename_run(name: str, new_name: str, root: Path | None = None) -> RunInfo:
    """Rename a run's folder (its label stays)."""
    path = run_path(name, root)
    target = path.parent / slug(new_name)
    if target.exists():
        raise SlimGPTError(f"a run named {target.name!r} already exists")
    os.replace(path, target)
    return read_run(target)


def delete_run(name: str, root: Path | None = None) -> None:
    """Remove a run from disk: first renamed out of the listing (atomic), then deleted."""
    path = run_path(name, root)
    doomed = path.parent / f".deleting-{path.name}-{os.getpid()}-{time.time_ns()}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def add_evaluation(folder: Path, record: dict) -> None:
    """Append one measurement (with its provenance) to a run's evaluations.json."""
    path = Path(folder) / EVALUATIONS
    with _write_lock:
        existing = _read_json(path) if path.exists() else []
        _write_json_atomic(path, existing + [record])


def add_measurement(folder: Path, kind: str, value: dict, **context) -> None:
    """Store one measurement of a model (perplexity, task, speed) with its provenance: what was measured, how
    (batch size, device, …: `context`), when, and with which library versions."""
    add_evaluation(folder, {"kind": kind, **value, **context, "when": time.time(), "versions": versions()})


def dense_evaluations_folder(model_name: str, root: Path | None = None) -> Path:
    """Evaluations of a dense (unpruned) model live beside the runs, in a hidden folder of its own."""
    folder = (Path(root) if root else runs_root()) / ".dense" / slug(model_name)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def read_evaluations(folder: Path) -> list[dict]:
    try:  # a missing file is an OSError too: no evaluations
        return _read_json(Path(folder) / EVALUATIONS)
    except (OSError, ValueError):
        return []


def versions() -> dict:
    """Library versions that a measurement depends on (part of its provenance)."""
    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        out[EVAL_LIBRARY] = importlib.metadata.version(EVAL_LIBRARY)
    except Exception:  # lm-eval not installed: nothing measured with it
        pass
    return out


def studio_state_path(root: Path | None = None) -> Path:
    return (Path(root) if root else runs_root()) / ".studio.json"


def remember(key: str, value, root: Path | None = None) -> None:
    """Server-wide studio state that survives reloads and restarts (the loaded model, for instance)."""
    path = studio_state_path(root)
    with _write_lock:
        state = _read_object(path)
        state[key] = value
        _write_json_atomic(path, state)


def recall(key: str, default=None, root: Path | None = None):
    return _read_object(studio_state_path(root)).get(key, default)


def as_dict(info: RunInfo) -> dict:
    d = asdict(info)
    d["path"] = str(info.path)
    return d
