"""The reactor in a daemon thread, for the blocking client.

It starts when the first blocking client is made, never at import, and
stops at interpreter exit.  Blocking calls hop onto it with
`blockingCallFromThread`.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref

from twisted.internet import defer, threads
from twisted.python.failure import Failure

_lock = threading.Lock()
_thread: threading.Thread | None = None
#: Clients whose submitted tasks must be confirmed before the reactor stops.
_confirm_at_exit: weakref.WeakSet = weakref.WeakSet()

#: Seconds the interpreter's exit waits for unacknowledged tasks.
EXIT_CONFIRM_TIMEOUT = 10.0

#: Seconds an interrupted wait waits for its cancellation to take effect.
CANCEL_WAIT = 2.0


def confirm_at_exit(client) -> None:
    """Wait, at interpreter exit, until `client.confirm()` fires (bounded)."""
    _confirm_at_exit.add(client)


def ensure_running():
    """Start the reactor thread if needed; returns the reactor."""
    global _thread
    from twisted.internet import reactor

    with _lock:
        if _thread is not None and _thread.is_alive():
            return reactor
        if reactor.running:
            raise RuntimeError(
                "the blocking taskfarm.client cannot run inside a program whose "
                "reactor is already running; use taskfarm.asyncclient there"
            )
        started = threading.Event()
        reactor.callWhenRunning(started.set)
        _thread = threading.Thread(
            target=reactor.run,
            kwargs={"installSignalHandlers": False},
            name="taskfarm-reactor",
            daemon=True,
        )
        _thread.start()
        if not started.wait(30):
            raise RuntimeError("the reactor thread did not start within 30 s")
        atexit.register(_stop, reactor)
        return reactor


def in_reactor_thread() -> bool:
    """Whether the caller is the reactor thread (where blocking calls are refused)."""
    return _thread is not None and threading.current_thread() is _thread


def call(function, *args, **kwargs):
    """Run `function` (which may return a Deferred) in the reactor thread and
    wait for its result; its failure is raised here."""
    from twisted.internet import reactor

    if in_reactor_thread():
        raise RuntimeError("a blocking taskfarm call was made from the reactor thread")
    return threads.blockingCallFromThread(reactor, function, *args, **kwargs)


def call_interruptible(function, *args, **kwargs):
    """`call`, for waits that may be given up: a KeyboardInterrupt (Ctrl-C)
    while waiting cancels the Deferred in the reactor thread (which ends the
    wait and any progress bar there) and is raised here, leaving the client
    usable."""
    from twisted.internet import reactor

    if _thread is not None and threading.current_thread() is _thread:
        raise RuntimeError("a blocking taskfarm call was made from the reactor thread")
    answers: queue.SimpleQueue = queue.SimpleQueue()
    started: list[defer.Deferred] = []

    def start() -> None:
        d = defer.maybeDeferred(function, *args, **kwargs)
        started.append(d)
        d.addBoth(answers.put)

    reactor.callFromThread(start)
    try:
        answer = answers.get()
    except BaseException:
        # Queued after `start`, so `started` holds its Deferred by then.
        reactor.callFromThread(lambda: started and started[0].cancel())
        # Until the cancel took effect (its bar closed, say), bounded; a
        # second Ctrl-C ends this wait too.
        try:
            answers.get(timeout=CANCEL_WAIT)
        except BaseException:
            pass
        raise
    if isinstance(answer, Failure):
        answer.raiseException()
    return answer


def _stop(reactor) -> None:
    thread = _thread
    if thread is None or not thread.is_alive():
        return
    for client in list(_confirm_at_exit):
        try:
            threads.blockingCallFromThread(
                reactor, lambda c=client: c.confirm().addTimeout(EXIT_CONFIRM_TIMEOUT, reactor)
            )
        except Exception:
            pass
    try:
        reactor.callFromThread(reactor.stop)
    except RuntimeError:
        return
    thread.join(5)
