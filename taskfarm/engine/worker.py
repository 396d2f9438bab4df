"""Runs an engine's commands in order, in one thread off the reactor.

The reactor thread hands commands in (`receive`) and may ask for one to stop
(`interrupt`).  The worker thread runs them one at a time against the
`Namespace`; replies are collected and leave in one batch per reactor turn.

Commands belong to a *session* (one registration with a controller).  When
the link breaks, `end_session` drops whatever that session still had queued
and interrupts what was running: the controller has already given that work
to other engines.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger

from taskfarm import exitcodes, wire
from taskfarm.engine.namespace import Interrupt, Namespace
from taskfarm.errors import (
    BadRequest,
    ProtocolVersionError,
    TaskAborted,
    TaskTimeout,
    WaitTimeout,
    to_wire,
)
from taskfarm.services import join_thread


class _AbortInterrupt(Interrupt):
    pass


class _TimeoutInterrupt(Interrupt):
    pass


_STOP = object()

#: Seconds an interrupted command gets to stop before the engine exits.
DEFAULT_STUCK_GRACE = 5.0

#: The exit status of an engine that gave up on a command that would not
#: stop; `taskfarm cluster` starts a fresh engine in its place (see
#: `taskfarm.exitcodes`).
EXIT_STUCK = exitcodes.EXIT_STUCK


def _exit_for_restart() -> None:
    os._exit(EXIT_STUCK)


def _raise_in_thread(thread_id: int, exception_type: type | None) -> None:
    # None clears an exception that was set but not yet raised.
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id),
        ctypes.py_object(exception_type) if exception_type is not None else None,
    )


class CommandWorker:
    """One engine's command queue and the thread that works it."""

    _log = Logger()

    def __init__(
        self,
        namespace: Namespace,
        reactor,
        stuck_grace: float = DEFAULT_STUCK_GRACE,
        on_stuck: Callable[[], None] | None = None,
        on_kill: Callable[[], None] | None = None,
    ) -> None:
        self.namespace = namespace
        self._reactor = reactor
        #: Seconds an interrupted command may take to stop before the engine
        #: gives up on it (answers for it and calls `on_stuck`).
        self.stuck_grace = stuck_grace
        self._on_stuck = on_stuck or _exit_for_restart
        #: What a ``kill`` does once answered: by default, stop the reactor
        #: and end the process with the status that keeps it down.
        self._on_kill = on_kill or (
            lambda: exitcodes.stop_reactor_and_exit(self._reactor, exitcodes.EXIT_KILLED)
        )
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._session = 0
        self._sink: Callable[[list], None] | None = None
        #: (session, seq) of the command running now, or None.
        self._current: tuple[int, int] | None = None
        #: When the current (or last) command started, its op and its timeout.
        self._started: float | None = None
        self._current_op: str | None = None
        self._current_timeout: float | None = None
        #: Set once a ``kill`` arrived: nothing more runs.
        self._killed = False
        self._interrupted: set[tuple[int, int]] = set()
        self._cancelled: set[tuple[int, int]] = set()
        self._replies: list = []
        self._flush_scheduled = False
        self._timers: dict[tuple[int, int], object] = {}
        #: The pending `_check_stuck` call of each interrupted command.
        self._stuck_checks: dict[tuple[int, int], object] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.commands_run = 0

    # -- lifecycle (reactor thread) ---------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._work, name="taskfarm-engine-worker", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> defer.Deferred:
        """Stop taking commands; interrupt the running one; fires once the
        thread has ended, or after `timeout` seconds (a command that ignores
        the interrupt keeps the daemon thread); never blocks the reactor."""
        return defer.Deferred.fromCoroutine(self._stop(timeout))

    async def _stop(self, timeout: float) -> None:
        self._stopping = True
        self.end_session()
        self._queue.put(_STOP)
        # A stopping worker gives up on nothing (no exit for a stuck
        # command) and leaves no timer behind in the reactor.
        self._cancel_stuck_checks()
        if not await join_thread(self._reactor, self._thread, timeout):
            self._log.warn(
                "the running command did not stop within {timeout} s of the engine stopping",
                timeout=timeout,
            )
        self._cancel_stuck_checks()

    def _cancel_stuck_checks(self) -> None:
        for check in self._stuck_checks.values():
            if check.active():
                check.cancel()
        self._stuck_checks.clear()

    def begin_session(self, engine_id: int, sink: Callable[[list], None]) -> None:
        """Start taking commands for a new registration; replies go to `sink`."""
        self.end_session()
        with self._lock:
            self._sink = sink
        self.namespace.set_engine_id(engine_id)

    def end_session(self) -> None:
        """Forget the current session's queued commands; stop the running one."""
        with self._lock:
            self._session += 1
            self._sink = None
            self._cancelled.clear()
            current = self._current
        if current is not None:
            self._interrupt(current, _AbortInterrupt)
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    # -- commands (reactor thread) -------------------------------------------------

    def receive(self, commands: list) -> None:
        """Queue ``(seq, op, args)`` commands (`wire.Command`) of the current
        session; one that does not parse is answered with its error."""
        session = self._session
        try:
            commands = wire.parse_list(commands, "commands")
        except BadRequest as e:
            self._log.warn("the controller sent {error}; ignoring it", error=e)
            return
        for command in commands:
            try:
                command = wire.Command.parse(command)
            except (BadRequest, ProtocolVersionError) as e:
                self._refuse(command, e)
                continue
            if command.op in wire.IMMEDIATE_OPERATIONS:
                # Control, not work: it must not wait behind the command it
                # is meant to end (a runaway loop would hold it forever).
                self._kill(session, command.seq)
                continue
            self._queue.put((session, command))

    def _kill(self, session: int, seq: int) -> None:
        """Answer a ``kill`` now, interrupt the running command (its caller
        hears of it before the engine goes; queued ones never run), then end
        this process with the status that tells a launcher to leave it down."""
        if self._killed:
            return
        self._killed = True
        now = time.time()
        with self._lock:
            current = self._current
        if current is not None:
            self._interrupt(current, _AbortInterrupt, stuck_check=False)
        self._finish((session, seq), wire.Reply(seq, True, b"", now, now).plain())
        self._reactor.callLater(0.2, self._on_kill)

    def _refuse(self, command, error: Exception) -> None:
        seq = command[0] if isinstance(command, (tuple, list)) and command else None
        if type(seq) is not int:
            # Without a seq no reply can name it (only a broken controller
            # sends one): the controller's time limits and heartbeat decide.
            self._log.warn("dropped a command without a seq: {error}", error=error)
            return
        reply = wire.Reply(seq, False, to_wire(error), None, time.time())
        self._finish((self._session, seq), reply.plain())

    def interrupt(self, seq: int, reason: type = _AbortInterrupt) -> None:
        """Stop command `seq`: drop it if queued, interrupt it if running."""
        key = (self._session, seq)
        with self._lock:
            running = self._current == key
            if not running:
                self._cancelled.add(key)
        if running:
            self._interrupt(key, reason)

    def cancel(self, seqs: list[int]) -> None:
        """Drop commands that are still queued; the running one goes on."""
        session = self._session
        with self._lock:
            for seq in seqs:
                if self._current != (session, seq):
                    self._cancelled.add((session, seq))

    def _interrupt(self, key: tuple[int, int], reason: type, stuck_check: bool = True) -> None:
        with self._lock:
            if self._current != key or key in self._interrupted:
                return
            self._interrupted.add(key)
            _raise_in_thread(self._thread.ident, reason)
        self._log.info("interrupted command {seq}", seq=key[1])
        if self._stopping or not stuck_check:
            return
        self._stuck_checks[key] = self._reactor.callLater(
            self.stuck_grace, self._check_stuck, key, reason
        )

    def _check_stuck(self, key: tuple[int, int], reason: type) -> None:
        # Code that ignores the interrupt (C code, a long sleep) holds the
        # worker: answer for it, then leave so a fresh engine takes over.
        self._stuck_checks.pop(key, None)
        with self._lock:
            if self._current != key:
                return
            self._current = None
            sink = self._sink if key[0] == self._session else None
            self._session += 1
            self._sink = None
        self._log.warn(
            "command {seq} did not stop within {grace} s of being interrupted; "
            "this engine exits so that a fresh one can replace it",
            seq=key[1],
            grace=self.stuck_grace,
        )
        if sink is not None:
            sink([self._interrupted_reply(key[1], reason())])
        self._reactor.callLater(0.5, self._on_stuck)

    # -- the worker thread ------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            session, command = item
            seq, op, args = command.seq, command.op, command.args
            key = (session, seq)
            reply = None
            # At most one Interrupt is ever raised per command, and only
            # while it is current; `_settle` ends that window.  Whichever
            # line it lands on, one of the two handlers below catches it.
            try:
                try:
                    reply = self._run(key, op, args, command.timeout)
                except Interrupt as e:
                    reply = self._interrupted_reply(seq, e)
                self._settle(key)
            except Interrupt as e:
                reply = reply or self._interrupted_reply(seq, e)
                self._settle(key)
            self._finish(key, reply)

    def _run(
        self, key: tuple[int, int], op: str, args: tuple, timeout: float | None = None
    ) -> tuple | None:
        seq = key[1]
        with self._lock:
            if key[0] != self._session or self._killed:
                return None
            if key in self._cancelled:
                self._cancelled.discard(key)
                error = to_wire(TaskAborted("aborted before it ran"))
                return wire.Reply(seq, False, error, None, time.time()).plain()
            self._current = key
        started = self._started = time.time()
        # A task carries its own timeout; a MultiEngine command, the call's.
        timeout = args.timeout if op == "task" else timeout
        self._current_op, self._current_timeout = op, timeout
        if timeout:
            self._reactor.callFromThread(self._arm_timer, key, timeout)
        ok, data = self.namespace.run(op, args)
        return self._reply(seq, ok, data, started)

    def _reply(self, seq: int, ok: bool, data, started: float | None) -> tuple:
        """The plain reply; a task's captured output goes with it."""
        output = self.namespace.take_output()
        if output is None:
            return wire.Reply(seq, ok, data, started, time.time()).plain()
        return wire.Reply(seq, ok, data, started, time.time(), *output).plain()

    def _settle(self, key: tuple[int, int]) -> None:
        with self._lock:
            if self._current == key:
                self._current = None
            self._interrupted.discard(key)
            # Clear an interrupt that was set but not yet delivered.
            _raise_in_thread(threading.get_ident(), None)

    def _interrupted_reply(self, seq: int, interrupt: Interrupt) -> tuple:
        if isinstance(interrupt, _TimeoutInterrupt) and self._current_op != "task":
            error = WaitTimeout(
                "the %s command ran past its timeout of %g s and was interrupted"
                % (self._current_op, self._current_timeout or 0)
            )
        elif isinstance(interrupt, _TimeoutInterrupt):
            error = TaskTimeout("the task ran past its timeout and was stopped")
        else:
            error = TaskAborted("the command was interrupted")
        return self._reply(seq, False, to_wire(error), self._started)

    def _finish(self, key: tuple[int, int], reply: tuple | None) -> None:
        self.commands_run += 1
        with self._lock:
            if reply is None or key[0] != self._session:
                return
            self._replies.append(reply)
            if self._flush_scheduled:
                return
            self._flush_scheduled = True
        self._reactor.callFromThread(self._flush)

    # -- back on the reactor thread ------------------------------------------------------

    def _arm_timer(self, key: tuple[int, int], timeout: float) -> None:
        if key[0] != self._session:
            return
        self._timers[key] = self._reactor.callLater(
            timeout, self._timed_out, key
        )

    def _timed_out(self, key: tuple[int, int]) -> None:
        self._timers.pop(key, None)
        self._interrupt(key, _TimeoutInterrupt)

    def _flush(self) -> None:
        with self._lock:
            replies, self._replies = self._replies, []
            self._flush_scheduled = False
            sink = self._sink
        for reply in replies:
            seq = reply[0]
            timer = self._timers.pop((self._session, seq), None)
            if timer is not None and timer.active():
                timer.cancel()
        if sink is not None and replies:
            sink(replies)
