"""Files of a folder on disk, copied and zipped as they are: what an export needs when the weights need no change.

Safetensors are already dense binary, so the zip stores them (ZIP_STORED): deflating hundreds of megabytes of
weights costs most of an export's time and saves a few percent. Copies and zips go through temporary names and
check `should_stop` between chunks, so a cancelled export stops within a chunk and leaves nothing behind."""
from __future__ import annotations

import json
import os
import shutil
import struct
import time
import uuid
import zipfile
from pathlib import Path
from typing import Callable

from slimgpt_core.base.errors import JobCancelled
from slimgpt_core.base.events import Progress

CHUNK = 8 * 2**20
MB = 2**20
# safetensors' names of the floating dtypes a model's weights can be cast to
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def stored_float_dtypes(folder: Path) -> set[str]:
    """The floating dtypes (torch names) of every tensor in the folder's safetensors, read from their headers."""
    found = set()
    for path in Path(folder).glob("*.safetensors"):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        found |= {FLOAT_DTYPES[t["dtype"]] for name, t in header.items()
                  if name != "__metadata__" and t.get("dtype") in FLOAT_DTYPES}
    return found


class ByteProgress:
    """Progress events in megabytes over a known total; `check()` raises when the caller asked to stop."""

    def __init__(self, total_bytes: int, callback: Callable | None, should_stop: Callable[[], bool] | None):
        self.total = max(1, total_bytes)
        self.done = 0
        self.callback = callback
        self.should_stop = should_stop
        self.start = time.time()

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise JobCancelled("export was cancelled: nothing was kept")

    def advance(self, n: int, phase: str) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(Progress(self.done // MB, max(1, self.total // MB), phase, time.time() - self.start))
        self.check()


def copy_file(src: Path, dst: Path, progress: ByteProgress) -> None:
    """A plain copy (never a hard link: a later save into the export folder must not rewrite the run's weights)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            fout.write(chunk)
            progress.advance(len(chunk), f"copying {src.name}")
        shutil.copystat(src, dst)


def write_zip(folder: Path, zip_path: Path, progress: ByteProgress) -> Path:
    """The folder's files, stored uncompressed, into a hidden temporary file beside `zip_path`; the caller renames
    it into place. The temporary file is removed on any failure or cancellation."""
    zip_path = Path(zip_path)
    # a unique name opened exclusively (not mkstemp: its 0600 mode would stay on the zip)
    tmp = zip_path.parent / f".{zip_path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "xb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for path in sorted(Path(folder).iterdir()):
                info = zipfile.ZipInfo.from_file(path, path.name)
                info.compress_type = zipfile.ZIP_STORED
                with open(path, "rb") as src, archive.open(info, "w") as dst:
                    while chunk := src.read(CHUNK):
                        dst.write(chunk)
                        progress.advance(len(chunk), f"zipping {path.name}")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp
