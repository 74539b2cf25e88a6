"""Background jobs for interactive front ends: a thread, its events, cancellation. No UI code here.

The function a job runs receives `callback(event)` and `should_stop()`; the UI polls `Job.events`,
`Job.state` and `Job.result` from its own thread. `BOARD` holds the jobs of the whole server process, so
a reloaded page or a second tab finds a running job (its events, its Cancel) by kind."""
from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from slimgpt_core.errors import PruningCancelled, SlimGPTError


@dataclass
class Job:
    name: str
    state: str = "running"  # queued | running | done | cancelled | failed
    events: list = field(default_factory=list)
    result: Any = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    label: str = ""  # what the user sees (e.g. the run being made)
    id: int = 0
    settings: dict = field(default_factory=dict)  # what it was started with, frozen (shown beside it)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def running(self) -> bool:
        """Not finished yet (queued or running)."""
        return self.state in ("queued", "running")

    @property
    def queued(self) -> bool:
        return self.state == "queued"

    @property
    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started

    def wait(self, timeout: float | None = None) -> "Job":
        if self._thread is not None:
            self._thread.join(timeout)
        return self


def start_job(name: str, fn: Callable[..., Any], *args, **kwargs) -> Job:
    """Run fn(*args, callback=..., should_stop=..., **kwargs) in a daemon thread."""
    return _launch(Job(name), None, fn, args, kwargs)


def _launch(job: Job, turn: threading.Semaphore | None, fn: Callable[..., Any], args, kwargs) -> Job:
    """Start the job's thread; with `turn`, it first waits (state "queued", cancellable) for its turn."""
    def target():
        if turn is not None:
            while not turn.acquire(timeout=0.1):
                if job._cancel.is_set():
                    job.state, job.finished = "cancelled", time.time()
                    return
            job.state, job.started = "running", time.time()
        try:
            job.result = fn(*args, callback=job.events.append, should_stop=job._cancel.is_set, **kwargs)
            job.state = "done"
        except PruningCancelled:
            job.state = "cancelled"
        except SlimGPTError as exc:
            job.error, job.state = str(exc), "failed"
        except Exception as exc:  # shown to the user as one line; details kept for the log
            job.error = f"{type(exc).__name__}: {exc}"
            job.state = "failed"
            traceback.print_exc()
        finally:
            job.finished = time.time()
            if turn is not None:
                turn.release()

    job._thread = threading.Thread(target=target, name=f"slimgpt-{job.name}", daemon=True)
    job._thread.start()
    return job


class JobBoard:
    """The jobs of this server process, shared by every browser session. Heavy jobs (forward passes over a
    model) take turns, so two tabs starting one each never fight over the cores or memory: the second waits,
    queued and visible, and can be cancelled while it waits."""

    def __init__(self, heavy_slots: int = 1, keep: int = 50):
        self._turn = threading.Semaphore(heavy_slots)
        self._jobs: list[Job] = []
        self._lock = threading.Lock()
        self._keep = keep
        self._next_id = 1

    def submit(self, kind: str, fn: Callable[..., Any], *args, job_label: str = "", heavy: bool = True,
               **kwargs) -> Job:
        with self._lock:
            job = Job(kind, state="queued" if heavy else "running", label=job_label, id=self._next_id)
            self._next_id += 1
            # drop all but the newest `keep` finished jobs, in place: the order is what `latest` relies on
            finished = [j for j in self._jobs if not j.running]
            dropped = {id(j) for j in finished[:-self._keep]}
            self._jobs = [j for j in self._jobs if id(j) not in dropped]
            self._jobs.append(job)
        return _launch(job, self._turn if heavy else None, fn, args, kwargs)

    def latest(self, kind: str) -> Job | None:
        with self._lock:
            found = [j for j in self._jobs if j.name == kind]
        return found[-1] if found else None

    def running(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs if j.running]

    def forget_finished(self) -> None:
        """Drop finished jobs (their results are on disk or recomputable): a fresh start for tests."""
        with self._lock:
            self._jobs = [j for j in self._jobs if j.running]


BOARD = JobBoard()
