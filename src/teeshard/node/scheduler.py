"""Continuous batching for one node: the ready steps of many sessions run as one forward.

Decode reads every weight of the shard for a single row, so eight sessions
decoding together cost about what one does. Sessions submit their steps here
(one at a time each: the service refuses a second with 409) and wait; a single
loop takes whatever is ready, up to a budget of rows, runs it as one batched
forward on the node's compute thread, and hands each session its result. While
a batch runs, new steps queue, so sessions join and leave between batches.

What goes into a batch, in order:

1. every waiting one-row step (decode), oldest first;
2. then prefills, oldest first, each contributing at most ``prefill_chunk`` rows
   until the batch holds ``max_batch_rows``. A long prompt thus runs over several
   batches, and sessions that are decoding keep getting a token per batch
   instead of stalling behind it. Only its last chunk is sampled (last node) or
   forwarded (other nodes: the chunks' hidden states are joined first).

A node with one session decoding has nothing to batch and nothing to overlap: its
one-row step then runs on the event loop's thread itself, saving the two thread
hand-offs (to the compute thread and back), measured at 0.2-0.3 ms each on a
2-core VM; when the scheduler is idle, in the caller's own coroutine, saving the
two turns of the event loop to the scheduler's task and back as well (about
0.1-0.2 ms each here, after the node sat idle waiting for the next hop). Only
while such steps are short (``inline_step_s``, measured on the
last one), so a large model's step never holds the loop (health, metrics, new
requests) for long; anything else, or a second active session, goes to the
compute thread as before.

Every step was checked on its own before it was submitted (shape, finite values,
room in its cache), so a batch cannot fail because of one session's input. A
failure of the node itself fails the steps in that batch, and each of their
caches is put back to where its step began. A step whose caller gives up
(cancelled: the client went away) leaves the queue; if it was mid-way through a
chunked prefill, its cache is put back too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from teeshard.model.transformer import Shard
from teeshard.node.compute import BatchItem, StepOutput, run_batch

if TYPE_CHECKING:
    from teeshard.node.service import Session, StageCounters

__all__ = ["SchedulerLimits", "StepScheduler"]


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch_rows: int = 512  # token positions per batched forward
    max_batch_sessions: int = 64  # steps per batched forward
    prefill_chunk: int = 256  # a longer prefill runs in chunks of this many positions
    # before a batch short of the active sessions' steps, wait for them at most this long,
    # or this share of the last decode batch's time where that is longer: the previous
    # node sends a batch's steps one frame each, a fraction of a millisecond apart, and a
    # step that misses the batch costs a whole batch of its own later
    gather_s: float = 0.002
    gather_share: float = 0.25
    # a session counts as active (worth waiting for; keeps a lone step off the loop's
    # thread) while a step of it runs or ended at most this long ago, or four decode
    # batches' time where that is longer: one whose client stopped reading holds the
    # others' batches back only that long
    recent_s: float = 0.25
    # split the active sessions into this many batches, so that with a route of that many
    # nodes each node computes one group while the next node computes another (pipelining)
    groups: int = 1
    # a lone one-row step (one session decoding) runs on the event loop's thread while
    # the last one took at most this long; 0: every step on the compute thread
    inline_step_s: float = 0.05

    def __post_init__(self) -> None:
        if min(self.max_batch_rows, self.max_batch_sessions, self.prefill_chunk, self.groups) < 1:
            raise ValueError("scheduler limits must be at least 1")
        if min(self.gather_s, self.gather_share, self.inline_step_s, self.recent_s) < 0:
            raise ValueError(
                "gather_s, gather_share, inline_step_s and recent_s must not be negative"
            )


@dataclass(eq=False)
class _Job:
    session: Session
    rows: torch.Tensor  # (1, T) token ids on the first node, else (1, T, C) hidden states
    is_tokens: bool
    length_before: int  # the session's cache length when the step began
    future: asyncio.Future[StepOutput]
    done: int = 0  # rows computed so far
    parts: list[torch.Tensor] = field(default_factory=list)  # hidden outputs of done chunks
    running: bool = False  # in the batch being computed now
    cancelled: bool = False
    allowed: torch.Tensor | None = None  # the grammar's mask for the token sampled at the end

    @property
    def total(self) -> int:
        return int(self.rows.shape[1])

    @property
    def remaining(self) -> int:
        return self.total - self.done

    def item(self, count: int) -> BatchItem:
        chunk = self.rows[:, self.done : self.done + count]
        last = self.done + count == self.total
        allowed = self.allowed if last else None
        if self.is_tokens:
            return BatchItem(self.session, tokens=chunk, last=last, allowed=allowed)
        return BatchItem(self.session, hidden=chunk, last=last, allowed=allowed)


class StepScheduler:
    """Collects the ready steps of a node's sessions into batched forwards."""

    def __init__(
        self,
        shard: Shard,
        run_in_thread: Callable[[Callable[[], list[StepOutput]]], asyncio.Future[list[StepOutput]]],
        counters: StageCounters,
        limits: SchedulerLimits | None = None,
        active: Callable[[float], int] = lambda recent_s: 0,
    ) -> None:
        self.shard = shard
        self.limits = limits or SchedulerLimits()
        self.counters = counters
        # sessions likely to submit a step soon (open, and stepping within the given
        # seconds): worth a short wait
        self._sessions_stepping = active
        self._run_in_thread = run_in_thread
        self._waiting: list[_Job] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._lone_step_s = float("inf")  # how long the last lone one-row step took
        self._decode_batch_s = 0.0  # how long the last batch of one-row steps took

    @classmethod
    def on_executor(
        cls,
        shard: Shard,
        executor: Executor,
        counters: StageCounters,
        limits: SchedulerLimits | None = None,
        active: Callable[[float], int] = lambda recent_s: 0,
    ) -> StepScheduler:
        def run_in_thread(fn: Callable[[], list[StepOutput]]) -> asyncio.Future[list[StepOutput]]:
            return asyncio.get_running_loop().run_in_executor(executor, fn)

        return cls(shard, run_in_thread, counters, limits, active)

    @property
    def waiting(self) -> int:
        """Steps submitted and not yet finished (queued or mid-prefill)."""
        return len(self._waiting)

    async def run(
        self,
        session: Session,
        *,
        tokens: torch.Tensor | None,
        hidden: torch.Tensor | None,
        allowed: torch.Tensor | None = None,
    ) -> StepOutput:
        """Queue one validated step of ``session`` and wait for its result; ``allowed``:
        the grammar's mask for the token the last node samples at its end."""
        rows = tokens if tokens is not None else hidden
        assert rows is not None
        if not self._waiting and rows.shape[1] == 1 and self._inline_now():
            # idle, and a lone decode step: run it here, without any hand-off
            return self._run_alone(BatchItem(session, tokens, hidden, allowed=allowed))
        job = _Job(
            session,
            rows,
            tokens is not None,
            session.cache.length,
            asyncio.get_running_loop().create_future(),
            allowed=allowed,
        )
        self._waiting.append(job)
        self._ensure_loop()
        self._wake.set()
        try:
            return await job.future  # cancelling the caller cancels the future too
        except asyncio.CancelledError:
            job.cancelled = True
            if not job.running and job in self._waiting:  # not being computed: leave now
                self._waiting.remove(job)
                job.session.cache.length = job.length_before
            raise

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._loop(), name="step-scheduler")

    async def _loop(self) -> None:
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            await self._gather()
            batch = self._take()
            for job, _ in batch:
                job.running = True
            items = [item for _, item in batch]
            lone = len(items) == 1 and items[0].rows == 1
            started = time.perf_counter()
            try:
                if lone and self._inline_now():
                    outputs = self._run_inline(items)
                else:
                    outputs = await self._run_in_thread(
                        functools.partial(run_batch, self.shard, items)
                    )
            except BaseException as exc:  # the node failed: every step in the batch fails
                for job, _ in batch:
                    self._fail(job, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            finally:
                self._timed(started, lone and self._active() <= 1, items)
            self._count(items)
            for (job, item), output in zip(batch, outputs, strict=True):
                self._advance(job, item, output)
            # Let the sessions just answered submit their next step (the entry's loop
            # does so at once) before the next batch is taken: otherwise a session
            # decoding beside a chunked prefill would get a token every other batch.
            await asyncio.sleep(0)

    def _active(self) -> int:
        """Sessions stepping now or lately (``recent_s``, or four decode batches)."""
        return self._sessions_stepping(max(self.limits.recent_s, 4 * self._decode_batch_s))

    def _inline_now(self) -> bool:
        """Whether a lone one-row step may run on the loop's thread: no other session is
        active, and the last such step was short (``inline_step_s``; 0: never)."""
        bound = self.limits.inline_step_s
        return bound > 0 and self._lone_step_s <= bound and self._active() <= 1

    def _run_alone(self, item: BatchItem) -> StepOutput:
        """Run a lone decode step in its caller, on an idle scheduler: the same batch of
        one that the loop would run on its thread, without the two hand-offs to the
        loop's task and back (each a turn of the event loop)."""
        items = [item]
        length_before = item.session.cache.length
        started = time.perf_counter()
        try:
            output = self._run_inline(items)[0]
        except BaseException:  # the node failed: the step fails, its cache as before
            item.session.cache.length = length_before
            raise
        finally:
            self._timed(started, True, items)
        self._count(items)
        return output

    def _run_inline(self, items: list[BatchItem]) -> list[StepOutput]:
        self.counters.inline_batches += 1
        return run_batch(self.shard, items)

    def _timed(self, started: float, lone: bool, items: list[BatchItem]) -> None:
        elapsed = time.perf_counter() - started
        self.counters.step_seconds += elapsed
        if lone:
            self._lone_step_s = elapsed
        if all(item.rows == 1 for item in items):
            self._decode_batch_s = elapsed

    def _count(self, items: list[BatchItem]) -> None:
        self.counters.batches += 1
        self.counters.batched_rows += sum(item.rows for item in items)

    async def _gather(self) -> None:
        """Before a batch that would hold fewer steps than there are active sessions
        (up to a group's share): give the others' steps, which usually arrive together
        (the previous node's batch, sent frame by frame), a moment to join, rather than
        run without them and leave them a batch of their own. Also after a batch: a
        session answered sooner than its batch-mates must not stay a batch apart."""
        wait = max(self.limits.gather_s, self.limits.gather_share * self._decode_batch_s)
        deadline = time.monotonic() + wait
        while len(self._waiting) < min(self._active(), self._session_cap()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.counters.gather_timeouts += 1
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=remaining)

    def _take(self) -> list[tuple[_Job, BatchItem]]:
        """The next batch: one-row steps first, then chunks of prefills, oldest first."""
        limits = self.limits
        room = limits.max_batch_rows
        cap = self._session_cap()
        batch: list[tuple[_Job, BatchItem]] = []
        decodes = [j for j in self._waiting if j.remaining == 1]
        prefills = [j for j in self._waiting if j.remaining > 1]
        for job in (*decodes, *prefills):
            if room == 0 or len(batch) == cap:
                break
            count = min(job.remaining, limits.prefill_chunk, room)
            batch.append((job, job.item(count)))
            room -= count
        return batch

    def _session_cap(self) -> int:
        groups = self.limits.groups
        if groups == 1:
            return self.limits.max_batch_sessions
        share = -(-max(self._active(), 1) // groups)  # ceil(active / groups)
        return min(self.limits.max_batch_sessions, share)

    def _advance(self, job: _Job, item: BatchItem, output: StepOutput) -> None:
        job.running = False
        job.done += item.rows
        if output.hidden is not None:
            job.parts.append(output.hidden)
        if job.cancelled:  # nobody waits for it: undo what it computed
            self._waiting.remove(job)
            job.session.cache.length = job.length_before
            return
        if job.remaining:  # more chunks of this prefill to come
            return
        self._waiting.remove(job)
        if output.hidden is not None and len(job.parts) > 1:
            output = StepOutput(hidden=torch.cat(job.parts, dim=1))
        job.future.set_result(output)

    def _fail(self, job: _Job, exc: BaseException) -> None:
        job.running = False
        if job in self._waiting:
            self._waiting.remove(job)
        job.session.cache.length = job.length_before
        if not job.future.done():
            if isinstance(exc, asyncio.CancelledError):
                job.future.cancel()
            else:
                job.future.set_exception(exc)

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
