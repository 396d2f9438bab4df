"""The ssh launcher: engines on other machines, one ssh connection per host.

``--hosts node1:4,user@node2:8`` names the hosts and how many engines each
runs.  For each host the launcher runs the system OpenSSH client::

    ssh -T -o BatchMode=yes [-p PORT] [-i KEY] [-o UserKnownHostsFile=FILE]
        [-o OPTION=VALUE ...] -- [USER@]HOST 'exec PYTHON -m taskfarm.cluster.sshremote'

and speaks JSON lines with `taskfarm.cluster.sshremote` over that one
connection: the first line it sends carries the engine furl, which the
host writes to a 0600 file in a private folder and hands to its engines
as ``--furl-file``.  So the furl is in no process's argv or environment,
here or there.  One connection per host, not per engine: a host of 16
engines costs one ssh login (sshd's ``MaxStartups`` refuses bursts of
logins), and the host side ends all its engines at once when the
connection goes.

Host keys are checked as ssh checks them: the user's ``known_hosts`` (or
``--ssh-known-hosts FILE``); ``BatchMode`` makes an unknown or changed key
fail at once instead of asking.  ``StrictHostKeyChecking=no`` is refused:
the connection carries the furl.

Both ends tick every second.  The host side ends its engines after
``timeout`` seconds without a word from the launcher (a cut network, which
sshd may not notice for a long time) or when stdin closes; the launcher
kills an ssh that said nothing for ``timeout`` seconds.  An engine that
ends is reported (`watch`) and started again on its host after the
back-off of the local launcher (`taskfarm.backoff`: doubling with each
quick death, fresh after a long life); an ssh connection that ends is
reported for each of its engines and made again the same way.  After
`max_quick_failures` quick failures in a row the launcher gives up on that
engine or host, and says so.  Exit status 76 (a MultiEngine kill) and 78
(refused) stay down, as for local engines.
"""

from __future__ import annotations

import enum
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from taskfarm import backoff as backoffs
from taskfarm import exitcodes
from taskfarm.childprocess import ChildProcess
from taskfarm.cluster.launcher import DEFAULT_START_TIMEOUT, ClusterError
from taskfarm.cluster.slots import process_start_time, signal_if_alive
from taskfarm.cluster.sshhosts import (
    OPTIONS,
    SSHHost,
    SSHSettings,
    check_reachable,
    hosts_and_settings,
    parse_hosts,
    place,
)
from taskfarm.controller.registry import DEFAULT_HEARTBEAT_TIMEOUT
from taskfarm.interfaces import IEngineLauncher
from taskfarm.logfiles import LogClaim, claim_log_name, rotating_file

#: A child that lived longer than this many seconds gets a fresh back-off.
LONG_LIFE = 60.0

#: Quick failures in a row after which an engine or a host is given up.
DEFAULT_MAX_QUICK_FAILURES = 8

#: Seconds between two ticks to each host.
TICK_PERIOD = 1.0

#: The last bytes of ssh's own output kept, to quote its last words.
_TAIL_BYTES = 4096


# -- one host -----------------------------------------------------------------------------


class HostState(enum.Enum):
    """Where a `HostSlot`'s ssh connection is."""

    IDLE = "idle"
    #: ssh runs; the host has not yet started all its engines.
    CONNECTING = "connecting"
    RUNNING = "running"
    #: ssh ended; a fresh one starts after the back-off delay.
    RECONNECTING = "reconnecting"
    #: Too many quick failures in a row: nothing runs there any more.
    GAVE_UP = "gave up"
    STOPPING = "stopping"
    STOPPED = "stopped"


class EngineState(enum.Enum):
    """Where one engine of a host is."""

    STARTING = "starting"
    RUNNING = "running"
    #: It ended; started again after the back-off (or with the connection).
    RESTARTING = "restarting"
    #: Down for good: killed (76), refused (78), or given up.
    DOWN = "down"


@dataclass
class _Engine:
    index: int
    label: str
    state: EngineState = EngineState.STARTING
    pid: int | None = None
    started_at: float = 0.0
    quick_failures: int = 0
    restart_call: object = None
    log: object = None


class _SSHProcess(ChildProcess):
    """One ssh client process; lines from the host go to its slot."""

    def __init__(self, slot: HostSlot) -> None:
        super().__init__()
        self._slot = slot
        self._partial = b""
        self._tail = bytearray()
        self.last_pid: int | None = None
        #: Why the launcher killed it for silence, if it did.
        self.silenced: str | None = None

    def connectionMade(self) -> None:
        self.last_pid = self.transport.pid

    def send(self, message: dict) -> None:
        if self.transport is not None and not self.ended.called:
            try:
                self.transport.write(json.dumps(message).encode() + b"\n")
            except Exception:
                pass  # its stdin is closed: it is ending

    def close_stdin(self) -> None:
        if self.transport is not None:
            self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self._slot.line_received(self, line)

    def errReceived(self, data: bytes) -> None:
        self._tail += data
        del self._tail[:-_TAIL_BYTES]
        self._slot.ssh_output(data)

    def last_words(self) -> str:
        lines = [x for x in self._tail.decode(errors="replace").splitlines() if x.strip()]
        return lines[-1].strip() if lines else ""


class HostSlot:
    """Keeps `count` engines running on one host over one ssh connection."""

    _log = Logger()

    def __init__(
        self,
        host: SSHHost,
        indexes: list[int],
        settings: SSHSettings,
        furl: str,
        engine_options: list[str],
        reactor,
        log_dir: Path | None,
        report,
        timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        backoff: tuple[float, float] = (0.5, 30.0),
        max_quick_failures: int = DEFAULT_MAX_QUICK_FAILURES,
        grace: float = 5.0,
    ) -> None:
        self.host = host
        self.settings = settings
        self._furl = furl
        self._engine_options = list(engine_options)
        self._reactor = reactor
        self._log_dir = log_dir
        self._report = report
        self._timeout = timeout
        self._start_timeout = start_timeout
        self._delay_for = backoffs.policy(*backoff)
        self._max_quick = max_quick_failures
        self._grace = grace
        self.state = HostState.IDLE
        self.engines = {i: _Engine(i, "%s engine %d" % (host.address, i)) for i in indexes}
        self.process: _SSHProcess | None = None
        #: The host's private folder (its furl file), while connected.
        self.folder: str | None = None
        #: The pid of `taskfarm.cluster.sshremote` on the host, while connected.
        self.remote_pid: int | None = None
        self.quick_failures = 0
        self.connects = 0
        self._connected_at = 0.0
        self._silence = None
        self._ticker = None
        self._reconnect_call = None
        self._ssh_log = None
        self._claims: list[LogClaim] = []
        #: Fires once every engine was started the first time, or fails
        #: with `ClusterError` if the first connection failed.
        self.started: defer.Deferred = defer.Deferred()

    @property
    def label(self) -> str:
        return self.host.address

    # -- connecting

    def start(self) -> None:
        self.connect()

    def connect(self) -> None:
        self._reconnect_call = None
        self.state = HostState.CONNECTING
        self.connects += 1
        self.folder = None
        process = _SSHProcess(self)
        self.process = process
        argv = self.settings.argv(self.host)
        if self._log_dir is not None and self._ssh_log is None:
            self._ssh_log = self._claimed_log("ssh-%s" % self.host.address, 0)
        self._reactor.spawnProcess(
            process, argv[0], argv, env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r"}
        )
        self._connected_at = self._reactor.seconds()
        process.ended.addCallback(self._ssh_ended, process)
        wanted = [e.index for e in self.engines.values() if e.state is not EngineState.DOWN]
        for index in wanted:
            engine = self.engines[index]
            engine.state = EngineState.STARTING
            self._cancel(engine, "restart_call")
        process.send(
            {
                "config": {
                    "furl": self._furl,
                    "engines": wanted,
                    "options": self._engine_options,
                    "timeout": self._timeout,
                    "grace": self._grace,
                }
            }
        )
        self._silence = self._reactor.callLater(self._start_timeout, self._silent, process)
        self._tick(process)

    def _tick(self, process: _SSHProcess) -> None:
        if process is not self.process or process.ended.called:
            return
        process.send({"tick": 1})
        self._ticker = self._reactor.callLater(
            min(TICK_PERIOD, self._timeout / 4), self._tick, process
        )

    def _silent(self, process: _SSHProcess) -> None:
        self._silence = None
        if process is not self.process or process.ended.called:
            return
        timeout = self._start_timeout if self.state is HostState.CONNECTING else self._timeout
        self._log.warn(
            "ssh to {host} (pid {pid}): no word from the host for {timeout:.1f} s; killing it",
            host=self.label,
            pid=process.last_pid,
            timeout=timeout,
        )
        process.silenced = "no word from the host for %g s" % timeout
        process.kill()

    def _claimed_log(self, prefix: str, start: int):
        """A rotating ``PREFIX-N.out`` (N >= `start`) no other launcher on
        this profile holds (`claim_log_name`), held until `stop`."""
        claim = claim_log_name(self._log_dir, prefix.replace(os.sep, "_"), start)
        self._claims.append(claim)
        return rotating_file(claim.path)

    def ssh_output(self, data: bytes) -> None:
        if self._ssh_log is not None and not self._ssh_log.closed:
            self._ssh_log.write(data)  # unbuffered

    # -- from the host

    def line_received(self, process: _SSHProcess, line: bytes) -> None:
        if process is not self.process:
            return
        if self._silence is not None and self._silence.active():
            self._silence.reset(
                self._start_timeout if self.state is HostState.CONNECTING else self._timeout
            )
        try:
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError(line)
            if "ready" in message:
                self.folder = str(message["ready"])
                self.remote_pid = message.get("pid")
            elif "started" in message:
                self._engine_started(int(message["started"]), int(message["pid"]))
            elif "ended" in message:
                self._engine_ended(
                    int(message["ended"]), message.get("status"), message.get("signal")
                )
            elif "out" in message:
                self._engine_output(int(message["out"]), str(message.get("text", "")))
        except (ValueError, TypeError, KeyError):
            # Not ours: a login script's chatter on stdout, say.
            self.ssh_output(b"[not from taskfarm] " + line + b"\n")

    def _engine_started(self, index: int, pid: int) -> None:
        engine = self.engines.get(index)
        if engine is None:
            return
        engine.state = EngineState.RUNNING
        engine.pid = pid
        engine.started_at = self._reactor.seconds()
        if self.state is HostState.CONNECTING and all(
            e.state in (EngineState.RUNNING, EngineState.DOWN) for e in self.engines.values()
        ):
            self.state = HostState.RUNNING
            if self._silence is not None and self._silence.active():
                self._silence.reset(self._timeout)
            if not self.started.called:
                self.started.callback(None)

    def _engine_output(self, index: int, text: str) -> None:
        engine = self.engines.get(index)
        if engine is None or self._log_dir is None:
            return
        if engine.log is None:
            # Its own file, even beside another launcher to this host.
            engine.log = self._claimed_log("ssh-%s-engine" % self.host.address, index)
        if not engine.log.closed:
            engine.log.write(text.encode() + b"\n")  # unbuffered

    def _engine_ended(self, index: int, status, signum) -> None:
        engine = self.engines.get(index)
        if engine is None or engine.state not in (EngineState.RUNNING, EngineState.STARTING):
            return
        pid, engine.pid = engine.pid, None
        reason = "exit status %s" % status if status is not None else "signal %s" % signum
        if self.state in (HostState.STOPPING, HostState.STOPPED):
            engine.state = EngineState.RESTARTING
            return
        if status in (exitcodes.EXIT_KILLED, exitcodes.EXIT_REFUSED):
            engine.state = EngineState.DOWN
            why = (
                "stopped by a MultiEngine kill"
                if status == exitcodes.EXIT_KILLED
                else "refused to start"
            )
            self._report(engine.label, "%s (pid %s) %s; it stays down" % (engine.label, pid, why))
            return
        lived = self._reactor.seconds() - engine.started_at
        engine.quick_failures = 0 if lived > LONG_LIFE else engine.quick_failures + 1
        if engine.quick_failures >= self._max_quick:
            engine.state = EngineState.DOWN
            self._report(
                engine.label,
                "%s (pid %s) ended (%s); gave up after %d quick failures in a row"
                % (engine.label, pid, reason, engine.quick_failures),
            )
            return
        engine.state = EngineState.RESTARTING
        delay = self._delay_for(engine.quick_failures)
        self._log.warn(
            "{label} (pid {pid}) ended ({reason}); starting it again in {delay:.1f} s",
            label=engine.label,
            pid=pid,
            reason=reason,
            delay=delay,
        )
        self._report(engine.label, "%s (pid %s) ended (%s)" % (engine.label, pid, reason))
        engine.restart_call = self._reactor.callLater(delay, self._restart_engine, engine)

    def _restart_engine(self, engine: _Engine) -> None:
        engine.restart_call = None
        if self.state is not HostState.RUNNING or engine.state is not EngineState.RESTARTING:
            return  # the connection's end took it over
        engine.state = EngineState.STARTING
        self.process.send({"start": engine.index})

    # -- the connection's end

    def _ssh_ended(self, reason, process: _SSHProcess) -> None:
        for name in ("_silence", "_ticker"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        words = process.last_words()
        status = getattr(reason, "exitCode", None)
        if process.silenced:
            how = process.silenced
        elif status is not None:
            how = "exit status %s" % status
        else:
            how = "signal %s" % getattr(reason, "signal", None)
        why = "ssh to %s ended (%s)%s" % (self.label, how, ": %s" % words if words else "")
        self.folder = self.remote_pid = None
        if self.state in (HostState.STOPPING, HostState.STOPPED):
            self.state = HostState.STOPPED
            return
        first = not self.started.called
        for engine in self.engines.values():
            self._cancel(engine, "restart_call")
            if engine.state is not EngineState.DOWN:
                if engine.state is EngineState.RUNNING:
                    self._report(engine.label, "%s lost: %s" % (engine.label, why))
                engine.state = EngineState.RESTARTING
                engine.pid = None
        if first:
            # At start a failure is the user's to see at once (a host key,
            # a login, a missing python), not to retry.
            self.state = HostState.GAVE_UP
            self.started.errback(ClusterError(why))
            return
        if all(e.state is EngineState.DOWN for e in self.engines.values()):
            self.state = HostState.GAVE_UP  # nothing left to run there
            self._report(self.label, "%s; no engine left to start there" % why)
            return
        lived = self._reactor.seconds() - self._connected_at
        self.quick_failures = 0 if lived > LONG_LIFE else self.quick_failures + 1
        if self.quick_failures >= self._max_quick:
            self.state = HostState.GAVE_UP
            self._log.error("{why}; gave up on {host}", why=why, host=self.label)
            self._report(
                self.label,
                "%s; gave up after %d quick failures in a row" % (why, self.quick_failures),
            )
            return
        self.state = HostState.RECONNECTING
        delay = self._delay_for(self.quick_failures)
        self._log.warn("{why}; connecting again in {delay:.1f} s", why=why, delay=delay)
        self._report(self.label, why)
        self._reconnect_call = self._reactor.callLater(delay, self.connect)

    @staticmethod
    def _cancel(engine: _Engine, name: str) -> None:
        call = getattr(engine, name)
        if call is not None and call.active():
            call.cancel()
        setattr(engine, name, None)

    async def stop(self) -> None:
        """Close the connection's stdin (the host ends its engines and
        removes its folder), wait for ssh to exit; SIGTERM it after the
        host's grace period and SIGKILL it shortly after."""
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        self._reconnect_call = None
        for engine in self.engines.values():
            self._cancel(engine, "restart_call")
        process = self.process
        previous, self.state = self.state, HostState.STOPPING
        if process is None or process.ended.called or previous is HostState.STOPPED:
            self.state = HostState.STOPPED
        else:
            for call in (self._ticker, self._silence):
                if call is not None and call.active():
                    call.cancel()
            process.close_stdin()
            term = self._reactor.callLater(self._grace + 3.0, process.signal, signal.SIGTERM)
            kill = self._reactor.callLater(self._grace + 5.0, process.kill)
            waiter: defer.Deferred = defer.Deferred()
            process.ended.addBoth(lambda r: waiter.callback(None) or r)
            await waiter
            for call in (term, kill):
                if call.active():
                    call.cancel()
            self.state = HostState.STOPPED
        for handle in [self._ssh_log] + [e.log for e in self.engines.values()]:
            if handle is not None and not handle.closed:
                handle.close()
        claims, self._claims = self._claims, []
        for claim in claims:
            claim.release()

    def describe(self) -> list[dict]:
        ssh_pid = self.process.pid if self.process is not None else None
        ssh_started = process_start_time(ssh_pid) if ssh_pid else None
        return [
            {
                "label": e.label,
                "host": self.host.destination,
                "pid": e.pid,
                "state": e.state.value,
                "ssh_pid": ssh_pid,
                "ssh_started": ssh_started,
            }
            for e in self.engines.values()
        ]


# -- the launcher -------------------------------------------------------------------------


@implementer(IEngineLauncher)
class SSHLauncher:
    """Engines on other hosts over ssh (see the module's docstring).

    Made as the launcher table makes every launcher: ``SSHLauncher(reactor,
    profile, options, engine_timeout)`` with `options` its own parsed
    options (`optParameters`); `engine_timeout`, the controller's heartbeat
    timeout, is also how long either end of a host's connection waits for a
    word from the other.  Tests pass `hosts` and `settings` directly.
    Each engine's output comes back over its host's connection line by
    line and goes to a file of its own, ``PROFILE/log/ssh-HOST-engine-N.out``
    (N its number, or the next one no other launcher on this profile
    holds); ssh's own to ``PROFILE/log/ssh-HOST-N.out``.  Both rotate by
    size (`taskfarm.logfiles`).
    """

    name = "ssh"
    remote = True
    optParameters = OPTIONS
    optFlags: list = []

    _log = Logger()

    def __init__(
        self,
        reactor,
        profile,
        options: dict | None = None,
        engine_timeout: float | None = None,
        *,
        hosts: str | tuple[SSHHost, ...] | None = None,
        settings: SSHSettings | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        backoff: tuple[float, float] = (0.5, 30.0),
        max_quick_failures: int = DEFAULT_MAX_QUICK_FAILURES,
        grace: float = 5.0,
    ) -> None:
        if hosts is None:
            hosts, settings = hosts_and_settings(options or {})
        self.hosts = parse_hosts(hosts) if isinstance(hosts, str) else tuple(hosts)
        self.settings = settings or SSHSettings()
        self._reactor = reactor
        self.profile = profile
        self._log_dir = Path(profile.log_dir) if profile is not None else None
        self._slot_options = dict(
            timeout=engine_timeout or DEFAULT_HEARTBEAT_TIMEOUT,
            start_timeout=start_timeout,
            backoff=backoff,
            max_quick_failures=max_quick_failures,
            grace=grace,
        )
        self.slots: list[HostSlot] = []
        self._watchers: list = []
        #: Engines started so far per host: the next engine's index there.
        self._next_index: dict[str, int] = {}

    @classmethod
    def check_options(cls, options) -> None:
        """At parse time: `HostsError` (a usage error) for a bad value."""
        hosts_and_settings(options)

    @classmethod
    def clean_up(cls, reactor, profile, described, options) -> defer.Deferred:
        """For `taskfarm stop` when the launcher's process is gone: SIGTERM
        the ssh clients it left (by pid and start time).  Their hosts then
        see the connection end and end their engines.  (A launcher killed
        with -9 needs even this not: its ssh clients see stdin close.)"""
        seen = set()
        for entry in described or []:
            pid, started = entry.get("ssh_pid"), entry.get("ssh_started")
            if not pid or pid in seen:
                continue
            seen.add(pid)
            if started is not None:
                signal_if_alive(pid, started, signal.SIGTERM)
        return defer.succeed(None)

    @property
    def capacity(self) -> int:
        """The engines --hosts asks for in all."""
        return sum(h.count for h in self.hosts)

    def start(self, count, furl_file, engine_options) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(
            self._start(count, furl_file, list(engine_options or ()))
        )

    async def _start(self, count, furl_file, engine_options) -> None:
        placed = place(self.hosts, count)
        try:
            furl = Path(furl_file).read_text().strip()
        except OSError as e:
            raise ClusterError("cannot read the engine furl file %s: %s" % (furl_file, e)) from None
        check_reachable(furl)
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
        new = []
        for host, n in placed:
            first = self._next_index.get(host.destination, 0)
            self._next_index[host.destination] = first + n
            slot = HostSlot(
                host,
                list(range(first, first + n)),
                self.settings,
                furl,
                engine_options,
                self._reactor,
                self._log_dir,
                self._tell,
                **self._slot_options,
            )
            self.slots.append(slot)
            new.append(slot)
            slot.start()
        results = await defer.DeferredList([s.started for s in new], consumeErrors=True)
        failures = [
            "%s: %s" % (slot.label, result.getErrorMessage())
            for slot, (ok, result) in zip(new, results, strict=True)
            if not ok
        ]
        if failures:
            await defer.gatherResults(
                [defer.Deferred.fromCoroutine(s.stop()) for s in new], consumeErrors=True
            )
            raise ClusterError(
                "the ssh launcher could not start engines on %d of %d hosts: %s"
                % (len(failures), len(new), "; ".join(failures))
            )

    def _tell(self, label: str, reason: str) -> None:
        for callback in list(self._watchers):
            try:
                callback(label, reason)
            except Exception:
                self._log.failure("a launcher watcher failed")

    def watch(self, callback) -> None:
        self._watchers.append(callback)

    def stop(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(s.stop()) for s in self.slots], consumeErrors=True
        )

    def describe(self) -> list[dict]:
        return [entry for slot in self.slots for entry in slot.describe()]
