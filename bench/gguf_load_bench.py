"""Converting a GGUF into the cached safetensors folder, with the metadata parsed once (what `gguf_to_folder` does)
and with a parse for every reader transformers opens (config, weights, tokenizer's config; the architecture check
its own), side by side on the same file.

    python bench/gguf_load_bench.py [--models smollm2,gemma3-270m] [--repeats 1] [--threads 2]

Each conversion writes into a fresh temporary cache; the two ways alternate (shared first in odd repeats, separate
first in even ones: the first conversion in a process also pays transformers' first imports) so both see the same
machine, and their folders are compared file by file. Wall seconds per conversion
are printed, with the median of each way.
"""
import argparse
import contextlib
import filecmp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from slimgpt_core import models  # noqa: E402
from slimgpt_core.base import assets  # noqa: E402


@contextlib.contextmanager
def _separate_parses(gguf_lib, path):
    """The architecture check's own reader; transformers' readers are left to parse the file again each."""
    try:
        reader = gguf_lib.GGUFReader(str(path))
    except Exception as exc:  # as the product reports an unreadable file
        raise models.unreadable_gguf(path, exc) from None
    yield reader


def _gguf(name: str) -> Path:
    return assets.smollm2_gguf() if name == "smollm2" else models.gemma3_270m_gguf()


def _convert(path: Path, way: str, cache: Path) -> tuple[float, Path]:
    parses = _separate_parses if way == "separate" else models._one_gguf_parse
    with mock.patch.dict(os.environ, {"SLIMGPT_CACHE": str(cache)}), \
            mock.patch.object(models, "_one_gguf_parse", parses):
        start = time.perf_counter()
        folder = models.gguf_to_folder(path)
        return time.perf_counter() - start, folder


def _same_folders(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3-270m")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    for name in args.models.split(","):
        path = _gguf(name)
        print(f"{name}: {path.name} ({path.stat().st_size / 2**20:.0f} MiB)")
        times = {"shared": [], "separate": []}
        for repeat in range(args.repeats):
            folders = {}
            with tempfile.TemporaryDirectory(prefix="gguf-bench-") as scratch:
                ways = ("shared", "separate") if repeat % 2 == 0 else ("separate", "shared")
                for way in ways:
                    seconds, folders[way] = _convert(path, way, Path(scratch) / way)
                    times[way].append(seconds)
                    print(f"  repeat {repeat + 1} {way:8s} {seconds:6.1f} s", flush=True)
                same = _same_folders(folders["shared"], folders["separate"])
                print(f"  repeat {repeat + 1} folders identical: {same}")
        shared, separate = (statistics.median(times[w]) for w in ("shared", "separate"))
        print(f"  median: shared {shared:.1f} s, separate {separate:.1f} s ({separate / shared:.2f}x)")


if __name__ == "__main__":
    main()
