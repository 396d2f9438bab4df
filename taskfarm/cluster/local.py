"""The ``local`` launcher: engines as child processes of this machine.

Each engine is a `ProcessSlot` (`taskfarm.cluster.slots`): started again
after a back-off when it dies, SIGKILLed with its process group and
replaced when its liveness ticks stop for `engine_timeout` seconds, left
down after a MultiEngine ``kill``.  The engines read the engine furl from
the furl file named on their command line (the file, not the furl, is in
their argv).
"""

from __future__ import annotations

import os
import socket

from twisted.internet import defer
from zope.interface import implementer

from taskfarm.cluster.slots import ProcessSlot, process_start_time, twisted_argv
from taskfarm.interfaces import IEngineLauncher
from taskfarm.logfiles import LogClaim, claim_log_name
from taskfarm.profile import Profile


@implementer(IEngineLauncher)
class LocalLauncher:
    """`count` engines on this machine, kept running (see the module)."""

    name = "local"
    remote = False
    #: Its own command-line options (``usage.Options`` style): none.
    optParameters: list = []
    optFlags: list = []

    def __init__(
        self,
        reactor,
        profile: Profile,
        options: dict | None = None,
        engine_timeout: float | None = None,
    ) -> None:
        self._reactor = reactor
        self.profile = profile
        self._engine_timeout = engine_timeout
        #: Engine logs are PROFILE/log/PREFIX-N.out, N the first free one.
        self.log_prefix = "engine"
        #: One `ProcessSlot` per engine started, in order.
        self.slots: list[ProcessSlot] = []
        #: The log name each engine holds (`logfiles.claim_log_name`).
        self._claims: list[LogClaim] = []
        self._watchers: list = []

    def start(self, count: int, furl_file, engine_options) -> defer.Deferred:
        """Start `count` more engines; fires at once (they register later)."""
        if count < 0:
            return defer.fail(ValueError("the number of engines must be >= 0"))
        self.profile.ensure()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for _ in range(count):
            index = len(self.slots)
            # A name of its own, even beside another launcher on this profile.
            start = self._claims[-1].index + 1 if self._claims else 0
            claim = claim_log_name(self.profile.log_dir, self.log_prefix, start)
            self._claims.append(claim)
            slot = ProcessSlot(
                "engine %d" % index,
                twisted_argv("taskengine", "--furl-file", str(furl_file), *engine_options),
                claim.path,
                self._reactor,
                env,
                liveness_timeout=self._engine_timeout,
            )
            slot.on_ended.append(self._ended)
            slot.start()
            self.slots.append(slot)
        return defer.succeed(None)

    def _ended(self, slot: ProcessSlot, reason) -> None:
        for callback in list(self._watchers):
            callback(slot.name, reason)

    def watch(self, callback) -> None:
        self._watchers.append(callback)

    def stop(self) -> defer.Deferred:
        """Stop every engine (SIGTERM, then SIGKILL to its group)."""
        d = defer.gatherResults(
            [defer.Deferred.fromCoroutine(slot.stop()) for slot in self.slots]
        )
        d.addBoth(self._release_claims)
        return d.addCallback(lambda _: None)

    def _release_claims(self, result):
        claims, self._claims = self._claims, []
        for claim in claims:
            claim.release()
        return result

    def describe(self) -> list[dict]:
        host = socket.gethostname()
        described = []
        for slot in self.slots:
            pid = slot.pid
            described.append(
                {
                    "label": slot.name,
                    "host": host,
                    "pid": pid,
                    # Tells the process from a later one given its pid.
                    "started": process_start_time(pid) if pid else None,
                    "state": slot.state.value,
                    "restarts": slot.restarts,
                }
            )
        return described

    @property
    def restarts(self) -> int:
        """How many times engines were started again after dying."""
        return sum(slot.restarts for slot in self.slots)
