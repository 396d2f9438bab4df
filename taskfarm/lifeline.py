"""The side of a launched controller or engine that ties it to its launcher.

A launcher (`taskfarm.cluster.launcher.ProcessSlot`) names itself in the
child's environment.  This module sits below both (the launcher imports
its names, the controller and engine call `follow_launcher`), so neither
imports the other.  A process started so (and only such a process, never
one run by hand in a terminal) calls `follow_launcher` at start, which:

- puts it in a process group of its own, so that the launcher can end it
  together with every process its tasks forked (SIGKILL to the group);
- asks Linux to SIGKILL it when the launcher dies (``PR_SET_PDEATHSIG``),
  and exits at once if the launcher is already gone, so that a launcher
  killed with kill -9 leaves no orphan controller or engine behind;
- if the launcher gave it a liveness pipe, writes a tick to it from the
  reactor every period.  A process whose reactor cannot run (a task in C
  code holding the GIL, SIGSTOP) stops ticking, and the launcher kills it.
  A tick that finds the launcher gone (a broken pipe) ends the process too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from twisted.internet import task
from twisted.logger import Logger

#: The pid of the launcher that started this process.
LAUNCHER_PID = "TASKFARM_LAUNCHER_PID"
#: The file descriptor this process writes its liveness ticks to.
LIVENESS_FD = "TASKFARM_LIVENESS_FD"
#: Seconds between two liveness ticks.
LIVENESS_PERIOD = "TASKFARM_LIVENESS_PERIOD"

#: prctl(2) option: the signal sent to this process when its parent dies.
_PR_SET_PDEATHSIG = 1

_log = Logger()


def follow_launcher(reactor, environ=None) -> bool:
    """Tie this process to the launcher named in `environ` (default: the
    process's environment); False when no launcher started it."""
    environ = os.environ if environ is None else environ
    # Taken out, so that programs our tasks run do not take our launcher
    # for theirs (a taskengine started by a task would exit at once).
    launcher = environ.pop(LAUNCHER_PID, "")
    fd = environ.pop(LIVENESS_FD, "")
    period = float(environ.pop(LIVENESS_PERIOD, "") or 1.0)
    if not launcher.isdigit():
        return False
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # already a group (or session) leader
    _die_with(int(launcher))
    if fd.isdigit():
        _start_ticking(reactor, int(fd), period)
    return True


def _die_with(launcher: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the liveness pipe still tells (engines)
    # The launcher may have died before prctl took effect: then nobody will
    # ever signal us, so look.
    if os.getppid() != launcher:
        print("the launcher (pid %d) is gone; exiting" % launcher, file=sys.stderr, flush=True)
        os._exit(1)


def _start_ticking(reactor, fd: int, period: float) -> None:
    os.set_inheritable(fd, False)  # not for programs that tasks run
    os.set_blocking(fd, False)  # a launcher that reads slowly never blocks us

    def tick() -> None:
        try:
            os.write(fd, b".")
        except BlockingIOError:
            pass  # the pipe is full of ticks already
        except OSError as e:
            # EPIPE: nobody reads any more, the launcher is gone.
            _log.error("the launcher's liveness pipe broke ({error}); exiting", error=e)
            os._exit(1)

    loop = task.LoopingCall(tick)
    loop.clock = reactor
    reactor.callWhenRunning(loop.start, period)
