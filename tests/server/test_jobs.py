"""The solver thread: a deadline and cancellation stop a running solve, a failing job leaves the thread
running, and a full queue refuses at once."""

import os
import threading
import time

import pytest
import torch

from sglang_am.core import compact
from sglang_am.core.cancel import CompactionCancelled
from sglang_am.core.synthetic import clustered_block
from sglang_am.server.scheduler.jobs import QueueFull, Worker


def slow_solve():
    block = clustered_block(heads=2, length=512, head_dim=16, num_queries=512, seed=0)
    return compact(block.keys, block.values, block.queries, 8, "AM-HighestAttnKeys", nnls_iters=10**9)


def test_a_solve_past_its_deadline_stops_and_the_worker_takes_the_next_job():
    worker = Worker("solver", max_queued=2)
    started = time.monotonic()
    job = worker.submit(slow_solve, "the solve", timeout=0.5)
    assert job.wait(30) and time.monotonic() - started < 10
    with pytest.raises(CompactionCancelled, match="the solve exceeded the server's 0.5 s limit"):
        job.result()
    assert worker.submit(lambda: 7, "a quick job").wait(10)


def test_a_niced_worker_runs_its_jobs_below_the_schedulers_priority():
    base = os.getpriority(os.PRIO_PROCESS, 0)
    job = Worker("solver", max_queued=1, nice=10).submit(
        lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), "its priority")
    assert job.wait(10) and job.result() == min(base + 10, 19)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the calling thread keeps its own


def test_a_workers_math_runs_on_its_thread_alone_and_other_threads_keep_the_default():
    torch.set_num_threads(2)
    job = Worker("solver", max_queued=1).submit(torch.get_num_threads, "its thread count")
    assert job.wait(10) and job.result() == 1
    counts = []
    thread = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))  # starts torch after the worker
    thread.start()
    thread.join()
    assert torch.get_num_threads() == 2 and counts == [2]


def test_cancel_stops_a_running_solve_and_a_dying_job_does_not_kill_the_worker():
    worker = Worker("solver", max_queued=1)
    job = worker.submit(slow_solve, "the solve")
    time.sleep(0.3)
    job.cancel("dropped")
    assert job.wait(10)
    with pytest.raises(CompactionCancelled, match="dropped"):
        job.result()

    def exits():
        raise SystemExit("the thread is told to die")

    exited = worker.submit(exits, "exit")
    assert exited.wait(10)
    with pytest.raises(RuntimeError, match="exit was stopped: SystemExit"):
        exited.result()  # the job failed alone: the thread goes on
    assert worker.submit(lambda: threading.current_thread().name, "next").result() == "sglang-am-solver"


def test_a_full_queue_refuses_at_once():
    worker = Worker("solver", max_queued=1)
    gate = threading.Event()
    worker.submit(gate.wait, "blocker")
    time.sleep(0.2)  # the blocker runs; the queue is empty again
    worker.submit(lambda: None, "queued")
    with pytest.raises(QueueFull):
        worker.submit(lambda: None, "one too many")
    gate.set()


def test_cancelling_a_queued_job_ends_it_at_once():
    worker = Worker("solver", max_queued=2)
    gate = threading.Event()
    worker.submit(gate.wait, "blocker")
    queued = worker.submit(lambda: pytest.fail("a cancelled job never runs"), "queued")
    queued.cancel("dropped")
    assert queued.wait(0.1) and queued.done()
    gate.set()
