"""Bounded read-ahead: one background thread takes the next items of an iterable and works on them while the
consumer handles earlier results, in order. Chained (``ReadAhead(ReadAhead(items, f), g)``) it makes a
pipeline with one thread per stage. Plain Python; the generator's Synthesize stream uses it."""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

__all__ = ["READ_AHEAD", "ReadAhead"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

READ_AHEAD = 2  # results that may wait for the consumer
_serial = itertools.count(1)


class ReadAhead(Generic[T, R]):
    """``work(item)`` for each item of ``items`` in one background thread; iterate for the results, in order.

    Bounded: the thread takes an item only while fewer than ``depth`` results wait, so at most ``depth`` items
    are taken beyond the results the consumer has received. Never stalling: a result is handed over as soon
    as it is ready (a caller that waits for each result before supplying its next item gets every one). The
    first exception, from ``items`` or ``work``, ends the work and is raised to the consumer (the same object)
    after the results before it. :meth:`close` (also called when iteration ends or is abandoned) stops the
    thread at its next step, and closes ``items`` too if it is a ReadAhead; a thread blocked in ``next(items)``
    otherwise stops when ``items`` returns or raises."""

    def __init__(
        self, items: Iterable[T], work: Callable[[T], R], depth: int = READ_AHEAD, name: str = "readahead"
    ) -> None:
        if depth < 1:
            raise ValueError(f"read-ahead depth must be >= 1, got {depth}")
        self.depth = depth
        self.taken = 0  # items taken from ``items`` so far
        self.delivered = 0  # results handed to the consumer so far
        self._upstream = items if isinstance(items, ReadAhead) else None
        self._items, self._work = iter(items), work
        self._cond = threading.Condition()
        self._ready: deque[R] = deque()
        self._error: BaseException | None = None
        self._finished = False  # the thread has ended: items exhausted, an error, or closed
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-{next(_serial)}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop taking items and drop results not yet handed over; idempotent, from any thread."""
        with self._cond:
            self._closed = True
            self._ready.clear()
            self._cond.notify_all()
        if self._upstream is not None:
            self._upstream.close()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the background thread to end; whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _room(self) -> bool:
        """Wait until fewer than ``depth`` results wait (True) or the read-ahead is closed (False)."""
        with self._cond:
            while len(self._ready) >= self.depth and not self._closed:
                self._cond.wait()
            return not self._closed

    def _run(self) -> None:
        try:
            while self._room():
                try:
                    item = next(self._items)
                except StopIteration:
                    return
                self.taken += 1
                result = self._work(item)
                with self._cond:
                    if self._closed:
                        return
                    self._ready.append(result)
                    self._cond.notify_all()
        except BaseException as e:  # handed to the consumer, in order
            log.debug("%s: stopped by %s", threading.current_thread().name, type(e).__name__)
            with self._cond:
                self._error = e
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _take(self) -> list[R]:
        """The next result (a one-item list), or [] at the end; raises the thread's error."""
        with self._cond:
            while not self._ready and not self._finished and not self._closed:
                self._cond.wait()
            if self._ready:
                self.delivered += 1
                result = self._ready.popleft()
                self._cond.notify_all()
                return [result]
            error, self._error = (None if self._closed else self._error), None
        if error is not None:
            raise error
        return []

    def __iter__(self) -> Iterator[R]:
        try:
            while next_one := self._take():
                yield next_one[0]
        finally:
            self.close()
