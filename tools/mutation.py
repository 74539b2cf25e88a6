"""Mutation testing of slimgpt_core with mutmut, against the fast tests only (not run in CI).

    python tools/mutation.py                       # methods/obs.py, schedules/schedule.py, evaluation/evaluate.py (~20 min, 2 cores)
    python tools/mutation.py --modules base.cache base.atomic  # any other modules, with their fast tests
    python tools/mutation.py --show                # also print the diff of every surviving mutant

The project and the chosen test files are copied into a scratch folder (mutmut rewrites the sources it mutates
there, never in the checkout), mutmut 3 runs there, and a table of killed / surviving mutants per module is
printed and written to WORKDIR/summary.json. docs/testing.md records the last counts and why each survivor is
acceptable. mutmut is a development tool: `pip install -r requirements-dev.txt` (installed here when missing).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# module -> the fast tests (tiny tensors and tiny random models, seconds each) that exercise it, relative to tests/
FAST_TESTS = {
    "methods.obs": ["methods/test_obs.py"],
    "schedules.schedule": ["schedules/test_schedule.py"],
    "evaluation.evaluate": ["evaluation/test_evaluate.py"],
    "base.cache": ["workspace/test_cache.py"],
    "base.atomic": ["workspace/test_atomic.py"],
    "base.shapes": ["base/test_shapes.py", "methods/test_surgery.py", "methods/test_arch_mqa.py",
                    "methods/test_arch_unsupported.py", "methods/test_arch_exact.py", "methods/test_arch_methods.py",
                    "evaluation/test_speed.py"],
    "base.modeling_slimgpt": ["base/test_modeling_slimgpt.py", "methods/test_surgery.py", "methods/test_arch_exact.py",
                              "methods/test_arch_mqa.py"],
    "methods.kfac": ["methods/test_surgeon.py", "methods/test_surgeon_update.py", "methods/test_kfac.py"],
    "methods.curvature": ["methods/test_surgeon.py", "methods/test_surgeon_update.py", "methods/test_kfac.py"],
    "methods.shear.hard_concrete": ["methods/shear/test_shear.py"],
    "methods.shear.masks": ["methods/shear/test_shear.py"],
    "methods.shear.cut": ["methods/shear/test_shear.py"],
    "training.domain_mix": ["methods/shear/test_shear.py"],
    "methods.minitron": ["methods/shear/test_shear.py", "methods/test_minitron.py"],
    "training.loop": ["training/test_loop.py"],
    "schedules.curves": ["schedules/test_curves.py"],
    "methods.activations": ["methods/test_preview.py", "methods/test_activations.py"],
    "base.devices": ["methods/test_activations.py"],
    "methods.statistics": ["methods/test_preview.py", "methods/test_statistics.py"],
    "schedules.stitched": ["schedules/test_stitched.py", "schedules/test_allocation.py"],
    "workspace.jobs": ["workspace/test_jobs.py"],
    "workspace.store": ["workspace/test_atomic.py", "evaluation/test_run_comparison.py", "workspace/test_store.py"],
    "methods.settings": ["methods/test_settings.py", "cli/test_cli_package.py"],
    "training.settings": ["cli/test_cli_package.py", "training/test_settings.py"],
}
# tests of a mapped file that take too long to run once per mutant (deselected from every mutmut run)
SLOW_TESTS = ["methods/shear/test_shear.py::test_expected_sizes_reach_the_target_within_200_steps"]
DEFAULT_MODULES = ["methods.obs", "schedules.schedule", "evaluation.evaluate"]
MUTMUT = "mutmut==3.8.1"


def _module_of(mutant: str) -> str:
    """'slimgpt_core.methods.obs.x_f__mutmut_3' or '….xǁClassǁmethod__mutmut_1' -> 'methods.obs'."""
    parts = mutant.removeprefix("slimgpt_core.").split(".")
    first = next((i for i, p in enumerate(parts) if p.startswith(("x_", "xǁ"))), len(parts) - 1)
    return ".".join(parts[:first])


def ensure_mutmut() -> None:
    if importlib.util.find_spec("mutmut") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", MUTMUT], check=True)


def prepare(workdir: Path, modules: list[str], tests: list[str]) -> None:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    shutil.copytree(ROOT / "slimgpt_core", workdir / "slimgpt_core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # the tests' package files, conftest and helpers in every folder, then the chosen test files
    helpers = [p.relative_to(ROOT / "tests") for p in (ROOT / "tests").rglob("*.py")
               if not p.name.startswith("test_") and "apps" not in p.parts]
    for name in [*helpers, *tests]:
        (workdir / "tests" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "tests" / name, workdir / "tests" / name)
    only = "\n".join(f"    slimgpt_core/{m.replace('.', '/')}.py" for m in modules)
    selection = "\n".join(f"    tests/{t}" for t in tests)
    deselect = "".join(f"    --deselect\n    tests/{t}\n" for t in SLOW_TESTS if t.split("::")[0] in tests)
    (workdir / "setup.cfg").write_text(
        "[mutmut]\nsource_paths=slimgpt_core\n"
        f"only_mutate=\n{only}\n"
        f"pytest_add_cli_args_test_selection=\n{selection}\n"
        "pytest_add_cli_args=\n    -p\n    no:cacheprovider\n    -q\n" + deselect +
        # generous: on a shared machine a slow test run must not pass for a mutant caught by a timeout
        "timeout_multiplier=60\n")


def results(workdir: Path) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=workdir,
                         capture_output=True, text=True)
    status = {}
    for line in out.stdout.splitlines():
        m = re.match(r"\s*(\S+):\s*(.+)$", line)
        if m and "__mutmut_" in m.group(1):
            status[m.group(1)] = m.group(2).strip()
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", nargs="+", default=DEFAULT_MODULES, help="modules of slimgpt_core to mutate")
    parser.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "slimgpt-mutation"))
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested in parallel")
    parser.add_argument("--show", action="store_true", help="print the diff of every surviving mutant")
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in FAST_TESTS]
    if unknown:
        parser.error(f"no fast tests listed for {', '.join(unknown)} (add them to FAST_TESTS)")
    ensure_mutmut()
    tests = sorted({t for m in args.modules for t in FAST_TESTS[m]})
    workdir = Path(args.workdir)
    prepare(workdir, args.modules, tests)
    # one BLAS/OpenMP thread: mutmut forks a child per mutant, and a child forked after torch started its
    # OpenMP pool hangs in its first parallel region (then every such mutant "times out")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1",
           "SLIMGPT_ASSETS": os.environ.get("SLIMGPT_ASSETS", str(ROOT.parent / "shared" / "assets")),
           "SLIMGPT_CACHE": str(workdir / "cache")}
    subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.jobs)], cwd=workdir, env=env)
    status = results(workdir)
    per_module: dict[str, Counter] = defaultdict(Counter)
    survivors = defaultdict(list)
    for name, state in status.items():
        module = _module_of(name)
        per_module[module][state] += 1
        if state != "killed":
            survivors[module].append((name, state))
    print(f"\n{'module':<18} {'mutants':>8} {'killed':>8} {'survived':>9} {'other':>6}")
    for module in sorted(per_module):
        c = per_module[module]
        total = sum(c.values())
        print(f"{module:<18} {total:>8} {c['killed']:>8} {c['survived']:>9} {total - c['killed'] - c['survived']:>6}")
    for module in sorted(survivors):
        for name, state in sorted(survivors[module]):
            print(f"  {state:<10} {name}")
            if args.show:
                diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=workdir,
                                      capture_output=True, text=True).stdout
                print("\n".join("      " + line for line in diff.splitlines() if line.startswith(("+", "-"))
                                and not line.startswith(("+++", "---"))))
    (workdir / "summary.json").write_text(json.dumps(
        {"modules": {m: dict(c) for m, c in per_module.items()},
         "not_killed": {m: [list(s) for s in v] for m, v in survivors.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
