"""Collecting the reference cycles that received messages leave behind.

Foolscap's unslicers keep the arguments they received inside reference
cycles, so a message stays in memory until Python's cyclic garbage
collector runs its oldest generation.  In a process with many long-lived
objects that may take very long: 5,000 finished tasks of 100 KB each kept
about 400 MB alive in the controller, all of it garbage.  So every process
counts the bytes of the messages it has answered and runs a full
collection once they add up to `DEFAULT_THRESHOLD`, so the garbage of
received messages stays bounded by about that much.  While a controller or
engine service runs (`start`), a collection also runs once `SETTLE_BYTES`
or more came in and then `SETTLE_DELAY` passed without a message, so that
a burst's garbage does not linger once it is over.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable

#: Bytes received between two full collections.  A full collection walks
#: every object of a controller holding many tasks: with 8 MiB, the bulk
#: benchmark's 10,000 small tasks paid for one, with this much none do.
DEFAULT_THRESHOLD = 256 * 1024 * 1024

#: After this many bytes, a collection also runs this many seconds later.
SETTLE_BYTES = 32 * 1024 * 1024
SETTLE_DELAY = 1.0


def _malloc_trim() -> Callable[[int], int] | None:
    # glibc keeps freed memory in its heaps; trimming hands it back, so the
    # process's size follows what it holds.  Other C libraries: nothing.
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def collect_and_trim() -> None:
    """A full collection, then the freed memory back to the system."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)


class CycleSweeper:
    """Runs `collect` at the end of the turn in which `received` bytes
    reached the threshold; once started, also `SETTLE_DELAY` after the last
    message, once `SETTLE_BYTES` came."""

    def __init__(
        self,
        reactor,
        threshold: int = DEFAULT_THRESHOLD,
        collect: Callable[[], object] = collect_and_trim,
    ) -> None:
        self._reactor = reactor
        self.threshold = threshold
        self._collect = collect
        self._pending = 0
        self._call = None
        self._services = 0
        # Whether the call pending is a settle (pushed back by each message),
        # not a threshold sweep (due in this turn).
        self._settling = False
        #: How many collections ran.
        self.collections = 0

    def start(self) -> None:
        """A service that lives as long as the process started: settle too."""
        self._services += 1

    def stop(self) -> None:
        """That service stopped: leave no timer behind once none runs."""
        self._services = max(0, self._services - 1)
        if not self._services and self._call is not None and self._call.active():
            self._call.cancel()
            self._call = None

    def received(self, nbytes: int) -> None:
        """A message of `nbytes` arrived."""
        self._pending += nbytes
        if self._pending >= self.threshold:
            # Later in the turn: the message being handled is alive now.
            if self._call is None:
                self._call = self._reactor.callLater(0, self._sweep)
            else:
                self._call.reset(0)
        elif self._services and self._pending >= SETTLE_BYTES:
            # Once the burst is over: each message pushes the settle back, so
            # a burst slower than SETTLE_DELAY is not swept half-way, leaving
            # its tail behind until the threshold.
            if self._call is None:
                self._call = self._reactor.callLater(SETTLE_DELAY, self._sweep)
            elif self._settling:
                self._call.reset(SETTLE_DELAY)
        self._settling = self._call is not None and self._pending < self.threshold

    def _sweep(self) -> None:
        self._call = None
        self._settling = False
        self._pending = 0
        self._collect()
        self.collections += 1


_process_sweeper: CycleSweeper | None = None


def process_sweeper() -> CycleSweeper:
    """The sweeper of this process (garbage is per process), on the global
    reactor."""
    global _process_sweeper
    if _process_sweeper is None:
        from twisted.internet import reactor

        _process_sweeper = CycleSweeper(reactor)
    return _process_sweeper


def received(message) -> None:
    """Count one received message, whose call is answered, towards this
    process's next collection."""
    if isinstance(message, bytes):  # anything else is refused later
        process_sweeper().received(len(message))
    elif isinstance(message, list) and all(isinstance(part, bytes) for part in message):
        process_sweeper().received(sum(map(len, message)))


def once_answered(answer, message: bytes):
    """Count `message` once the call it came with is answered (`answer`, a
    Deferred, fires): only then do its unslicers become garbage."""

    def count(result):
        received(message)
        return result

    return answer.addBoth(count)
