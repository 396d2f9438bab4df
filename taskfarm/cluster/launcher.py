"""`Cluster`: a controller on this machine and engines from a launcher.

`Cluster` starts the controller (a `ProcessSlot`: started again after a
crash), waits until it answers, has its launcher (`IEngineLauncher`, by
default `taskfarm.cluster.local.LocalLauncher`) start N engines, and waits
until all have registered.  A controller stopped for a MultiEngine
``kill(controller=True)``, or by a person's SIGTERM, stays down and ends
the cluster; one that refuses to start ends it too.  `stop()` stops the
engines through the launcher, then the controller.

The process machinery lives in `taskfarm.cluster.slots` (re-exported here).
"""

from __future__ import annotations

import ipaddress
import os

from twisted.internet import defer, task
from twisted.logger import Logger

from taskfarm.cluster.local import LocalLauncher
from taskfarm.cluster.slots import (  # noqa: F401  (re-exported)
    DEFAULT_START_TIMEOUT,
    ClusterError,
    ProcessSlot,
    SlotState,
    process_start_time,
    twisted_argv,
)
from taskfarm.controller.registry import DEFAULT_HEARTBEAT_TIMEOUT
from taskfarm.errors import TaskfarmError
from taskfarm.profile import ENGINE, TASK, Profile, in_use_error, read_holder


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in ("localhost", "") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assumed reachable


def furl_locations(furl: str) -> list[str]:
    """The HOST:PORT connection hints of a furl (``pb://TUB@HINTS/NAME``)."""
    hints = furl.partition("@")[2].partition("/")[0]
    found = []
    for hint in hints.split(","):
        if hint.startswith("tcp:"):  # tcp:HOST:PORT (or tcp:host=H:port=P)
            hint = hint[4:].replace("host=", "").replace("port=", "")
        if hint:
            found.append(hint)
    return found


def _unreachable(launcher, location: str) -> ClusterError:
    return ClusterError(
        "the %s launcher starts engines on other machines, but the controller's location is "
        "%s (loopback), which they cannot reach: start the controller listening on an address "
        "of this machine that the nodes can reach, e.g. --listen tcp:10105:interface=ADDRESS "
        "(and --location HOST:PORT if they dial it by another name)"
        % (getattr(launcher, "name", type(launcher).__name__), location)
    )


def check_options_reach(launcher, controller_options: list[str]) -> None:
    """Before the controller starts: `ClusterError` when `launcher` is
    remote and the controller options (``--listen``/``--location``, default
    loopback) give it a loopback location."""
    if not getattr(launcher, "remote", False):
        return
    values = dict(zip(controller_options[::2], controller_options[1::2], strict=False))
    if "--location" in values:
        where = values["--location"]
        host = where.rpartition(":")[0] or where
    elif "--listen" in values:
        where = values["--listen"]
        interfaces = [p[len("interface="):] for p in where.split(":") if p.startswith("interface=")]
        host = interfaces[0] if interfaces else "127.0.0.1"
    else:
        where = host = "127.0.0.1 (the default --listen)"
        host = "127.0.0.1"
    if _is_loopback(host):
        raise _unreachable(launcher, where)


def check_reachable(launcher, furl: str) -> None:
    """`ClusterError` when `launcher` is remote and every location of the
    controller's `furl` is loopback: engines elsewhere could not reach it."""
    if not getattr(launcher, "remote", False):
        return
    locations = furl_locations(furl)
    if all(_is_loopback(where.rpartition(":")[0]) for where in locations):
        raise _unreachable(launcher, ",".join(locations) or "unknown")


class Cluster:
    """A controller on this machine and `n` engines from `launcher` (an
    `IEngineLauncher`; default: a `LocalLauncher`), in one profile.

    With the default launcher, engines are watched by liveness ticks: one
    silent for `engine_timeout` seconds (the controller's heartbeat
    timeout) is SIGKILLed and started again; None turns that off.
    `finished` fires with the exit status the launcher should end with,
    once the cluster cannot go on by itself: 0 after the controller stopped
    for a MultiEngine ``kill(controller=True)`` or for a SIGTERM from
    outside (`stopped_by` says which), 1 after a restarted controller
    refused to start (its message logged).
    """

    _log = Logger()

    def __init__(
        self,
        profile: Profile,
        n: int,
        reactor,
        controller_options: list[str] | None = None,
        engine_options: list[str] | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        engine_timeout: float | None = DEFAULT_HEARTBEAT_TIMEOUT,
        launcher=None,
    ) -> None:
        if n < 0:
            raise ValueError("the number of engines must be >= 0")
        self.profile = profile
        self.n = n
        self._reactor = reactor
        self._controller_options = controller_options or []
        self._engine_options = engine_options or []
        self._start_timeout = start_timeout
        #: Starts, watches and stops the engines (`IEngineLauncher`).
        self.launcher = (
            launcher
            if launcher is not None
            else LocalLauncher(reactor, profile, {}, engine_timeout=engine_timeout)
        )
        self.controller: ProcessSlot | None = None
        self.finished: defer.Deferred = defer.Deferred()
        #: The controller's last words if it refused to start.
        self.refused: str | None = None
        #: Why the controller stopped for good, once it did (for the user).
        self.stopped_by: str | None = None
        #: Called (no arguments) once the controller holds the profile and
        #: answers, before the engines start.
        self.on_controller_up: list = []

    @property
    def engines(self) -> list[ProcessSlot]:
        """The engine slots of a local launcher (empty for others)."""
        return list(getattr(self.launcher, "slots", []))

    async def start(self) -> None:
        """Start everything; fires once all engines have registered."""
        self.profile.ensure()
        holder = read_holder(self.profile)
        if holder is not None:
            # Say so at once: its furl files would lead us to the other one.
            raise ClusterError(str(in_use_error(self.profile, holder)))
        check_options_reach(self.launcher, self._controller_options)
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
        # kill(controller=True), or a person's SIGTERM: the cluster goes with it.
        self.controller.on_killed.append(lambda _: self._controller_exited())
        self.controller.on_terminated.append(self._controller_terminated)
        self.controller.on_refused.append(self._controller_refused)
        self.controller.start()
        client = await self._wait_for_controller()
        try:
            for callback in self.on_controller_up:
                callback()
            furl_file = self.profile.furl_file(ENGINE)
            check_reachable(self.launcher, furl_file.read_text().strip())
            await self.launcher.start(self.n, furl_file, list(self._engine_options))
            await self._wait_for_engines(client, self.n)
        finally:
            await client.disconnect()

    def _ours(self) -> bool:
        # The lock file names the controller holding the profile: until it
        # names ours, the furl files may still be another controller's.
        holder = read_holder(self.profile)
        return holder is not None and holder.pid == self.controller.pid

    async def _wait_for_controller(self):
        from taskfarm.asyncclient import TaskClient

        deadline = self._reactor.seconds() + self._start_timeout
        furl_file = self.profile.furl_file(TASK)
        last_error: Exception | None = None
        while self._reactor.seconds() < deadline:
            self._check_not_finished()
            if self.controller.child.ended.called:
                if self.refused is not None:
                    raise ClusterError("the controller refused to start: %s" % self.refused)
                raise ClusterError(
                    "the controller exited at start; see %s"
                    % (self.profile.log_dir / "controller.out")
                )
            if furl_file.exists() and self._ours():
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

    def _check_not_finished(self) -> None:
        # The controller stopped for good while we wait: say why.
        if self.finished.called:
            if self.refused is not None:
                raise ClusterError("the controller refused to start: %s" % self.refused)
            raise ClusterError(self.stopped_by or "the controller stopped")

    async def _wait_for_engines(self, client, n: int) -> None:
        deadline = self._reactor.seconds() + self._start_timeout
        registered, last_error = 0, None
        while self._reactor.seconds() < deadline:
            self._check_not_finished()
            try:
                registered = len(await client.engine_ids())
            except TaskfarmError as e:
                # Restarting after a crash, or stopped: the loop tells.
                last_error = e
            else:
                if registered >= n:
                    return
            await task.deferLater(self._reactor, 0.1, lambda: None)
        raise ClusterError(
            "only %d of %d engines registered within %g s%s; see the logs in %s"
            % (
                registered,
                n,
                self._start_timeout,
                " (%s)" % last_error if last_error is not None else "",
                self.profile.log_dir,
            )
        )

    def _controller_exited(self) -> None:
        self.stopped_by = "the controller stopped as a MultiEngine kill asked"
        self._log.info("the controller stopped as a MultiEngine kill asked; stopping the cluster")
        if not self.finished.called:
            self.finished.callback(0)

    def _controller_terminated(self, slot: ProcessSlot) -> None:
        self.stopped_by = (
            "the controller (pid %s) was stopped by a SIGTERM from outside (kill); "
            "it is not restarted" % slot.child.last_pid
        )
        self._log.info("{why}; stopping the cluster", why=self.stopped_by)
        if not self.finished.called:
            self.finished.callback(0)

    def _controller_refused(self, slot: ProcessSlot, words: str) -> None:
        self.refused = words
        # At start, `_wait_for_controller` reports it; later, we stop.
        if self.controller is not None and not self.finished.called:
            self.finished.callback(1)

    def add_engines(self, count: int) -> defer.Deferred:
        """Start `count` more engines with this cluster's launcher, once it
        runs; fires when they were started (they register later)."""
        furl_file = self.profile.furl_file(ENGINE)
        return self.launcher.start(count, furl_file, list(self._engine_options))

    @property
    def engine_restarts(self) -> int:
        """How many times engines were started again after dying."""
        return getattr(self.launcher, "restarts", 0)

    async def stop(self) -> None:
        """Stop the engines, then the controller; leaves no process behind."""
        await self.launcher.stop()
        if self.controller is not None:
            await self.controller.stop()
