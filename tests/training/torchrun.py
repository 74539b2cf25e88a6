"""The command line under torchrun, and the failure both distributed commands share: a checkpoint written by two
processes resumed by three."""
import os
import subprocess
import sys
from pathlib import Path

from tests import ROOT


def torchrun(processes: int, args: list[str]) -> subprocess.CompletedProcess:
    """`python -m slimgpt_core ARGS` as `processes` local torchrun workers, one OpenMP thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "slimgpt_core", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_three_processes_cannot_resume_two(args: list[str], checkpoint: Path, out: Path) -> None:
    """Resume `checkpoint` (written by two processes) with three, running `args` (the command and its flags; --resume
    and --out OUT are added): process 2 finds no RNG state of its own and fails alone, in one sentence, and nothing
    is written to `out`."""
    failed = torchrun(3, [*args, "--resume", "--out", str(out)])
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert failed.returncode != 0 and not out.exists()
    # its sentence first; the others add one line each on their way out (their collective broke); torchrun's own
    # launcher report (ChildFailedError) follows, as it does for any failed job
    assert all(line.startswith("error: process ") for line in errors)
    assert errors[0] == (f"error: process 2 of 3: checkpoint {checkpoint} was written by "
                         "fewer processes than the 3 resuming it (resume with the same --nproc-per-node)")
