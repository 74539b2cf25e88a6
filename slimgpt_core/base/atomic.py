"""Folders written all at once: into a temporary sibling, renamed into place at the end.

A failure or interruption midway leaves neither a half-written folder nor the temporary one."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from slimgpt_core.base.errors import SlimGPTError


def check_output_folder(out: str | Path, overwrite: bool = False) -> Path:
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SlimGPTError(f"output folder {out} already exists and is not empty (choose another --out or pass --force)")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SlimGPTError(f"cannot create the output folder's parent {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise SlimGPTError(f"cannot write into {parent}")
    return out


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces `out`, on any error it is removed."""
    out = check_output_folder(out, overwrite)
    tmp = Path(tempfile.mkdtemp(dir=out.resolve().parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:
        hint = " (disk full)" if exc.errno == errno.ENOSPC else ""
        raise SlimGPTError(f"could not write {out}: {exc.strerror or exc}{hint}; nothing was kept") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_zip(folder: Path, zip_path: Path) -> Path:
    """Zip `folder` into `zip_path` via a temporary file."""
    zip_path = Path(zip_path)
    tmp_base = zip_path.parent / f".{zip_path.stem}.tmp-{os.getpid()}"
    try:
        made = Path(shutil.make_archive(str(tmp_base), "zip", root_dir=folder))
        os.replace(made, zip_path)
    except OSError as exc:
        Path(str(tmp_base) + ".zip").unlink(missing_ok=True)
        raise SlimGPTError(f"could not write {zip_path}: {exc.strerror or exc}") from None
    return zip_path
