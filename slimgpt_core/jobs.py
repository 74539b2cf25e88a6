"""Background jobs for interactive front ends: a thread, its events, cancellation. No UI code here.

The function a job runs receives `callback(event)` and `should_stop()`; the UI polls `Job.events`,
`Job.state` and `Job.result` from its own thread."""
from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import PruningCancelled, SlimGPTError


@dataclass
class Job:
    name: str
    state: str = "running"  # running | done | cancelled | failed
    events: list = field(default_factory=list)
    result: Any = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started

    def wait(self, timeout: float | None = None) -> "Job":
        if self._thread is not None:
            self._thread.join(timeout)
        return self


def start_job(name: str, fn: Callable[..., Any], *args, **kwargs) -> Job:
    """Run fn(*args, callback=..., should_stop=..., **kwargs) in a daemon thread."""
    job = Job(name)

    def target():
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

    job._thread = threading.Thread(target=target, name=f"slimgpt-{name}", daemon=True)
    job._thread.start()
    return job
