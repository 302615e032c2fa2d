"""Work the scheduler hands off its own thread: solves and store I/O, one daemon thread per kind.

A ``Worker`` runs its jobs one at a time, first in first out, from a queue with a limit (a full queue
refuses at once instead of making callers wait). Each ``Job`` can be cancelled and has a deadline that
starts when it starts running; both reach the solver's loops through the core's ``cancellation``, so a
stuck solve ends within one loop step. Worker threads are daemons: a server that stops does not wait
for them. A job that raises anything, even ``SystemExit``, fails alone; the thread takes the next job.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable

from ...core.cancel import cancellation


class QueueFull(Exception):
    pass


class Job:
    def __init__(self, work: Callable[[], object], timeout: float | None, what: str):
        self.work, self.timeout, self.what = work, timeout, what
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._cancelled: str | None = None
        self._deadline: float | None = None

    def cancel(self, reason: str) -> None:
        """A job still queued is done at once; a running one stops at its next loop step."""
        self._cancelled = reason
        self.future.cancel()

    def stop_reason(self) -> str | None:
        """Why the job should stop now, or None (the solver's loops ask this)."""
        if self._cancelled is not None:
            return self._cancelled
        if self._deadline is not None and time.monotonic() > self._deadline:
            return f"{self.what} exceeded the server's {self.timeout:g} s limit"
        return None

    def done(self) -> bool:
        return self.future.done()

    def result(self):
        """The work's return value; raises what it raised (an ``Exception``: see ``run``)."""
        return self.future.result()

    def wait(self, seconds: float) -> bool:
        """Is the job done (finished, failed or cancelled) within ``seconds``?"""
        if self.future.done():  # a cancelled job counts as done before the worker dequeues it
            return True
        done, _ = concurrent.futures.wait([self.future], timeout=seconds)
        return bool(done)

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        if self.timeout is not None:
            self._deadline = time.monotonic() + self.timeout
        try:
            reason = self.stop_reason()
            if reason is not None:
                raise RuntimeError(reason)
            with cancellation(self.stop_reason):
                self.future.set_result(self.work())
        except Exception as error:
            self.future.set_exception(error)
        except BaseException as error:  # SystemExit and the like end this job, not the worker thread
            self.future.set_exception(RuntimeError(f"{self.what} was stopped: {error!r}"))


class Worker:
    """``nice``: added to the thread's Linux niceness (capped at 19): a background worker above 0 yields the
    cores to the scheduler's forwards.

    A worker's torch math runs on its own thread alone. An OpenMP team of its own would leave more OpenMP
    threads than cores in the process, and libgomp then throttles every team's spin-wait: the scheduler's
    threads sleep between the many small parallel regions of each forward and wait for wake-ups. Measured
    on a 2-core CPU: after a few solves, SGLang served shared prefixes at 0.84x for the rest of the run
    while the solver thread sat idle; a micro-test of small matmuls ran at a quarter of its speed.
    ``torch.set_num_threads`` sets the calling thread's count and the default of threads that start torch
    later, so the worker takes 1 for itself and the thread that started it puts the default back.
    """

    def __init__(self, name: str, max_queued: int, device=None, nice: int = 0):
        self.name, self.device, self.nice = name, device, nice
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queued)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, work: Callable[[], object], what: str, timeout: float | None = None) -> Job:
        job = Job(work, timeout, what)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.name} has {self._queue.maxsize} jobs waiting") from None
        self._ensure_thread()
        return job

    def _ensure_thread(self) -> None:
        import torch

        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                default = torch.get_num_threads()  # this thread's own count, fixed now if it was not yet
                alone = threading.Event()
                self._thread = threading.Thread(target=self._loop, args=(alone,), name=f"sglang-am-{self.name}",
                                                daemon=True)
                self._thread.start()
                alone.wait()
                torch.set_num_threads(default)

    def _loop(self, alone: threading.Event) -> None:
        import torch

        torch.set_num_threads(1)  # see the class's docstring
        torch.get_num_threads()  # fixes this thread's count before the default is put back
        alone.set()
        if self.nice:
            with contextlib.suppress(OSError, AttributeError):  # AttributeError: no per-thread priority here
                thread = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, thread, min(os.getpriority(os.PRIO_PROCESS, thread) + self.nice, 19))
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a new thread starts on cuda:0; the rank may use another GPU
        while True:
            self._queue.get().run()
