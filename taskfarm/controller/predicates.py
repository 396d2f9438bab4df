"""Where `depend` predicates run: a small pool of child processes.

User code never runs in the controller's reactor.  A predicate is pickled
user code, so even unpickling it may import modules, block or exit; the
controller only keeps its bytes, and `PredicatePool` sends them with the
engine's properties to a child process (`taskfarm.controller.depend_child`)
that answers with a `Verdict`.

Each call has a timeout.  A predicate that raises (anything, `SystemExit`
included), times out, kills its process or cannot be unpickled counts as
False, and the verdict says why.  A child that dies or is killed for a
timeout is replaced, and the requests that were queued behind the culprit
are sent again: every call is answered, within its timeout per request
ahead of it.
"""

from __future__ import annotations

import collections
import itertools
import os
import pickle
import struct
import sys
from typing import NamedTuple

from twisted.internet import defer, error
from twisted.logger import Logger
from zope.interface import implementer

from taskfarm.childprocess import ChildProcess
from taskfarm.interfaces import IPredicateEvaluator

#: Seconds one predicate call may take.
DEFAULT_DEPEND_TIMEOUT = 5.0

#: How many evaluating processes run at most.
DEFAULT_POOL_SIZE = 2

#: Seconds a new process has to say it is ready.
START_TIMEOUT = 30.0

#: Requests sent ahead to one process; the rest wait in the pool.
MAX_INFLIGHT = 64

#: Seconds `stop` waits for processes to leave before killing them.
STOP_GRACE = 1.0

_HEADER = struct.Struct(">I")
_CHILD_MODULE = "taskfarm.controller.depend_child"
_STDERR_LOGGED = 4096


class Verdict(NamedTuple):
    """What a predicate said of one engine's properties."""

    #: Whether the engine may run the predicate's tasks.
    accepted: bool
    #: Why it counts as False when it failed ("raised SystemExit: 3",
    #: "timed out after 5 s", "cannot load: ..."); None when it answered.
    reason: str | None = None
    #: False when the predicate cannot be unpickled at all: no engine will
    #: ever accept it, and its tasks fail with `DependError`.
    loadable: bool = True
    #: The property names the predicate read, sorted, when the call asked
    #: to trace them (``evaluate(..., trace=True)``); else None.
    read: tuple | None = None


class _Request:
    __slots__ = ("reqid", "key", "blob", "trace", "deferred", "deaths")

    def __init__(self, reqid: int, key: bytes, blob: bytes, trace: bool = False) -> None:
        self.reqid = reqid
        self.key = key
        self.blob = blob
        self.trace = trace
        self.deferred: defer.Deferred = defer.Deferred()
        #: Processes that died while evaluating it.
        self.deaths = 0


class _Child(ChildProcess):
    """One evaluating process; it answers its requests in order."""

    def __init__(self, pool: PredicatePool, number: int) -> None:
        super().__init__()
        self.pool = pool
        self.number = number
        self.buffer = bytearray()
        #: Requests sent, oldest (the one being evaluated) first.
        self.inflight: collections.deque[_Request] = collections.deque()
        self.ready = False
        #: False once the pool has given up on this process.
        self.alive = True
        self.timer = None
        self.stderr_seen = 0
        self.stderr_tail = b""

    def connectionMade(self) -> None:
        self.send(("hello", list(sys.path), os.getcwd()))

    def send(self, message: object) -> None:
        body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.transport.write(_HEADER.pack(len(body)) + body)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 2:
            self.pool._stderr(self, data)
            return
        self.buffer += data
        while len(self.buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.buffer)
            if len(self.buffer) < _HEADER.size + size:
                return
            body = bytes(self.buffer[_HEADER.size : _HEADER.size + size])
            del self.buffer[: _HEADER.size + size]
            if not self.alive:
                return
            try:
                message = pickle.loads(body)
            except Exception as e:
                self.pool._broken(self, "sent an unreadable message: %s" % e)
                return
            self.pool._message(self, message)

    def processEnded(self, reason) -> None:
        self.pool._ended(self, reason.value)
        super().processEnded(reason)


@implementer(IPredicateEvaluator)
class PredicatePool:
    """Evaluates `depend` predicates in up to `size` child processes.

    Processes start on demand once `start` was called, see the same
    ``sys.path`` and working folder as the controller, and leave when their
    stdin closes (so a controller killed with -9 leaves none behind).
    Requests made in one reactor turn travel together.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        timeout: float = DEFAULT_DEPEND_TIMEOUT,
        size: int = DEFAULT_POOL_SIZE,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self.timeout = timeout
        self._size = size
        self._start_timeout = start_timeout
        self._queue: collections.deque[_Request] = collections.deque()
        self._children: list[_Child] = []
        self._ids = itertools.count()
        self._numbers = itertools.count()
        self._flush_call = None
        self._running = False
        #: How many processes were started, ever (for tests and the log).
        self.started = 0

    # -- IPredicateEvaluator ------------------------------------------------------

    def start(self) -> None:
        self._running = True

    def evaluate(self, key: bytes, properties: dict, trace: bool = False) -> defer.Deferred:
        if not self._running:
            return self._later(Verdict(False, "the depend evaluator is not running"))
        try:
            blob = pickle.dumps(dict(properties), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            return self._later(
                Verdict(False, "cannot send the engine's properties: %s: %s" % (type(e).__name__, e))
            )
        request = _Request(next(self._ids), key, blob, trace)
        self._queue.append(request)
        self._schedule_flush()
        return request.deferred

    def stop(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._stop())

    def pids(self) -> list[int]:
        """The process ids of the evaluating processes now."""
        return [c.transport.pid for c in self._children if c.transport.pid is not None]

    # -- inside ---------------------------------------------------------------------

    def _later(self, verdict: Verdict) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._reactor.callLater(0, d.callback, verdict)
        return d

    async def _stop(self) -> None:
        self._running = False
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        stopping = Verdict(False, "the controller is stopping")
        while self._queue:
            self._queue.popleft().deferred.callback(stopping)
        children, self._children = self._children, []
        for child in children:
            self._retire(child)
            for request in child.inflight:
                request.deferred.callback(stopping)
            child.inflight.clear()
            child.transport.closeStdin()
        waiting = [child.ended for child in children]
        if not waiting:
            return
        # Give them a moment to see their stdin close; a predicate that
        # blocks would keep its process: then it is killed.
        kill = self._reactor.callLater(STOP_GRACE, lambda: [c.kill() for c in children])
        await defer.DeferredList(waiting)
        if kill.active():
            kill.cancel()

    def _schedule_flush(self) -> None:
        if self._flush_call is None and self._running:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        if not self._queue:
            return
        while len(self._children) < self._size:
            self._spawn()
        batches: dict[_Child, list[_Request]] = {child: [] for child in self._children}

        def load(child: _Child) -> int:
            return len(child.inflight) + len(batches[child])

        while self._queue:
            child = min(self._children, key=load)
            if load(child) >= MAX_INFLIGHT:
                break  # sent when answers make room
            batches[child].append(self._queue.popleft())
        for child, requests in batches.items():
            if not requests:
                continue
            child.inflight.extend(requests)
            child.send(("eval", [(r.reqid, r.key, r.blob, r.trace) for r in requests]))
            if child.ready and child.timer is None:
                self._arm(child)

    def _spawn(self) -> _Child:
        child = _Child(self, next(self._numbers))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self._reactor.spawnProcess(
            child,
            sys.executable,
            [sys.executable, "-m", _CHILD_MODULE],
            env=env,
            path=os.getcwd(),
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        self.started += 1
        child.timer = self._reactor.callLater(self._start_timeout, self._start_timed_out, child)
        self._children.append(child)
        return child

    def _arm(self, child: _Child) -> None:
        """Time the request the child is evaluating now (the oldest)."""
        if child.timer is not None and child.timer.active():
            child.timer.cancel()
        child.timer = None
        if child.inflight:
            child.timer = self._reactor.callLater(self.timeout, self._timed_out, child)

    def _message(self, child: _Child, message: tuple) -> None:
        if message == ("ready",):
            child.ready = True
            self._arm(child)
            return
        reqid, accepted, reason, loadable, read = message
        if not child.inflight or child.inflight[0].reqid != reqid:
            self._broken(child, "answered request %r out of order" % (reqid,))
            return
        request = child.inflight.popleft()
        self._arm(child)
        read = None if read is None else tuple(read)
        request.deferred.callback(Verdict(bool(accepted), reason, bool(loadable), read))
        if self._queue:
            self._schedule_flush()

    def _timed_out(self, child: _Child) -> None:
        child.timer = None
        self._give_up(child, Verdict(False, "timed out after %g s" % self.timeout))

    def _start_timed_out(self, child: _Child) -> None:
        child.timer = None
        self._fail_all(child, "did not start within %g s" % self._start_timeout)

    def _broken(self, child: _Child, why: str) -> None:
        self._log.error("depend evaluator {number} {why}", number=child.number, why=why)
        self._fail_all(child, why)

    def _ended(self, child: _Child, reason) -> None:
        if not child.alive:
            return  # given up on already
        if isinstance(reason, error.ProcessTerminated):
            how = (
                "signal %s" % reason.signal if reason.signal is not None
                else "status %s" % reason.exitCode
            )
        else:
            how = "status 0"
        if not child.ready:
            tail = child.stderr_tail.decode(errors="replace").strip().splitlines()
            self._fail_all(
                child, "exited (%s) before it was ready%s" % (how, ": " + tail[-1] if tail else "")
            )
        elif child.inflight:
            # Killed from outside (the OOM killer, a user) looks the same as
            # a predicate that kills its process: the request gets a second
            # process before it is blamed.
            head = child.inflight[0]
            head.deaths += 1
            if head.deaths < 2:
                self._log.warn(
                    "depend evaluator {number} died ({how}); trying its request again",
                    number=child.number,
                    how=how,
                )
                self._give_up(child, None)
            else:
                self._give_up(child, Verdict(False, "killed its evaluating process (%s)" % how))
        else:
            self._log.warn("depend evaluator {number} exited ({how})", number=child.number, how=how)
            self._retire(child)

    def _give_up(self, child: _Child, verdict: Verdict | None) -> None:
        """The request being evaluated gets `verdict` (None: it is sent
        again too); the process is replaced and the requests behind are
        sent again."""
        culprit = child.inflight.popleft() if child.inflight and verdict is not None else None
        self._retire(child)
        # The ones queued behind go first next time, in their order.
        self._queue.extendleft(reversed(child.inflight))
        child.inflight.clear()
        child.kill()
        self._schedule_flush()
        if culprit is not None:
            culprit.deferred.callback(verdict)

    def _fail_all(self, child: _Child, why: str) -> None:
        """The process never worked: its requests fail, nothing is resent
        (so a process that cannot start does not loop)."""
        self._log.error("depend evaluator {number} {why}", number=child.number, why=why)
        requests = list(child.inflight)
        child.inflight.clear()
        self._retire(child)
        child.kill()
        verdict = Verdict(False, "the depend evaluator %s" % why)
        for request in requests:
            request.deferred.callback(verdict)

    def _retire(self, child: _Child) -> None:
        child.alive = False
        if child.timer is not None and child.timer.active():
            child.timer.cancel()
        child.timer = None
        if child in self._children:
            self._children.remove(child)

    def _stderr(self, child: _Child, data: bytes) -> None:
        child.stderr_tail = (child.stderr_tail + data)[-2048:]
        if child.stderr_seen < _STDERR_LOGGED:
            text = data[: _STDERR_LOGGED - child.stderr_seen].decode(errors="replace")
            self._log.info("depend evaluator {number} says: {text}", number=child.number, text=text)
        child.stderr_seen += len(data)
