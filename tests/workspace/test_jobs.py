"""The job board, one behaviour at a time (mutation tests of slimgpt_core/workspace/jobs.py).

No sleeps decide anything: the jobs' functions block on threading.Event gates the test opens, the clock is a
value the test sets, and a heavy job's turn can be a recording semaphore whose answers the test chooses."""
import threading
import time

import pytest

from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.workspace import jobs
from slimgpt_core.workspace.jobs import BOARD, Job, JobBoard, start_job

WAIT = 10  # seconds a test gives a thread that should finish at once (only reached when a mutant hangs it)


@pytest.fixture
def clock(monkeypatch):
    """time.time() as the test sets it."""
    now = [1000.0]
    monkeypatch.setattr(jobs.time, "time", lambda: now[0])
    return now


def _gate():
    """A job function that waits until the test opens its gate, then returns its tag."""
    entered, gate = threading.Event(), threading.Event()

    def work(tag, callback=None, should_stop=None):
        entered.set()
        assert gate.wait(WAIT)
        return tag
    return work, entered, gate


class RecordingTurn:
    """A heavy job's turn whose acquire answers come from the test: refuses until `open` is set."""

    def __init__(self):
        self.timeouts, self.releases = [], 0
        self.asked, self.open = threading.Event(), threading.Event()

    def acquire(self, timeout=None):
        self.timeouts.append(timeout)
        self.asked.set()
        return self.open.wait(0.001)  # a short pause, as a real refusal would take (no busy loop)

    def release(self):
        self.releases += 1


def test_a_new_job_has_nothing_yet():
    before = time.time()
    job = Job("prune")
    assert (job.name, job.state, job.events, job.result, job.error) == ("prune", "running", [], None, None)
    assert (job.finished, job.label, job.id, job._thread) == (None, "", 0, None)
    assert before <= job.started <= time.time()
    assert not job._cancel.is_set() and Job("x").events is not job.events
    job.cancel()
    assert job._cancel.is_set()


@pytest.mark.parametrize("state, running, queued", [("queued", True, True), ("running", True, False),
                                                    ("done", False, False), ("cancelled", False, False),
                                                    ("failed", False, False)])
def test_running_means_queued_or_running(state, running, queued):
    job = Job("j", state=state)
    assert job.running is running and job.queued is queued


def test_elapsed_counts_to_now_until_finished(clock):
    job = Job("j", started=1000.0)
    clock[0] = 1002.5
    assert job.elapsed == 2.5
    job.finished = 1004.0
    clock[0] = 2000.0
    assert job.elapsed == 4.0


def test_wait_joins_the_thread_for_at_most_the_timeout():
    job = Job("j")
    assert job.wait() is job and job.wait(0.01) is job  # no thread: nothing to join
    work, entered, gate = _gate()
    job = start_job("slow", work, "a")
    assert entered.wait(WAIT)
    assert job.wait(0.05) is job and job.state == "running" and job._thread.is_alive()  # gave up after the timeout
    gate.set()
    assert job.wait() is job and job.state == "done" and not job._thread.is_alive()  # no timeout: until it ends


def test_start_job_runs_the_function_with_its_arguments_events_and_stop(clock):
    seen = {}
    release = threading.Event()

    def fn(a, b, callback=None, should_stop=None, scale=1):
        seen["thread"] = threading.current_thread()
        callback(("progress", 1))
        callback(("progress", 2))
        seen["before"] = should_stop()
        release.wait(WAIT)
        seen["after"] = should_stop()
        clock[0] = 1007.0
        return (a + b) * scale

    job = start_job("sum", fn, 2, 3, scale=10)
    assert job.name == "sum" and job.id == 0 and job.label == ""
    job.cancel()
    release.set()
    assert job.wait(WAIT).state == "done" and job.result == 50 and job.error is None
    assert job.events == [("progress", 1), ("progress", 2)]
    assert seen["before"] is False and seen["after"] is True
    assert seen["thread"] is job._thread and seen["thread"].name == "slimgpt-sum" and seen["thread"].daemon
    assert job.finished == 1007.0


def test_failures_become_one_line_and_cancellation_is_not_a_failure(capsys):
    def fails(exc, callback=None, should_stop=None):
        raise exc

    cancelled = start_job("c", fails, JobCancelled("stopped")).wait(WAIT)
    assert cancelled.state == "cancelled" and cancelled.error is None and cancelled.finished is not None
    ours = start_job("s", fails, SlimGPTError("the ratio must be below 1")).wait(WAIT)
    assert ours.state == "failed" and ours.error == "the ratio must be below 1" and ours.finished is not None
    assert "Traceback" not in capsys.readouterr().err  # our own errors are sentences, not crashes
    crash = start_job("x", fails, KeyError("layers")).wait(WAIT)
    assert crash.state == "failed" and crash.error == "KeyError: 'layers'" and crash.finished is not None
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'layers'" in err  # the details go to the log


def test_a_queued_job_polls_its_turn_and_starts_when_given_it(clock):
    turn = RecordingTurn()
    seen = {}

    def fn(callback=None, should_stop=None):
        seen["state"], seen["started"] = job.state, job.started
        clock[0] = 1500.0
        return "ran"

    job = jobs._launch(Job("heavy", state="queued", started=1000.0), turn, fn, (), {})
    assert turn.asked.wait(WAIT)
    assert job.state == "queued" and job.started == 1000.0 and job.finished is None
    clock[0] = 1200.0
    turn.open.set()
    assert job.wait(WAIT).state == "done" and job.result == "ran"
    assert seen == {"state": "running", "started": 1200.0}  # its time counts from its turn, not its queueing
    assert job.finished == 1500.0 and turn.releases == 1
    assert set(turn.timeouts) == {0.1}  # polls ten times a second, so a Cancel is seen within 0.1 s


def test_a_job_cancelled_while_queued_never_runs_and_frees_no_turn(clock):
    turn = RecordingTurn()
    calls = []
    job = jobs._launch(Job("heavy", state="queued"), turn, lambda **kw: calls.append(kw), (), {})
    assert turn.asked.wait(WAIT)
    clock[0] = 1003.0
    job.cancel()
    assert job.wait(WAIT).state == "cancelled" and job.finished == 1003.0
    assert calls == [] and turn.releases == 0 and job.error is None


def test_a_heavy_job_gives_its_turn_back_however_it_ends():
    turn = threading.Semaphore(1)

    def fails(callback=None, should_stop=None):
        raise RuntimeError("boom")

    for fn in (lambda **kw: "ok", fails, lambda **kw: (_ for _ in ()).throw(JobCancelled())):
        job = jobs._launch(Job("heavy", state="queued"), turn, fn, (), {}).wait(WAIT)
        assert not job.running and turn.acquire(blocking=False)  # the turn is free again
        turn.release()


def test_heavy_jobs_take_turns_light_ones_do_not(clock):
    board = JobBoard()
    work, entered, gate = _gate()
    first = board.submit("prune", work, "a", job_label="tab 1")
    assert entered.wait(WAIT)
    second = board.submit("prune", lambda callback=None, should_stop=None: "b")  # heavy by default
    assert first.state == "running" and second.state == "queued" and second.queued
    light = board.submit("export", lambda callback=None, should_stop=None: "z", heavy=False, job_label="zip")
    assert light.wait(WAIT).state == "done" and second.state == "queued"
    assert (first.label, second.label, light.label) == ("tab 1", "", "zip")
    assert [first.id, second.id, light.id] == [1, 2, 3]
    gate.set()
    assert second.wait(WAIT).result == "b" and first.result == "a"


def test_a_light_job_is_running_from_the_start():
    board = JobBoard()
    inside = threading.Event()
    gate = threading.Event()
    seen = []

    def fn(callback=None, should_stop=None):
        inside.set()
        assert gate.wait(WAIT)

    job = board.submit("export", fn, heavy=False)
    assert inside.wait(WAIT)
    seen.append(job.state)
    gate.set()
    assert job.wait(WAIT).state == "done" and seen == ["running"]


def test_heavy_slots_is_how_many_run_at_once():
    board = JobBoard(heavy_slots=2)
    a, a_in, a_gate = _gate()
    b, b_in, b_gate = _gate()
    c, c_in, c_gate = _gate()
    ja, jb = board.submit("p", a, "a"), board.submit("p", b, "b")
    assert a_in.wait(WAIT) and b_in.wait(WAIT)  # two at once
    jc = board.submit("p", c, "c")
    assert jc.queued
    a_gate.set()
    assert c_in.wait(WAIT)
    for g in (b_gate, c_gate):
        g.set()
    assert [j.wait(WAIT).result for j in (ja, jb, jc)] == ["a", "b", "c"]


def test_latest_running_and_forget_finished():
    board = JobBoard()
    assert board.latest("prune") is None and board.running() == []
    work, entered, gate = _gate()
    done1 = board.submit("prune", lambda callback=None, should_stop=None: 1).wait(WAIT)
    done2 = board.submit("prune", lambda callback=None, should_stop=None: 2).wait(WAIT)
    live = board.submit("eval", work, "e")
    assert entered.wait(WAIT)
    assert board.latest("prune") is done2 and board.latest("eval") is live and board.latest("export") is None
    assert board.running() == [live]
    board.forget_finished()
    assert board.latest("prune") is None and board.latest("eval") is live and board.running() == [live]
    gate.set()
    assert live.wait(WAIT).state == "done" and board.running() == [] and board.latest("eval") is live
    assert done1.result == 1


def _finished(board, kind):
    return board.submit(kind, lambda callback=None, should_stop=None: kind, heavy=False).wait(WAIT)


def test_the_board_keeps_the_last_finished_jobs_and_every_running_one():
    board = JobBoard(keep=3)
    work, entered, gate = _gate()
    live = board.submit("live", work, "l")
    assert entered.wait(WAIT)
    for i in range(6):
        _finished(board, f"k{i}")
    # each submit first trims the finished ones to the newest 3, then adds itself: k2..k4 and k5 remain
    assert [k for k in [f"k{i}" for i in range(6)] if board.latest(k)] == ["k2", "k3", "k4", "k5"]
    assert board.latest("live") is live  # the oldest, still running: never dropped
    gate.set()
    live.wait(WAIT)


def test_the_board_keeps_fifty_finished_jobs_by_default():
    board = JobBoard()
    for i in range(52):
        _finished(board, f"k{i}")
    # the 52nd submit kept k1..k50 (the newest 50 of k0..k50) and added k51
    assert board.latest("k0") is None and all(board.latest(f"k{i}") for i in range(1, 52))
    assert isinstance(BOARD, JobBoard) and BOARD is jobs.BOARD


def test_trimming_keeps_the_order_so_latest_is_the_newest_of_its_kind():
    board = JobBoard(keep=5)
    done = _finished(board, "prune")
    work, entered, gate = _gate()
    live = board.submit("prune", work, "again", heavy=False)  # newer, still running
    assert entered.wait(WAIT)
    _finished(board, "export")  # any later submit trims the board
    assert board.latest("prune") is live and done.result == "prune"  # not the older finished one
    gate.set()
    assert live.wait(WAIT).result == "again" and board.latest("prune") is live
