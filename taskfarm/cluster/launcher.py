"""Start a controller and engines as child processes, and keep them running.

`Cluster` starts the controller, waits until it answers, starts N engines,
waits until all have registered, and then watches its children: one that
dies is started again after a back-off that doubles with each quick death.
`stop()` sends SIGTERM to every child (by PID) and SIGKILL to any still
alive after a grace period, so nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from twisted.internet import defer, error, protocol, task
from twisted.logger import Logger

from taskfarm.errors import TaskfarmError
from taskfarm.profile import ENGINE, TASK, Profile

#: Seconds to wait for the controller, and for the engines, to come up.
DEFAULT_START_TIMEOUT = 60.0


class ClusterError(TaskfarmError):
    """The cluster could not be started."""


class _Child(protocol.ProcessProtocol):
    """One child process; `ended` fires with its exit status."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.ended: defer.Deferred = defer.Deferred()
        self.last_pid: int | None = None
        self._log_file = open(log_path, "ab")

    def outReceived(self, data: bytes) -> None:
        self._log_file.write(data)
        self._log_file.flush()

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self._log_file.close()
        self.ended.callback(reason.value)

    @property
    def pid(self) -> int | None:
        return self.transport.pid if self.transport is not None else None

    def connectionMade(self) -> None:
        #: The pid, kept after the process ended (for the logs).
        self.last_pid = self.transport.pid


class ProcessSlot:
    """Keeps one kind of child running: starts it, restarts it when it dies."""

    _log = Logger()

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        reactor,
        env: dict | None = None,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.name = name
        self._argv = argv
        self._log_path = log_path
        self._reactor = reactor
        self._env = env
        self._first_delay, self._max_delay = backoff
        self._delay = self._first_delay
        self._restart_call = None
        self.child: _Child | None = None
        self.restarts = 0
        self.stopping = False
        #: Called with this slot when its child exits with status 0.
        self.on_clean_exit: list = []

    def start(self) -> None:
        self.child = _Child(self.name, self._log_path)
        self._reactor.spawnProcess(
            self.child,
            self._argv[0],
            self._argv,
            env=self._env if self._env is not None else os.environ.copy(),
        )
        started = self._reactor.seconds()
        self.child.ended.addCallback(self._ended, started)

    def _ended(self, reason, started: float) -> None:
        if self.stopping:
            return
        if isinstance(reason, error.ProcessDone):
            # A clean exit was asked for (MultiEngine kill): stay down.
            self._log.info("{name} (pid {pid}) exited cleanly", name=self.name, pid=self.child.last_pid)
            self.stopping = True
            for callback in self.on_clean_exit:
                callback(self)
            return
        lived = self._reactor.seconds() - started
        # A child that lived a while gets a fresh back-off.
        self._delay = self._first_delay if lived > 60 else min(self._delay * 2, self._max_delay)
        self._log.warn(
            "{name} (pid {pid}) ended ({reason}); starting it again in {delay:.1f} s",
            name=self.name,
            pid=self.child.last_pid,
            reason=reason,
            delay=self._delay,
        )
        self._restart_call = self._reactor.callLater(self._delay, self._restart)

    def _restart(self) -> None:
        self._restart_call = None
        if not self.stopping:
            self.restarts += 1
            self.start()

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    def signal(self, signum: int) -> None:
        """Send `signum` to this child, if it is alive."""
        if self.child is not None and self.child.transport is not None:
            try:
                self.child.transport.signalProcess(signum)
            except error.ProcessExitedAlready:
                pass

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; waits for the end."""
        self.stopping = True
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        child = self.child
        if child is None or child.ended.called:
            return
        self.signal(signal.SIGTERM)
        kill = self._reactor.callLater(grace, self.signal, signal.SIGKILL)
        waiter: defer.Deferred = defer.Deferred()
        child.ended.addBoth(lambda r: waiter.callback(None) or r)
        await waiter
        if kill.active():
            kill.cancel()


def twisted_argv(tapname: str, *options: str) -> list[str]:
    """The command line that runs a twistd plugin in the foreground."""
    return [sys.executable, "-m", "twisted", "--log-format", "text", tapname, *options]


class Cluster:
    """A controller and `n` engines on this machine, in one profile."""

    _log = Logger()

    def __init__(
        self,
        profile: Profile,
        n: int,
        reactor,
        controller_options: list[str] | None = None,
        engine_options: list[str] | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
    ) -> None:
        if n < 0:
            raise ValueError("the number of engines must be >= 0")
        self.profile = profile
        self.n = n
        self._reactor = reactor
        self._controller_options = controller_options or []
        self._engine_options = engine_options or []
        self._start_timeout = start_timeout
        self.controller: ProcessSlot | None = None
        self.engines: list[ProcessSlot] = []

    async def start(self) -> None:
        """Start everything; fires once all engines have registered."""
        self.profile.ensure()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.controller = ProcessSlot(
            "controller",
            twisted_argv(
                "taskcontroller",
                "--profile-dir",
                str(self.profile.root),
                *self._controller_options,
            ),
            self.profile.log_dir / "controller.out",
            self._reactor,
            env,
        )
        # A controller that exits cleanly was asked to (kill(controller=True)):
        # the whole cluster goes with it.
        self.controller.on_clean_exit.append(lambda _: self._controller_exited())
        self.controller.start()
        client = await self._wait_for_controller()
        try:
            for _ in range(self.n):
                self.add_engine(env)
            await self._wait_for_engines(client, self.n)
        finally:
            await client.disconnect()

    def add_engine(self, env: dict | None = None) -> ProcessSlot:
        """Start one more engine (kept running like the others)."""
        index = len(self.engines)
        slot = ProcessSlot(
            "engine %d" % index,
            twisted_argv(
                "taskengine",
                "--furl-file",
                str(self.profile.furl_file(ENGINE)),
                *self._engine_options,
            ),
            self.profile.log_dir / ("engine-%d.out" % index),
            self._reactor,
            env or dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        slot.start()
        self.engines.append(slot)
        return slot

    async def _wait_for_controller(self):
        from taskfarm.asyncclient import TaskClient

        deadline = self._reactor.seconds() + self._start_timeout
        furl_file = self.profile.furl_file(TASK)
        last_error: Exception | None = None
        while self._reactor.seconds() < deadline:
            if self.controller.child.ended.called:
                raise ClusterError(
                    "the controller exited at start; see %s"
                    % (self.profile.log_dir / "controller.out")
                )
            if furl_file.exists():
                client = TaskClient(
                    furl_file, self._reactor, connect_timeout=2.0, reconnect_timeout=2.0
                )
                try:
                    await client.engine_ids()
                    return client
                except TaskfarmError as e:
                    last_error = e
            await task.deferLater(self._reactor, 0.1, lambda: None)
        raise ClusterError(
            "the controller did not answer within %g s (%s); see %s"
            % (self._start_timeout, last_error, self.profile.log_dir / "controller.out")
        )

    async def _wait_for_engines(self, client, n: int) -> None:
        deadline = self._reactor.seconds() + self._start_timeout
        while self._reactor.seconds() < deadline:
            if len(await client.engine_ids()) >= n:
                return
            await task.deferLater(self._reactor, 0.1, lambda: None)
        raise ClusterError(
            "only %d of %d engines registered within %g s; see the logs in %s"
            % (len(await client.engine_ids()), n, self._start_timeout, self.profile.log_dir)
        )

    def _controller_exited(self) -> None:
        self._log.info("the controller exited cleanly; stopping the cluster")
        # A signal that stopped the controller may be stopping us too: let
        # that stop go first, and do nothing if it did.
        self._reactor.callLater(0.5, self._stop_reactor)

    def _stop_reactor(self) -> None:
        try:
            self._reactor.stop()
        except error.ReactorNotRunning:
            pass

    @property
    def engine_restarts(self) -> int:
        """How many times engines were started again after dying."""
        return sum(slot.restarts for slot in self.engines)

    async def stop(self) -> None:
        """Stop the engines, then the controller; leaves no process behind."""
        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(slot.stop()) for slot in self.engines]
        )
        if self.controller is not None:
            await self.controller.stop()
