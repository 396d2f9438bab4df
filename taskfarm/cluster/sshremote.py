"""The host side of the ssh launcher: ``PYTHON -m taskfarm.cluster.sshremote``.

`taskfarm.cluster.ssh` runs this module on each host over one ssh
connection and speaks to it in JSON lines over the connection's stdin and
stdout.  Its first line is the configuration, furl included::

    {"config": {"furl": "pb://...", "engines": [0, 1], "options": [...],
                "timeout": 10.0, "grace": 5.0}}

so the furl is never in an argv or an environment: it is written to a 0600
file in a private (0700) temporary folder, and each engine is started as
``PYTHON -m twisted taskengine --furl-file THAT-FILE OPTIONS``.  Then the
launcher sends ``{"start": K}`` to start engine K again, and ``{"tick": 1}``
every second or so.  This side answers with ``{"ready": FOLDER, "pid": ITS-PID}``,
``{"started": K, "pid": PID}``, ``{"ended": K, "status": N, "signal": S}``,
``{"out": K, "text": LINE}`` (each line an engine writes) and ticks.

It holds no policy: the launcher decides what to restart.  It ends every
engine (SIGTERM to its process group, SIGKILL after the grace period) and
removes its folder when stdin closes (the launcher stopped, or ssh ended),
when nothing came from the launcher for ``timeout`` seconds (the network is
cut: sshd may not notice for a long time), or on SIGTERM/SIGHUP.  Engines
die with it (`taskfarm.lifeline`: it names itself as their launcher).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile

from twisted.internet import defer, error, stdio, task
from twisted.protocols.basic import LineOnlyReceiver

from taskfarm import lifeline
from taskfarm.childprocess import GroupChild

#: The longest line the launcher may send (a configuration with its furl).
MAX_LINE = 1 << 20

#: Seconds between two ticks to the launcher (at most; a quarter of the
#: timeout if that is shorter).
TICK_PERIOD = 1.0


class _Engine(GroupChild):
    """One engine process; its output goes to the launcher line by line."""

    def __init__(self, index: int, channel: _Channel) -> None:
        super().__init__()
        self.index = index
        self._channel = channel
        self._partial = b""

    def connectionMade(self) -> None:
        super().connectionMade()
        self._channel.send({"started": self.index, "pid": self.last_pid})

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._channel.send({"out": self.index, "text": line.decode(errors="replace")})

    def processExited(self, reason) -> None:
        value = reason.value
        self._channel.send(
            {
                "ended": self.index,
                "status": getattr(value, "exitCode", None),
                "signal": getattr(value, "signal", None),
            }
        )
        # What its tasks forked ends with it.
        self.end_with_process(reason)


class _Channel(LineOnlyReceiver):
    """The launcher's end of the ssh connection, on this host."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._folder: str | None = None
        self._furl_file: str | None = None
        self._options: list[str] = []
        self._grace = 5.0
        self._timeout = 10.0
        self._silence = None
        self._ticker = None
        self.engines: dict[int, _Engine] = {}
        self._stopping = False
        self._shutting_down = False

    # -- to the launcher

    def send(self, message: dict) -> None:
        if self.transport is not None and not self._stopping:
            self.transport.write(json.dumps(message).encode() + b"\n")

    # -- from the launcher

    def lineReceived(self, line: bytes) -> None:
        if self._silence is not None and self._silence.active():
            self._silence.reset(self._timeout)
        try:
            message = json.loads(line)
        except ValueError:
            self._fail("not a JSON line from the launcher")
            return
        if "config" in message:
            self._configure(message["config"])
        elif "start" in message:
            self._start(int(message["start"]))
        # ticks only reset the silence timer

    def lineLengthExceeded(self, line) -> None:
        self._fail("a line from the launcher longer than %d bytes" % MAX_LINE)

    def _configure(self, config: dict) -> None:
        if self._folder is not None:
            self._fail("configured twice")
            return
        self._options = [str(x) for x in config.get("options", [])]
        self._grace = float(config.get("grace", 5.0))
        self._timeout = float(config.get("timeout", 10.0))
        self._folder = tempfile.mkdtemp(prefix="taskfarm-ssh-")  # 0700
        self._furl_file = os.path.join(self._folder, "engine.furl")
        fd = os.open(self._furl_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(str(config["furl"]).strip() + "\n")
        self._silence = self._reactor.callLater(self._timeout, self._silent)
        self._ticker = task.LoopingCall(self.send, {"tick": 1})
        self._ticker.clock = self._reactor
        self._ticker.start(min(TICK_PERIOD, self._timeout / 4), now=False)
        self.send({"ready": self._folder, "pid": os.getpid()})
        for index in config.get("engines", []):
            self._start(int(index))

    def _start(self, index: int) -> None:
        if self._furl_file is None or self._stopping:
            return
        old = self.engines.get(index)
        if old is not None and not old.ended.called:
            return  # still running
        engine = _Engine(index, self)
        self.engines[index] = engine
        argv = [
            sys.executable,
            "-m",
            "twisted",
            "--log-format",
            "text",
            "taskengine",
            "--furl-file",
            self._furl_file,
            *self._options,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env[lifeline.LAUNCHER_PID] = str(os.getpid())
        env.pop(lifeline.LIVENESS_FD, None)
        self._reactor.spawnProcess(
            engine, argv[0], argv, env=env, childFDs={0: "w", 1: "r", 2: "r"}
        )

    def _silent(self) -> None:
        self._silence = None
        self._fail("nothing from the launcher for %g s" % self._timeout)

    def _fail(self, why: str) -> None:
        print("taskfarm sshremote: %s; stopping" % why, file=sys.stderr, flush=True)
        self.shutdown()

    def connectionLost(self, reason=None) -> None:
        # stdin closed: the launcher stopped, or the connection is gone.
        self.shutdown()

    def shutdown(self) -> None:
        if not self._shutting_down:
            self._shutting_down = True
            try:
                self._reactor.stop()
            except error.ReactorNotRunning:
                pass  # stopping already (SIGTERM)

    # -- the end

    async def stop_engines(self) -> None:
        """SIGTERM every engine's group, SIGKILL after the grace period;
        then remove the folder (the furl with it)."""
        self._stopping = True
        for call in (self._silence,):
            if call is not None and call.active():
                call.cancel()
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        running = [e for e in self.engines.values() if not e.ended.called]
        for engine in running:
            engine.signal_group(signal.SIGTERM)
        if running:
            waiting = defer.DeferredList([e.ended for e in running])
            kill = self._reactor.callLater(
                self._grace, lambda: [e.signal_group(signal.SIGKILL) for e in running]
            )
            timeout = self._reactor.callLater(self._grace + 2.0, waiting.cancel)
            try:
                await waiting
            except defer.CancelledError:
                pass
            for call in (kill, timeout):
                if call.active():
                    call.cancel()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def main() -> None:
    from twisted.internet import reactor

    channel = _Channel(reactor)
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.Deferred.fromCoroutine(channel.stop_engines())
    )
    # SIGTERM stops the reactor (Twisted's own handler); SIGHUP too.
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(channel.shutdown))
    stdio.StandardIO(channel, reactor=reactor)
    reactor.run()


if __name__ == "__main__":
    main()
