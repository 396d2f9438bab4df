"""One process protocol for the children taskfarm starts.

`ChildProcess` is what every child of ours has in common: `ended` fires
once, with the exit reason (`exit_status` reads the status out of it), and
`signal` / `kill` reach the process by its PID and say nothing when it is
already gone.  Subclasses add what their child speaks: the launcher's
slots (`taskfarm.cluster.launcher`), the depend evaluators
(`taskfarm.controller.predicates`), the `taskfarm demo` job
(`taskfarm.cli`).
"""

from __future__ import annotations

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
