"""What the exit status of a controller or engine process tells its launcher.

A launcher (`taskfarm cluster`, `taskfarm engines`) decides from the exit
status alone whether to start a process again:

- `EXIT_KILLED`: the process stopped because a MultiEngine ``kill`` asked
  for it (an engine for ``kill(targets=...)``, the controller for
  ``kill(controller=True)``).  The launcher leaves an engine down, and
  stops the whole cluster when the controller exits so.
- `EXIT_STUCK`: an engine gave up on a command that ignored its interrupt
  (C code, a long sleep).  A fresh engine helps: it is started again.
- `EXIT_REFUSED`: the process refused to start and starting it again will
  not help (its profile is in use by another controller, its journal
  cannot be read).  The launcher stops, quoting the process's message.

- `EXIT_TERMINATED`: the controller got a SIGTERM while a launcher runs it,
  and its launcher (which marks its own stop first) did not send it: a
  person (``kill PID``) or the system asked it to stop.  It stays down and
  the launcher stops the cluster, saying so.

Any other status (0 included, a signal included) is a death, and the
launcher starts the process again after its back-off.
"""

from __future__ import annotations

import os
import sys

#: Stopped because a MultiEngine ``kill`` asked for it: stays down.
EXIT_KILLED = 76

#: An engine gave up on a command that would not stop: replace it.
EXIT_STUCK = 75

#: Refused to start (profile in use, journal corrupt): do not retry.
EXIT_REFUSED = 78

#: Stopped by a SIGTERM from outside its launcher: stays down, the cluster stops.
EXIT_TERMINATED = 79


#: The line a process writes on stderr as it ends by `stop_reactor_and_exit`,
#: for a launcher that cannot see its exit status (mpiexec's ranks).
EXIT_LINE = "taskfarm: exiting with status %d"


#: Set (`say_exit_on_stderr`) when this process logs to a file: the exit
#: line then goes to the original stderr as well as to the log.
_ALSO_ON_STDERR = []


def say_exit_on_stderr() -> None:
    """Write `EXIT_LINE` to the process's own stderr too (its log goes to
    a file; whoever watches its stderr, mpiexec's launcher, must see it)."""
    _ALSO_ON_STDERR[:] = [True]


def stop_reactor_and_exit(reactor, status: int) -> None:
    """Stop `reactor` (services stop as usual), then end the process with
    `status` instead of the 0 the runner would give (saying so on stderr:
    `EXIT_LINE`)."""

    def exit_now() -> None:
        try:
            print(EXIT_LINE % status, file=sys.stderr)
        except (OSError, ValueError):
            pass
        if _ALSO_ON_STDERR and sys.__stderr__ is not None and sys.__stderr__ is not sys.stderr:
            try:
                print(EXIT_LINE % status, file=sys.__stderr__, flush=True)
            except (OSError, ValueError):
                pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)

    reactor.addSystemEventTrigger("after", "shutdown", exit_now)
    reactor.stop()


def refuse_to_start(message: str) -> SystemExit:
    """Print `message` on stderr; the `SystemExit` to raise for `EXIT_REFUSED`."""
    print(message, file=sys.stderr, flush=True)
    return SystemExit(EXIT_REFUSED)
