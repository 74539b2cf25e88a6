"""Background jobs for interactive front ends: a thread, its events, cancellation. No UI code here.

The function a job runs receives `callback(event)` and `should_stop()`; the UI polls `Job.events`,
`Job.state` and `Job.result` from its own thread. `BOARD` holds the jobs of the whole server process, so
a reloaded page or a second tab finds a running job (its events, its Cancel) by kind."""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from slimgpt_core.base.errors import JobCancelled, SlimGPTError


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
        except JobCancelled:
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

    def cancel_all(self) -> list[Job]:
        """Ask every unfinished job to stop (returns at once); return them."""
        with self._lock:
            unfinished = [j for j in self._jobs if j.running]
        for j in unfinished:
            j.cancel()
        return unfinished

    def shutdown(self, timeout: float) -> list[Job]:
        """Cancel every unfinished job and wait up to `timeout` seconds in all for their threads to end; return
        the jobs still running then."""
        unfinished = self.cancel_all()
        deadline = time.monotonic() + timeout
        for j in unfinished:
            j.wait(max(0.0, deadline - time.monotonic()))
        return [j for j in unfinished if j._thread is not None and j._thread.is_alive()]

    def forget_finished(self) -> None:
        """Drop finished jobs (their results are on disk or recomputable): a fresh start for tests."""
        with self._lock:
            self._jobs = [j for j in self._jobs if j.running]


BOARD = JobBoard()

EXIT_GRACE_S = 5.0
"""How long the process waits at exit for its cancelled jobs: a job notices cancellation between the steps of its
work, and a step of a big model on a few cores can take longer; the studio must still stop within seconds."""
STOP_DEADLINE_S = 6.0
"""A stop signal ends the process within this many seconds, even where the server's own shutdown waits longer."""
_stop_started = threading.Event()


def _end_process(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _at_exit() -> None:
    """A job thread still inside a torch operation while Python finalizes aborts the process ("terminate called
    without an active exception") or hangs it, and leaves its work half done. So at exit every running job is
    cancelled and given a few seconds to end cleanly; one that does not is left behind by ending the process at
    once. A server stopped by a signal also skips the interpreter's teardown: nothing is left to save, and its
    final garbage collection over torch's and the pages' objects takes seconds."""
    running = BOARD.running()
    if running:
        print(f"Stopping: cancelling the running jobs: {', '.join(j.name for j in running)}", file=sys.stderr,
              flush=True)
        left = BOARD.shutdown(EXIT_GRACE_S)
        if left:
            print(f"Stopping: {', '.join(j.name for j in left)} did not stop within {EXIT_GRACE_S:.0f} s; exiting "
                  "without it (nothing of it is saved).", file=sys.stderr, flush=True)
            _end_process(1)
        print("Stopping: every job was cancelled cleanly.", file=sys.stderr, flush=True)
    if _stop_started.is_set():
        _end_process(0)


atexit.register(_at_exit)


def _stop_watchdog(signalled: float, cancelled: list[Job]) -> None:
    left = BOARD.shutdown(EXIT_GRACE_S)
    if left:
        print(f"Stopping: {', '.join(j.name for j in left)} did not stop within {EXIT_GRACE_S:.0f} s (nothing of it "
              "is saved).", file=sys.stderr, flush=True)
    elif cancelled:
        print("Stopping: every job was cancelled cleanly.", file=sys.stderr, flush=True)
    time.sleep(max(0.0, signalled + STOP_DEADLINE_S - time.monotonic()))
    print(f"Stopping: the server had not finished stopping {STOP_DEADLINE_S:.0f} s after the signal; ending the "
          "process.", file=sys.stderr, flush=True)
    _end_process(1 if left else 0)


def _begin_stop() -> None:
    """Cancel every job now and make sure the process ends by STOP_DEADLINE_S (once, on the first stop signal)."""
    if _stop_started.is_set():
        return
    _stop_started.set()
    cancelled = BOARD.cancel_all()
    if cancelled:
        print(f"Stopping: cancelling the running jobs: {', '.join(j.name for j in cancelled)}", file=sys.stderr,
              flush=True)
    threading.Thread(target=_stop_watchdog, args=(time.monotonic(), cancelled), name="slimgpt-stop-watchdog",
                     daemon=True).start()


def stop_promptly_on_signals(signals=(signal.SIGTERM, signal.SIGINT)) -> None:
    """Put a handler in front of the current handlers of `signals` (call from the main thread; once is enough): the
    first signal cancels every job at once and ends the process at most STOP_DEADLINE_S later, then the previous
    handler runs (a server's graceful shutdown). Streamlit's shutdown can wait without end for a connection of an
    open tab."""
    for signum in signals:
        previous = signal.getsignal(signum)
        if not callable(previous) or getattr(previous, "stops_promptly", False):
            continue  # an ignored signal stays ignored; ours is in place already

        def handler(number, frame, previous=previous):
            _begin_stop()
            previous(number, frame)

        handler.stops_promptly = True
        signal.signal(signum, handler)
