"""A real controller in the test's reactor, and real engine processes."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from taskfarm.asyncclient import MultiEngineClient, TaskClient
from taskfarm.cluster.launcher import ProcessSlot, twisted_argv
from taskfarm.controller.service import create_controller
from taskfarm.profile import ENGINE, MULTIENGINE, TASK, Profile
from taskfarm.testing.helpers import temp_dir

_CERT_CACHE: bytes | None = None


class RealCluster:
    """A controller (in this process) and engine processes, for one test.

    The controller takes the profile's lock as any controller does.

    Use ``await cluster.start(n)`` in a test and ``await cluster.stop()`` in
    its cleanup; every engine process is ended by PID and waited for.
    """

    def __init__(self, reactor, profile_root: str | None = None, **controller_options) -> None:
        self.reactor = reactor
        # Without `profile_root` the caller removes `profile.root` itself;
        # tests use `ClusterTestCase`, which does.
        root = profile_root or tempfile.mkdtemp(prefix="taskfarm-test-")
        self.profile = Profile(Path(root))
        self._controller_options = controller_options
        #: Seconds without a liveness tick after which an engine's slot
        #: SIGKILLs it, as `taskfarm cluster` does; None (the default here):
        #: never, so that tests see what the controller alone does.
        self.liveness_timeout: float | None = None
        self.controller = None
        self.engines: list[ProcessSlot] = []
        self._client_tub = None
        self._clients: list = []

    async def start(self, n_engines: int = 0, properties: list[dict] | None = None) -> None:
        global _CERT_CACHE
        self.profile.ensure()
        # A Tub key costs ~70 ms; reuse one across tests.
        if _CERT_CACHE is not None and not self.profile.cert_file.exists():
            from taskfarm.profile import write_secret

            write_secret(self.profile.cert_file, _CERT_CACHE)
        self.controller = create_controller(
            self.profile, self.reactor,
            **{"listen": "tcp:0:interface=127.0.0.1", **self._controller_options},
        )
        self.controller.startService()
        _CERT_CACHE = self.profile.cert_file.read_bytes()
        await self.add_engines(n_engines, properties)

    async def add_engines(self, n: int, properties: list[dict] | None = None) -> list[ProcessSlot]:
        """Start `n` engine processes and wait until they have registered."""
        before = len(self.controller.registry.engines)
        slots = []
        for i in range(n):
            props = (properties or [{}] * n)[i]
            argv = twisted_argv("taskengine", "--furl-file", str(self.profile.furl_file(ENGINE)))
            for key, value in props.items():
                argv += ["--property", "%s=%r" % (key, value)]
            slot = ProcessSlot(
                "engine %d" % len(self.engines),
                argv,
                self.profile.log_dir / ("engine-%d.out" % len(self.engines)),
                self.reactor,
                env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(sys.path)),
                liveness_timeout=self.liveness_timeout,
                restart=False,  # tests decide about restarts themselves
            )
            slot.start()
            self.engines.append(slot)
            slots.append(slot)
        await self.wait_for_engines(before + n)
        return slots

    async def wait_for_engines(self, n: int, timeout: float = 60.0) -> None:
        """Wait until exactly `n` engines are registered."""
        deadline = self.reactor.seconds() + timeout
        while len(self.controller.registry.engines) != n:
            if self.reactor.seconds() > deadline:
                raise AssertionError(
                    "%d engines registered, expected %d (logs in %s)"
                    % (len(self.controller.registry.engines), n, self.profile.log_dir)
                )
            await task.deferLater(self.reactor, 0.05, lambda: None)

    def task_client(self, **options) -> TaskClient:
        """An async Task client for this cluster, closed at `stop`."""
        client = TaskClient(
            self.profile.furl_file(TASK), self.reactor, tub=self._tub(), **options
        )
        self._clients.append(client)
        return client

    def multiengine_client(self, **options) -> MultiEngineClient:
        """An async MultiEngine client for this cluster, closed at `stop`."""
        client = MultiEngineClient(
            self.profile.furl_file(MULTIENGINE), self.reactor, tub=self._tub(), **options
        )
        self._clients.append(client)
        return client

    def _tub(self):
        if self._client_tub is None:
            from taskfarm.remote.tub import new_tub

            self._client_tub = new_tub(_client_cert_data())
            self._client_tub.startService()
        return self._client_tub

    def engine_pid(self, engine_id: int) -> int:
        """The process id of a registered engine."""
        return self.controller.registry.engines[engine_id].properties["pid"]

    async def stop(self) -> None:
        """Close the clients, then end every engine process and stop the
        controller, whatever failed before (no process outlives a test)."""
        try:
            for client in self._clients:
                try:
                    await client.disconnect()
                except Exception:
                    pass  # a refused submission was the test's business, not ours
        finally:
            try:
                await defer.gatherResults(
                    [defer.Deferred.fromCoroutine(slot.stop(grace=3)) for slot in self.engines],
                    consumeErrors=True,
                )
            finally:
                if self._client_tub is not None:
                    await self._client_tub.stopService()
                if self.controller is not None:
                    await self.controller.stopService()


class ClusterTestCase(unittest.TestCase):
    """Starts a `RealCluster` per test (`start_cluster`) in a temporary
    folder; the cleanup stops it and removes the folder.  `self.tmp` is a
    scratch folder in it for the test's own files."""

    timeout = 120
    #: The prefix of the temporary folder's name.
    folder_prefix = "taskfarm-test-"

    async def start_cluster(self, n: int = 1, properties=None, **controller_options):
        """A started cluster of `n` engines (each with its `properties`);
        returns its Task client (`client`)."""
        root = temp_dir(self, self.folder_prefix)
        self.tmp = root / "scratch"
        self.tmp.mkdir()
        self.cluster = RealCluster(reactor, profile_root=str(root), **controller_options)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.cluster.stop()))
        await self.cluster.start(n, properties)
        return self.client()

    def client(self):
        """The client `start_cluster` returns: a Task client by default."""
        return self.cluster.task_client()


_client_cert: bytes | None = None


def _client_cert_data() -> bytes:
    global _client_cert
    if _client_cert is None:
        from taskfarm.remote.tub import new_tub

        _client_cert = new_tub().getCertData()
    return _client_cert
