"""One process protocol for the children taskfarm starts.

`ChildProcess` is what every child of ours has in common: `ended` fires
once, with the exit reason (`exit_status` reads the status out of it), and
`signal` / `kill` reach the process by its PID and say nothing when it is
already gone.  `GroupChild` puts its process in a process group of its own,
so that what it forks can be signalled with it (`signal_group`), and
`OutputChild` keeps what its process writes.  Subclasses add what their child speaks: the launcher's
slots (`taskfarm.cluster.launcher`), the depend evaluators
(`taskfarm.controller.predicates`), the `taskfarm demo` job
(`taskfarm.cli`).
"""

from __future__ import annotations

import os
import signal

from twisted.internet import defer, error, protocol


def exit_status(reason) -> int | None:
    """The exit status in a process's exit `reason`; None for a signal."""
    return getattr(reason, "exitCode", None)


class ChildProcess(protocol.ProcessProtocol):
    """A child process; `ended` fires once with its exit reason (the
    exception of ``processEnded``, or of ``processExited`` for a subclass
    that calls `_end` there)."""

    def __init__(self) -> None:
        self.ended: defer.Deferred = defer.Deferred()

    def processEnded(self, reason) -> None:
        self._end(reason.value)

    def _end(self, reason) -> None:
        if not self.ended.called:
            self.ended.callback(reason)

    @property
    def pid(self) -> int | None:
        """The process id while it runs, else None."""
        return self.transport.pid if self.transport is not None else None

    def signal(self, signum) -> None:
        """Send `signum` (a number or a name such as ``"KILL"``) to the
        process, if it is still there."""
        if self.transport is None:
            return
        try:
            self.transport.signalProcess(signum)
        except (error.ProcessExitedAlready, OSError):
            pass

    def kill(self) -> None:
        """SIGKILL the process, if it is still there."""
        self.signal("KILL")


class GroupChild(ChildProcess):
    """A child in a process group of its own, whose pid stays known
    (`last_pid`) after it ended, for the logs and for `signal_group`."""

    def __init__(self) -> None:
        super().__init__()
        #: The pid, kept after the process ended.
        self.last_pid: int | None = None
        self._close_call = None

    def connectionMade(self) -> None:
        self.last_pid = self.transport.pid
        # Its own group, from this side too: whichever of us comes first
        # (a child of ours also does so itself at start; after its exec,
        # we may no longer).
        try:
            os.setpgid(self.last_pid, self.last_pid)
        except OSError:
            pass

    def signal_group(self, signum: int) -> None:
        """Send `signum` to the child's process group, if there is one."""
        if self.last_pid is None:
            return
        try:
            os.killpg(self.last_pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # no such group (it never made one, or it is all gone)

    def end_with_process(self, reason, reactor=None, grace: float = 1.0) -> None:
        """From ``processExited``: the child ends with its process, not with
        its pipes, which processes it forked may hold open.  What is left of
        its group is SIGKILLed now, while the group id cannot yet name anyone
        else's group; its pipes are closed `grace` seconds later on `reactor`
        (at once without one); `ended` fires now."""
        self.signal_group(signal.SIGKILL)
        if reactor is None:
            self._close_pipes()
        else:
            self._close_call = reactor.callLater(grace, self._close_pipes)
        self._end(reason.value)

    def _close_pipes(self) -> None:
        self._close_call = None
        transport = self.transport
        if transport is not None:
            for fd in list(getattr(transport, "pipes", {})):
                transport.closeChildFD(fd)

    def processEnded(self, reason) -> None:
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        self._close_call = None
        super().processEnded(reason)


class OutputChild(ChildProcess):
    """A child whose output is kept: stdout in `out`, stderr in `err`."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.err = bytearray()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data
