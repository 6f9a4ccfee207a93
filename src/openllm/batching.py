"""Cross-request batching for the server: a bounded wait queue and one decode loop per model.

Each served model has a :class:`Scheduler`: a thread that runs an
:class:`openllm.decode.DecodeBatch` and lets the rows (choices) of waiting requests join it
between decode steps, up to ``batch_size`` rows at once (continuous batching). Requests that
do not fit wait in a queue of at most ``max_queued`` requests; :meth:`Scheduler.submit` refuses
one more at once. A request whose client leaves, or whose time is up, is dropped from the
queue or the batch at the next step.

The thread talks to the event loop through a :class:`Ticket`: text pieces, the end of each
row and the end of the request arrive as events on an ``asyncio.Queue``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any, Sequence

from .decode import Row
from .runtime import OnnxGenerator

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The wait queue already holds ``max_queued`` requests."""


class Ticket:
    """One request's rows on their way through a scheduler, and the events they produce.

    Events (read with ``await ticket.events.get()``): with ``stream``, ``("piece", row index,
    text)`` as text is ready and ``("end", row index, None)`` once a row has finished; always
    ``("done", outcome, None)`` at the end, with outcome ``"ok"``, ``"timeout"``,
    ``"cancelled"`` or ``"error"``. Events of one decode step arrive together.
    """

    def __init__(self, rows: Sequence[Row], deadline: float, loop: asyncio.AbstractEventLoop,
                 stream: bool = True) -> None:
        self.rows, self.deadline, self._loop, self.stream = list(rows), deadline, loop, stream
        self._outbox: list[tuple[str, Any, Any]] = []
        self.events: asyncio.Queue[tuple[str, Any, Any]] = asyncio.Queue()
        self.cancelled = False  # set by the server when the client has gone
        self.admitted = 0  # rows that have joined the batch
        self.outcome: str | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def _send(self, kind: str, value: Any, extra: Any = None) -> None:
        self._outbox.append((kind, value, extra))

    def _flush(self) -> None:
        """Hand the events gathered in this step to the event loop, in one wake-up."""
        events, self._outbox = self._outbox, []
        if events:
            try:
                self._loop.call_soon_threadsafe(_put_all, self.events, events)
            except RuntimeError:  # the event loop has closed: the server is stopping
                pass

    def _finish(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
            for row in self.rows:
                row.cancel(outcome)
            self._send("done", outcome)
            self._flush()


def _put_all(queue: asyncio.Queue, events: list[tuple[str, Any, Any]]) -> None:
    for event in events:
        queue.put_nowait(event)


class Scheduler:
    """The decode thread of one model; see the module docstring."""

    def __init__(self, generator: OnnxGenerator, batch_size: int, max_queued: int) -> None:
        self.generator, self.batch_size, self.max_queued = generator, batch_size, max_queued
        self._waiting: deque[Ticket] = deque()
        self._active: list[Ticket] = []  # tickets with rows in the batch
        self._reported: set[int] = set()  # id() of rows whose end was sent
        self._wake = threading.Condition()
        self._stopping = False
        self._batch = generator.decode_batch()
        self._thread = threading.Thread(target=self._run, name="openllm-decode", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for a place in the batch."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Rows (choices) being generated now."""
        return len(self._batch.rows)

    def submit(self, ticket: Ticket) -> None:
        """Queue ``ticket``; :class:`QueueFull` if the queue is full (nothing is queued then)."""
        with self._wake:
            for waiting in [t for t in self._waiting if t.cancelled]:  # clients that left free their place
                self._waiting.remove(waiting)
                waiting._finish("cancelled")
            if len(self._waiting) >= self.max_queued:
                raise QueueFull()
            self._waiting.append(ticket)
            self._wake.notify()

    def close(self) -> None:
        """Stop the thread; requests still waiting or running end as cancelled."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(10)
        for ticket in [*self._waiting, *self._active]:
            ticket._finish("cancelled")

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._batch.rows:
                    self._wake.wait()
                if self._stopping:
                    return
                joining = self._admit()
            try:
                if joining:
                    self._batch.add(joining)
                self._expire()
                if self._batch.rows:
                    self._batch.step()
            except Exception:  # a model error must not stop the thread: fail what was running
                log.exception("generation failed")
                for ticket in self._active:
                    ticket._finish("error")
                self._active, self._batch = [], self.generator.decode_batch()
            self._deliver()

    def _admit(self) -> list[Row]:
        """Rows of waiting tickets that fit in the batch, oldest first (called holding the lock)."""
        joining: list[Row] = []
        free = self.batch_size - len(self._batch.rows)
        now = time.monotonic()
        while self._waiting and len(joining) < free:
            ticket = self._waiting[0]
            if ticket.outcome is not None or ticket.cancelled or now > ticket.deadline:
                self._waiting.popleft()
                ticket._finish("cancelled" if ticket.cancelled else "timeout")
                continue
            take = ticket.rows[ticket.admitted: ticket.admitted + free - len(joining)]
            joining += take
            ticket.admitted += len(take)
            if ticket not in self._active:
                self._active.append(ticket)
            if ticket.admitted == len(ticket.rows):
                self._waiting.popleft()
        return joining

    def _expire(self) -> None:
        """Rows of clients that left, or past their deadline, stop now."""
        now = time.monotonic()
        for ticket in self._active:
            if ticket.cancelled or now > ticket.deadline:
                ticket._finish("cancelled" if ticket.cancelled else "timeout")

    def _deliver(self) -> None:
        """Send each active ticket its new pieces and row ends; retire finished tickets."""
        still = []
        for ticket in self._active:
            if ticket.outcome is None:
                for index, row in enumerate(ticket.rows[: ticket.admitted]):
                    pieces = row.take_pieces()
                    if ticket.stream:
                        for piece in pieces:
                            ticket._send("piece", index, piece)
                    if row.finish is not None and id(row) not in self._reported:
                        self._reported.add(id(row))
                        if ticket.stream:
                            ticket._send("end", index)
                if all(id(row) in self._reported for row in ticket.rows):
                    ticket._finish("ok")
                ticket._flush()
            if ticket.outcome is None:
                still.append(ticket)
            else:
                self._reported.difference_update(id(row) for row in ticket.rows)
        self._active = still
