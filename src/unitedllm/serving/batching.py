"""The queue between request handlers and the model's worker thread: jobs grouped into batches.

Handlers :meth:`~BatchQueue.submit` jobs from the event loop; the worker takes the oldest job's
adapter and every queued job for that adapter (up to ``max_batch``) as one batch, so adapters
switch per batch. While a batch decodes, jobs for its adapter that reach the head of the queue join
it at a token boundary (:meth:`~BatchQueue.joining`); a job for another adapter at the head stops
that, so it never waits behind more than one batch of another adapter before its own turn comes.
A full queue refuses new jobs (:class:`Overloaded`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from unitedllm.serving.engine import Chunk, SamplingParams
from unitedllm.serving.errors import GenerationTimeout, Overloaded

__all__ = ["BatchQueue", "Job"]


@dataclass
class Job:
    """One choice to generate: prompt token ids, sampling settings and where its chunks go."""

    adapter: str | None
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Chunk | BaseException], None]
    deadline: float
    model: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    state: Any = None

    @property
    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def fail_if_expired(self, timeout_s: float) -> bool:
        """Send a timeout error and return True when the job is past its deadline."""
        if not self.expired:
            return False
        self.emit(GenerationTimeout(f"the request ran longer than the server's limit of {timeout_s:g} s"))
        return True


class BatchQueue:
    """Jobs waiting for the model, handed out in same-adapter batches."""

    def __init__(self, *, max_batch: int, max_queue: int, timeout_s: float):
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._jobs: deque[Job] = deque()
        self._ready = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._ready:
            return len(self._jobs)

    def submit(self, job: Job) -> None:
        with self._ready:
            if self._closed:
                raise Overloaded("the server is shutting down")
            if len(self._jobs) >= self.max_queue:
                raise Overloaded(
                    f"{len(self._jobs)} requests are already waiting (the server's queue limit); retry later"
                )
            self._jobs.append(job)
            self._ready.notify()

    def submit_many(self, jobs: list[Job]) -> None:
        """Queue all of ``jobs`` or none of them (the choices of one request)."""
        with self._ready:
            if self._closed:
                raise Overloaded("the server is shutting down")
            if len(self._jobs) + len(jobs) > self.max_queue:
                raise Overloaded(
                    f"{len(self._jobs)} requests are already waiting (the server's queue limit); retry later"
                )
            self._jobs.extend(jobs)
            self._ready.notify()

    def next_batch(self) -> list[Job] | None:
        """Block until there is work; ``None`` once closed."""
        with self._ready:
            while True:
                self._drop_dead()
                if self._jobs:
                    break
                if self._closed:
                    return None
                self._ready.wait()
            adapter = self._jobs[0].adapter
            batch = [job for job in self._jobs if job.adapter == adapter][: self.max_batch]
            taken = {id(job) for job in batch}
            self._jobs = deque(job for job in self._jobs if id(job) not in taken)
            return batch

    def joining(self, adapter: str | None, limit: int) -> list[Job]:
        """Without waiting: up to ``limit`` jobs for ``adapter`` from the head of the queue (FIFO order kept)."""
        with self._ready:
            self._drop_dead()
            taken: list[Job] = []
            while self._jobs and len(taken) < limit and self._jobs[0].adapter == adapter:
                taken.append(self._jobs.popleft())
            return taken

    def _drop_dead(self) -> None:
        alive: deque[Job] = deque()
        for job in self._jobs:
            if job.cancelled.is_set() or job.fail_if_expired(self.timeout_s):
                continue
            alive.append(job)
        self._jobs = alive

    def close(self) -> None:
        """Wake the worker to stop; queued jobs get an error."""
        with self._ready:
            self._closed = True
            for job in self._jobs:
                job.emit(Overloaded("the server is shutting down"))
            self._jobs.clear()
            self._ready.notify_all()
