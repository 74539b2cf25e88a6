"""Exporting a run as it is stored, the old way and the new, side by side on the same run folder.

    python bench/export_bench.py --run RUN_FOLDER [--out SCRATCH] [--repeats 1] [--threads 1]
                                 [--paths old,new,float16,deflate1]
    python bench/export_bench.py --model default [--ratio 0.2]   # prunes a run first (tiny calibration)

old: load the weights, save_pretrained them again and deflate the folder into a zip (what the export did before).
new: the run's files copied byte for byte, a fresh model card, and a zip that stores them (no load, no re-save).
The dtype-change path (float16) loads and re-saves and also runs, for reference; deflate1 (on request) zips the
new export's folder at zlib level 1, to weigh the stored zip's size against compression time. Each export's weights are
compared with the run's; wall and CPU seconds and the zip sizes are printed. On a shared machine the wall time
depends on the load and the page cache: the runs alternate so both see the same conditions.
"""
import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from slimgpt_core.export.archive import stored_float_dtypes  # noqa: E402
from slimgpt_core.export.checkpoint import export_checkpoint, zip_path_for  # noqa: E402
from slimgpt_core.workspace.exports import _card_inputs, export_model  # noqa: E402
from slimgpt_core.models import load_model  # noqa: E402
from slimgpt_core.base.atomic import atomic_zip  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def old_export(run: Path, out: Path) -> Path:
    """The export as it was: load (auto dtype: float32 on the CPU), save_pretrained, deflate the folder."""
    report, evaluation, _ = _card_inputs(run)
    loaded = load_model(str(run), "cpu", "auto")
    export_checkpoint(loaded.model, loaded.tokenizer, out, report, evaluation, str(run), overwrite=True)
    return atomic_zip(out, out.with_suffix(".zip"))


def new_export(run: Path, out: Path) -> Path:
    return export_model(str(run), out, make_zip=True, overwrite=True).zip_path


def half_export(run: Path, out: Path) -> Path:
    return export_model(str(run), out, make_zip=True, overwrite=True, dtype="float16").zip_path


def deflate1_export(run: Path, out: Path) -> Path:
    """For the size trade-off: the new export's folder deflated at zlib level 1 instead of stored."""
    folder = export_model(str(run), out, overwrite=True).folder
    zip_path = zip_path_for(folder)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for path in sorted(folder.iterdir()):
            z.write(path, path.name)
    return zip_path


PATHS = {"old": old_export, "new": new_export, "float16": half_export, "deflate1": deflate1_export}


def timed(fn, run: Path, out: Path) -> tuple[float, float, Path]:
    wall, cpu = time.perf_counter(), time.process_time()
    zip_path = fn(run, out)
    return time.perf_counter() - wall, time.process_time() - cpu, zip_path


def prune_run(model: str, ratio: float, workspace: Path) -> Path:
    out = workspace / "runs" / f"bench-{ratio:g}"
    env = {**os.environ, "SLIMGPT_RUNS": str(workspace / "runs")}
    cmd = [sys.executable, "-m", "slimgpt_core", "prune", "--model", model, "--ratio", str(ratio), "--calib",
           "tinystories", "--nsamples", "4", "--seqlen", "64", "--device", "cpu", "--out", str(out), "--quiet"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="a run folder (default: prune --model into a temporary workspace)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--out", help="scratch folder for the exports (default: a temporary folder)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--paths", default="old,new,float16",
                    help=f"comma separated, run in this order each repeat: {', '.join(PATHS)}")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = Path(args.out or tempfile.mkdtemp(prefix="export-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    run = Path(args.run) if args.run else prune_run(args.model, args.ratio, scratch)
    weights = sorted(run.glob("*.safetensors"))
    print(f"run {run}: {sum(p.stat().st_size for p in weights) / 2**20:.1f} MB of safetensors "
          f"({', '.join(p.name for p in weights)}), stored dtype {sorted(stored_float_dtypes(run))}")
    paths = [(name, PATHS[name]) for name in args.paths.split(",")]
    for repeat in range(args.repeats):
        for name, fn in paths:
            out = scratch / f"{name}-export"
            wall, cpu, zip_path = timed(fn, run, out)
            same = all(filecmp.cmp(p, out / p.name, shallow=False) for p in weights if (out / p.name).exists())
            print(f"{name:8s} repeat {repeat}: {wall:7.2f} s wall, {cpu:7.2f} s CPU; zip {zip_path.name} "
                  f"{zip_path.stat().st_size / 2**20:.1f} MB; weights byte-identical to the run's: {same}")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    if not args.out:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
