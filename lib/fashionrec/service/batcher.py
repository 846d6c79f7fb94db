"""Dynamic batching of query photos: crops decoded in parallel by many requests, embedded together.

Each request announces itself (:meth:`MicroBatcher.announce`) before it decodes its photo and
submits the crop when decoded. One worker thread takes what is queued, up to ``max_batch``
crops, and waits for more only while announced requests are still decoding, at most
``max_wait_ms``: a single request on an idle server is embedded the moment its crop is ready,
and under load the batch fills with the requests that arrived while the previous one ran.
Crops of different query models (two index versions that do not share one) run as separate batches.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from typing import Callable

import numpy as np

from ..models.query_model import run_query_model


class MicroBatcher:
    """Embeds submitted crops in dynamic batches on one worker thread; ``on_batch(size, seconds)`` observes each."""

    def __init__(self, max_batch: int, max_wait_ms: float, on_batch: Callable[[int, float], None] | None = None):
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: deque = deque()
        self._decoding = 0
        self._closed = False
        self._changed = threading.Condition()
        self._worker = threading.Thread(target=self._run, name="fashionrec-embed", daemon=True)
        self._worker.start()

    @contextlib.contextmanager
    def announce(self):
        """Around a request's decoding; yields a :class:`Ticket` to submit its crop with.

        Until the crop is submitted (or decoding fails), the worker may wait for it, at most ``max_wait_ms``.
        """
        ticket = Ticket(self)
        with self._changed:
            self._decoding += 1
        try:
            yield ticket
        finally:
            if not ticket.submitted:
                with self._changed:
                    self._decoding -= 1
                    self._changed.notify_all()

    def submit(self, encoder, pixels: np.ndarray, announced: bool = False) -> Future:
        """A future of (the (dim,) float32 embedding of one crop, the seconds its batch took to embed).

        ``pixels``: (height, width, 3) uint8, for ``encoder``'s session. ``announced``: the crop
        of a request counted by :meth:`announce` (use its ticket).
        """
        future: Future = Future()
        with self._changed:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if announced:
                self._decoding -= 1
            self._queue.append((encoder, pixels, future))
            self._changed.notify_all()
        return future

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._worker.join(timeout=5)

    def _next_batch(self) -> list | None:
        with self._changed:
            while not self._queue and not self._closed:
                self._changed.wait()
            if not self._queue:
                return None
            deadline = time.monotonic() + self.max_wait_s
            while len(self._queue) < self.max_batch and self._decoding > 0 and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            by_encoder: dict[int, list] = {}
            for entry in batch:
                by_encoder.setdefault(id(entry[0]), []).append(entry)
            for entries in by_encoder.values():
                self._embed(entries)

    def _embed(self, entries: list) -> None:
        started = time.perf_counter()
        try:
            vectors = run_query_model(entries[0][0].session, np.stack([pixels for _, pixels, _ in entries]))
        except Exception as error:  # the requests of this batch fail with it; the worker goes on
            for _, _, future in entries:
                _settle(future, error=error)
            return
        seconds = time.perf_counter() - started
        for row, (_, _, future) in enumerate(entries):
            _settle(future, (vectors[row], seconds))
        if self.on_batch is not None:
            self.on_batch(len(entries), seconds)


class Ticket:
    """One announced request: :meth:`submit` its crop once decoded."""

    def __init__(self, batcher: MicroBatcher):
        self.batcher = batcher
        self.submitted = False

    def submit(self, encoder, pixels: np.ndarray) -> Future:
        future = self.batcher.submit(encoder, pixels, announced=True)
        self.submitted = True
        return future


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Completes a future unless its request gave up on it (timed out, disconnected)."""
    with contextlib.suppress(InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
