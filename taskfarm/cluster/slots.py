"""Child processes kept running: `ProcessSlot`, and what launchers share.

A `ProcessSlot` starts one kind of child (a controller, an engine), starts
it again when it dies, after a back-off that doubles with each quick death,
unless its exit status says otherwise (`taskfarm.exitcodes`).  A child whose
liveness ticks stop (hung) is SIGKILLed with its process group and so
started again.  `stop()` sends SIGTERM (by PID) and SIGKILL to its process
group if it is still alive after a grace period, so nothing is left behind,
not even processes that tasks forked.  Children die with their launcher
(`taskfarm.lifeline`).

`taskfarm.cluster.launcher.Cluster` (the controller) and
`taskfarm.cluster.local.LocalLauncher` (engines) are built on it; this
module imports neither, so that every launcher may import it.
"""

from __future__ import annotations

import enum
import os
import signal
import sys
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger

from taskfarm import backoff as backoffs
from taskfarm import exitcodes, lifeline, states
from taskfarm.childprocess import GroupChild, exit_status
from taskfarm.errors import TaskfarmError
from taskfarm.logfiles import rotating_file

#: Seconds to wait for the controller, and for the engines, to come up.
DEFAULT_START_TIMEOUT = 60.0


class ClusterError(TaskfarmError):
    """The cluster could not be started (or a launcher could not start its
    engines): the message names the problem."""


def process_start_time(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, from
    /proc/PID/stat), which tells it from a later process given the same
    pid; None when there is no such process."""
    try:
        text = Path("/proc/%d/stat" % pid).read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: split after its ')'.
    fields = text.rpartition(")")[2].split()
    return None if fields[0] == "Z" else fields[19]


def process_alive(pid: int | None, started: str | None = None) -> bool:
    """Whether process `pid` runs (and, given `started`, is the one that
    started then, not a later one given the same pid)."""
    if not pid or pid <= 0:
        return False
    now = process_start_time(pid)
    return now is not None and (started is None or now == started)


def signal_if_alive(pid: int | None, started: str | None, signum: int) -> bool:
    """Send `signum` to `pid` only if it is still the process that started
    at `started` (see `process_alive`); whether it was sent."""
    if not process_alive(pid, started):
        return False
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True


#: The child's file descriptor for liveness ticks (see `taskfarm.lifeline`).
_LIVENESS_FD = 3

#: The last bytes of a child's output kept in memory, to quote its last words.
_TAIL_BYTES = 4096

#: Seconds the launcher keeps reading a child's pipes after it exited
#: before it closes them (processes it forked may hold them for good).
_PIPE_GRACE = 1.0


class _Child(GroupChild):
    """One child process; `ended` fires with its exit reason when it exits.

    `ended` follows the process itself (``processExited``), never its pipes,
    which processes it forked may keep open.  On exit whatever is left of
    its process group is SIGKILLed, and its pipes are closed shortly after.
    With `liveness_timeout`, the child ticks on a pipe of its own and is
    SIGKILLed (with its group) when no tick came for that long.
    """

    _log = Logger()

    def __init__(
        self,
        name: str,
        log_path: Path,
        reactor,
        liveness_timeout: float | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
    ) -> None:
        super().__init__()
        self.name = name
        #: Set when the launcher killed the child for not ticking.
        self.silenced = False
        self._reactor = reactor
        # Appended to across restarts of the slot; rotated by size.
        self._log_file = rotating_file(Path(log_path))
        self._tail = bytearray()
        self._liveness_timeout = liveness_timeout
        self._start_timeout = start_timeout
        self._watchdog = None

    def connectionMade(self) -> None:
        super().connectionMade()
        if self._liveness_timeout is not None:
            # Until the first tick the process is starting (imports, ...).
            self._watchdog = self._reactor.callLater(self._start_timeout, self._silent)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == _LIVENESS_FD:
            if self._watchdog is not None and self._watchdog.active():
                self._watchdog.reset(self._liveness_timeout)
            return
        self._tail += data
        del self._tail[:-_TAIL_BYTES]
        if not self._log_file.closed:
            self._log_file.write(data)  # unbuffered

    def last_words(self) -> str:
        """The last non-empty line the child wrote."""
        lines = [x for x in self._tail.decode(errors="replace").splitlines() if x.strip()]
        return lines[-1].strip() if lines else ""

    def _silent(self) -> None:
        self._watchdog = None
        self.silenced = True
        self._log.warn(
            "{name} (pid {pid}) sent no liveness tick for {timeout:.1f} s (hung: C code "
            "holding the GIL, or stopped); killing its process group",
            name=self.name,
            pid=self.last_pid,
            timeout=self._liveness_timeout,
        )
        self.kill()

    def kill(self) -> None:
        """SIGKILL the child and its process group."""
        self.signal_group(signal.SIGKILL)
        super().kill()

    def processExited(self, reason) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        # Processes its tasks forked end with it.
        self.end_with_process(reason, self._reactor, _PIPE_GRACE)

    def processEnded(self, reason) -> None:
        self._log_file.close()
        super().processEnded(reason)


class SlotState(enum.Enum):
    """Where a `ProcessSlot` is in its child's lifecycle."""

    #: Made, not started yet.
    IDLE = "idle"
    #: Its child process runs (or is starting).
    RUNNING = "running"
    #: Its child ended; a fresh one starts after the back-off delay.
    RESTARTING = "restarting"
    #: `stop()` was called; waiting for the child to exit.
    STOPPING = "stopping"
    #: Stopped by `stop()`; nothing runs.
    STOPPED = "stopped"
    #: The child exited with `EXIT_KILLED` (a MultiEngine kill): stays down.
    KILLED = "killed"
    #: The child exited with `EXIT_REFUSED`: the slot gave up on it.
    REFUSED = "refused"
    #: The child exited and the slot restarts nothing (``restart=False``).
    EXITED = "exited"
    #: The child exited with `EXIT_TERMINATED` (a SIGTERM this launcher
    #: did not send: a person's ``kill``): stays down.
    TERMINATED = "terminated"


#: The slot's lifecycle: (state, event) -> the next state.  Every other
#: pair is a bug (`states.InvalidTransition`).  The down states take `stop`
#: and stay what they are.
_SLOT_TRANSITIONS = {
    (SlotState.IDLE, "start"): SlotState.RUNNING,
    (SlotState.IDLE, "stop"): SlotState.STOPPED,
    (SlotState.RUNNING, "died"): SlotState.RESTARTING,
    (SlotState.RUNNING, "exited"): SlotState.EXITED,
    (SlotState.RUNNING, "killed"): SlotState.KILLED,
    (SlotState.RUNNING, "refused"): SlotState.REFUSED,
    (SlotState.RUNNING, "terminated"): SlotState.TERMINATED,
    (SlotState.RUNNING, "stop"): SlotState.STOPPING,
    (SlotState.RESTARTING, "restart"): SlotState.RUNNING,
    (SlotState.RESTARTING, "stop"): SlotState.STOPPED,
    (SlotState.STOPPING, "ended"): SlotState.STOPPED,
    (SlotState.STOPPING, "stop"): SlotState.STOPPING,
    (SlotState.STOPPED, "stop"): SlotState.STOPPED,
    (SlotState.KILLED, "stop"): SlotState.KILLED,
    (SlotState.REFUSED, "stop"): SlotState.REFUSED,
    (SlotState.EXITED, "stop"): SlotState.EXITED,
    (SlotState.TERMINATED, "stop"): SlotState.TERMINATED,
}

#: The states in which a slot never starts its child again.
_DOWN = frozenset(
    {
        SlotState.STOPPING,
        SlotState.STOPPED,
        SlotState.KILLED,
        SlotState.REFUSED,
        SlotState.EXITED,
        SlotState.TERMINATED,
    }
)


class ProcessSlot:
    """Keeps one kind of child running: starts it, restarts it when it dies.

    The exit protocol (`taskfarm.exitcodes`) decides: `EXIT_KILLED` stays
    down (`on_killed` callbacks), `EXIT_REFUSED` stays down (`on_refused`
    callbacks, with the child's last words), `EXIT_TERMINATED` (a person's
    SIGTERM) stays down (`on_terminated` callbacks); any other exit, 0 and signals
    included, is started again after a back-off that doubles with each
    quick death (`taskfarm.backoff`), unless `restart` is False.  With
    `liveness_timeout`, a child that stops ticking for that long is
    SIGKILLed (its process group with it) and so restarted.  The lifecycle
    is the state table `_SLOT_TRANSITIONS`; `state` says where it is.
    """

    _log = Logger()

    #: A child that lived longer than this many seconds gets a fresh back-off.
    LONG_LIFE = 60.0

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        reactor,
        env: dict | None = None,
        backoff: tuple[float, float] = (0.5, 30.0),
        liveness_timeout: float | None = None,
        restart: bool = True,
    ) -> None:
        self.name = name
        self._argv = argv
        self._log_path = log_path
        self._reactor = reactor
        self._env = env
        self._delay_for = backoffs.policy(*backoff)
        #: Quick deaths in a row: the back-off attempt of the next restart.
        self._quick_deaths = 0
        self._liveness_timeout = liveness_timeout
        self._restart = restart
        self._restart_call = None
        self.state = SlotState.IDLE
        self.child: _Child | None = None
        self.restarts = 0
        #: Called with this slot when its child exits with `EXIT_KILLED`.
        self.on_killed: list = []
        #: Called with this slot and the child's last words when it exits
        #: with `EXIT_REFUSED`.
        self.on_refused: list = []
        #: Called with this slot when its child exits with `EXIT_TERMINATED`.
        self.on_terminated: list = []
        #: Called with this slot and the exit reason each time its child
        #: ends, whatever comes next (after the state moved).
        self.on_ended: list = []
        #: Times the child was killed for sending no liveness tick.
        self.hung_kills = 0

    @property
    def stopping(self) -> bool:
        """True once this slot will not start its child again."""
        return self.state in _DOWN

    def _move(self, event: str) -> SlotState:
        self.state = states.move(_SLOT_TRANSITIONS, self.state, event, self.name)
        return self.state

    def start(self) -> None:
        """Start the child (once; the slot restarts it by itself)."""
        self._move("start")
        self._spawn()

    def _spawn(self) -> None:
        self.child = _Child(self.name, self._log_path, self._reactor, self._liveness_timeout)
        env = dict(self._env if self._env is not None else os.environ)
        env[lifeline.LAUNCHER_PID] = str(os.getpid())
        env.pop(lifeline.LIVENESS_FD, None)
        child_fds = {0: "w", 1: "r", 2: "r"}
        if self._liveness_timeout is not None:
            child_fds[_LIVENESS_FD] = "r"
            env[lifeline.LIVENESS_FD] = str(_LIVENESS_FD)
            env[lifeline.LIVENESS_PERIOD] = repr(min(1.0, self._liveness_timeout / 4))
        self._reactor.spawnProcess(
            self.child, self._argv[0], self._argv, env=env, childFDs=child_fds
        )
        started = self._reactor.seconds()
        self.child.ended.addCallback(self._ended, self.child, started)

    def _ended(self, reason, ended: _Child, started: float) -> None:
        self._next(reason, ended, started)
        for callback in self.on_ended:
            callback(self, reason)

    def _next(self, reason, ended: _Child, started: float) -> None:
        if ended.silenced:
            self.hung_kills += 1
        if self.state is SlotState.STOPPING:
            self._move("ended")
            return
        status = exit_status(reason)
        if status == exitcodes.EXIT_TERMINATED:
            self._move("terminated")
            self._log.info(
                "{name} (pid {pid}) was stopped by a SIGTERM this launcher did not send; "
                "it stays down",
                name=self.name,
                pid=ended.last_pid,
            )
            for callback in self.on_terminated:
                callback(self)
            return
        if status == exitcodes.EXIT_KILLED:
            self._move("killed")
            self._log.info(
                "{name} (pid {pid}) stopped as a MultiEngine kill asked; it stays down",
                name=self.name,
                pid=ended.last_pid,
            )
            for callback in self.on_killed:
                callback(self)
            return
        if status == exitcodes.EXIT_REFUSED:
            self._move("refused")
            words = ended.last_words()
            self._log.error(
                "{name} (pid {pid}) refused to start: {words}",
                name=self.name,
                pid=ended.last_pid,
                words=words,
            )
            for callback in self.on_refused:
                callback(self, words)
            return
        if not self._restart:
            self._move("exited")
            return
        self._move("died")
        lived = self._reactor.seconds() - started
        # A child that lived a while gets a fresh back-off.
        self._quick_deaths = 0 if lived > self.LONG_LIFE else self._quick_deaths + 1
        delay = self._delay_for(self._quick_deaths)
        self._log.warn(
            "{name} (pid {pid}) ended ({reason}); starting it again in {delay:.1f} s",
            name=self.name,
            pid=ended.last_pid,
            reason=reason,
            delay=delay,
        )
        self._restart_call = self._reactor.callLater(delay, self._restart_now)

    def _restart_now(self) -> None:
        self._restart_call = None
        self._move("restart")
        self.restarts += 1
        self._spawn()

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    def signal(self, signum: int) -> None:
        """Send `signum` to this child, if it is alive."""
        if self.child is not None:
            self.child.signal(signum)

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL (to its process group) after `grace`
        seconds; waits for the process to exit, not for its pipes."""
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        self._restart_call = None
        child = self.child
        if self._move("stop") is not SlotState.STOPPING or child is None or child.ended.called:
            return
        self.signal(signal.SIGTERM)
        kill = self._reactor.callLater(grace, child.kill)
        waiter: defer.Deferred = defer.Deferred()
        child.ended.addBoth(lambda r: waiter.callback(None) or r)
        await waiter
        if kill.active():
            kill.cancel()


def twisted_argv(tapname: str, *options: str) -> list[str]:
    """The command line that runs a twistd plugin in the foreground."""
    return [sys.executable, "-m", "twisted", "--log-format", "text", tapname, *options]


