"""What keeps a controller private: file modes, furls as capabilities, one
interface per furl, message-size limits, loopback by default, and furls kept
out of every log.

These run a real controller (a real Tub on 127.0.0.1) in the test's reactor,
and real engine and controller processes where a log of theirs is checked.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from pathlib import Path

from foolscap.api import RemoteException, Violation
from foolscap.furl import decode_furl
from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from taskfarm import serialization
from taskfarm.asyncclient import MultiEngineClient, TaskClient
from taskfarm.cluster.launcher import ProcessSlot, twisted_argv
from taskfarm.controller.service import create_controller
from taskfarm.errors import MessageTooLarge, RemoteTaskError, WrongInterface
from taskfarm.profile import ENGINE, INTERFACES, MULTIENGINE, TASK, Profile
from taskfarm.remote.tub import new_tub
from taskfarm.task import Task
from taskfarm.testing.cluster import RealCluster
from taskfarm.testing.helpers import async_test as _deferred
from taskfarm.testing.helpers import temp_dir


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _swissnum(furl: str) -> str:
    """The secret part of a furl (the tub id is public: it hashes the cert)."""
    return decode_furl(furl)[2]


#: How Foolscap refuses a call a Referenceable does not offer: locally
#: (`Violation`, the schema checked here) or by the far side
#: (`RemoteException`, when nothing is checked here).
REFUSED = (Violation, RemoteException)

class SecurityTestCase(unittest.TestCase):
    timeout = 120

    def controller(self, profile: Profile, **options):
        """A started controller on `profile`, stopped at cleanup."""
        options.setdefault("journal", False)
        service = create_controller(profile, reactor, **options)
        service.startService()
        self.addCleanup(self._stop, service)
        return service

    @staticmethod
    def _stop(service):
        if service.running:
            return service.stopService()

    async def cluster(self, n_engines: int = 0, **options) -> RealCluster:
        """A started RealCluster, stopped at cleanup unless `stop_cluster` did."""
        options.setdefault("journal", False)
        root = str(temp_dir(self, "taskfarm-security-"))
        cluster = RealCluster(reactor, profile_root=root, **options)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.stop_cluster(cluster)))
        await cluster.start(n_engines)
        return cluster

    async def stop_cluster(self, cluster: RealCluster) -> None:
        if not getattr(cluster, "_stopped_by_test", False):
            cluster._stopped_by_test = True
            await cluster.stop()

    def client_tub(self):
        tub = new_tub()
        tub.startService()
        self.addCleanup(tub.stopService)
        return tub


class FileModeTests(SecurityTestCase):
    """Secrets on disk are readable by their owner only."""

    def test_profile_modes(self):
        """Even under a permissive umask and with a security folder that was
        left open, a started controller leaves the profile and security
        folders 0700 and the certificate and every furl file 0600."""
        old_umask = os.umask(0)
        self.addCleanup(os.umask, old_umask)
        profile = Profile(temp_dir(self, "taskfarm-security-") / "profile")
        profile.security_dir.mkdir(parents=True, mode=0o755)
        os.chmod(profile.security_dir, 0o755)
        self.controller(profile, listen="tcp:0:interface=127.0.0.1")
        self.assertEqual(_mode(profile.root), 0o700)
        self.assertEqual(_mode(profile.security_dir), 0o700)
        self.assertEqual(_mode(profile.cert_file), 0o600)
        for interface in INTERFACES:
            self.assertEqual(_mode(profile.furl_file(interface)), 0o600, interface)
        # No temporary file of the atomic writes is left behind.
        self.assertEqual(
            sorted(p.name for p in profile.security_dir.iterdir()),
            sorted(["controller.pem"] + ["%s.furl" % i for i in INTERFACES]),
        )


class FurlTests(SecurityTestCase):
    """Furls are stable capabilities on a loopback address."""

    @_deferred
    async def test_stable_across_restart(self):
        """A controller started again on the same profile serves the same
        furls (tub id, secret name and, the port being free, address), so a
        client holding an old furl reaches the new controller."""
        profile = Profile(temp_dir(self, "taskfarm-security-") / "profile")
        first = self.controller(profile)
        furls = dict(first.server.furls)
        files = {i: profile.furl_file(i).read_text() for i in INTERFACES}
        await first.stopService()

        second = self.controller(profile)
        self.assertEqual(second.server.furls, furls)
        self.assertEqual({i: profile.furl_file(i).read_text() for i in INTERFACES}, files)
        client = TaskClient(furls[TASK], reactor, tub=self.client_tub())
        self.addCleanup(client.disconnect)
        self.assertEqual((await client.queue_status())["scheduled"], 0)

    def test_loopback_by_default(self):
        """Without --listen the controller listens on 127.0.0.1 only, and its
        furls say so."""
        service = self.controller(Profile(temp_dir(self, "taskfarm-security-") / "profile"))
        hints = {decode_furl(furl)[1][0] for furl in service.server.furls.values()}
        self.assertEqual(len(hints), 1)
        (hint,) = hints
        self.assertRegex(hint, r"^tcp:127\.0\.0\.1:\d+$")
        port = int(hint.rsplit(":", 1)[1])
        (listener,) = service.server.tub.getListeners()
        address = listener._lp.getHost()
        self.assertEqual((address.host, address.port), ("127.0.0.1", port))
        # The kernel agrees: the one socket listening on that port is bound
        # to the loopback address, not to every interface.
        self.assertEqual(_listening_addresses(port), ["127.0.0.1"])


def _listening_addresses(port: int) -> list[str]:
    """Local addresses of TCP sockets in LISTEN state on `port` (Linux)."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(socket.inet_ntop(family, raw))
    return found


class InterfaceSeparationTests(SecurityTestCase):
    """Each furl grants one interface and nothing more."""

    @_deferred
    async def test_engine_furl_only_registers(self):
        """The engine furl's object offers hello and register only: Task and
        MultiEngine methods fail, whether the caller's Foolscap checks the
        schema or (like a hostile peer) does not, and nothing is queued."""
        cluster = await self.cluster()
        tub = self.client_tub()
        ref = await tub.getReference(cluster.controller.server.furls[ENGINE])
        calls = [
            ("submit", (serialization.pack((None, [Task("a = 1").to_envelope()])),)),
            ("results", (serialization.pack([0]), False)),
            ("queue_status", (False,)),
            ("engine_call", (serialization.pack(("execute", "all", ("a = 1",), None)),)),
            ("kill_controller", ()),
        ]
        for method, args in calls:
            with self.assertRaises(REFUSED):
                await ref.callRemote(method, *args)
        ref.tracker.interface = None  # now nothing is checked on our side
        for method, args in calls:
            with self.assertRaises(REFUSED):
                await ref.callRemote(method, *args)
        self.assertEqual(cluster.controller.tasks.queue_status()["scheduled"], 0)
        self.assertTrue(cluster.reactor.running)

    @_deferred
    async def test_clients_with_the_wrong_furl(self):
        """A TaskClient given the engine (or MultiEngine) furl, and a
        MultiEngineClient given the task furl, fail with WrongInterface
        naming the furl file to use, and never print the furl itself."""
        cluster = await self.cluster()
        furls = cluster.controller.server.furls
        tub = self.client_tub()
        for client_class, interface in (
            (TaskClient, ENGINE),
            (TaskClient, MULTIENGINE),
            (MultiEngineClient, TASK),
            (MultiEngineClient, ENGINE),
        ):
            client = client_class(furls[interface], reactor, tub=tub)
            self.addCleanup(client.disconnect)
            with self.assertRaises(WrongInterface) as caught:
                await client.connect()
            message = str(caught.exception)
            self.assertIn("%s.furl" % client_class.interface, message)
            self.assertNotIn(_swissnum(furls[interface]), message)

    @_deferred
    async def test_client_furls_cannot_register(self):
        """The task and MultiEngine furls have no register method: an engine
        cannot join through them, checked schema or not."""
        cluster = await self.cluster()
        tub = self.client_tub()
        for interface in (TASK, MULTIENGINE):
            ref = await tub.getReference(cluster.controller.server.furls[interface])
            for check_schema in (True, False):
                if not check_schema:
                    ref.tracker.interface = None
                with self.assertRaises(REFUSED):
                    await ref.callRemote("register", None, serialization.pack({}), None)
        self.assertEqual(cluster.controller.registry.engines, {})


class MessageSizeTests(SecurityTestCase):
    """A controller refuses messages over its configured size."""

    limit = 64 * 1024

    @_deferred
    async def test_client_checks_the_limit_before_sending(self):
        """A submission bigger than the controller's limit fails with
        MessageTooLarge on the client, which learnt the limit at hello, even
        on its very first call; smaller ones still go through."""
        cluster = await self.cluster(max_message_size=self.limit)
        client = cluster.task_client()
        big = Task("x = 1", push={"data": b"x" * (self.limit + 1024)})
        with self.assertRaises(MessageTooLarge) as caught:
            await client.run_many([big])
        message = str(caught.exception)
        self.assertIn("exceeds the controller's limit of %d bytes" % self.limit, message)
        self.assertIn("submit", message)
        self.assertEqual(client._connection.max_message_size, self.limit)
        ids = await client.run_many([Task("a = 1", pull="a")])
        self.assertEqual(cluster.controller.tasks.queue_status(verbose=True)["scheduled"], ids)

    @_deferred
    async def test_raw_oversized_call(self):
        """An oversized argument sent without any client-side check is
        refused by Foolscap's constraint on the controller, nothing is
        queued, and the controller keeps serving others."""
        cluster = await self.cluster(max_message_size=self.limit)
        furl = cluster.controller.server.furls[TASK]
        ref = await self.client_tub().getReference(furl)
        # A submission travels in parts (a list of byte strings): each part
        # is bounded while its header is read.
        with self.assertRaises(Exception) as caught:
            await ref.callRemote("submit", [b"x" * (self.limit + 1)], _useSchema=False)
        self.assertIn(
            "STRING token too large: %d>%d" % (self.limit + 1, self.limit), str(caught.exception)
        )
        self.assertEqual(cluster.controller.tasks.queue_status(verbose=True)["scheduled"], [])
        client = cluster.task_client()
        ids = await client.run_many([Task("a = 1")])
        self.assertEqual(cluster.controller.tasks.queue_status(verbose=True)["scheduled"], ids)


class LogTests(SecurityTestCase):
    """Furls are secrets: no log line carries one."""

    def assert_no_swissnum(self, text: str, furls: dict, where: str) -> None:
        for interface, furl in furls.items():
            self.assertNotIn(_swissnum(furl), text, "%s furl in %s" % (interface, where))

    @_deferred
    async def test_in_process_controller_and_engine(self):
        """Over a run with an engine, a successful and a failing task, a
        wrong-furl client and an engine lost, no event the controller logs
        (text or field values) and no line of the engine's log holds a
        furl's secret."""
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        cluster = await self.cluster(1)
        furls = dict(cluster.controller.server.furls)
        client = cluster.task_client()
        ok = await client.run(Task("a = 1", pull="a"))
        bad = await client.run(Task("1 / 0"))
        await client.barrier([ok, bad])
        (result,) = await client.get_task_results([bad])
        self.assertIsInstance(result.failure, RemoteTaskError)
        wrong = TaskClient(furls[ENGINE], reactor, tub=self.client_tub())
        self.addCleanup(wrong.disconnect)
        with self.assertRaises(WrongInterface):
            await wrong.queue_status()
        await cluster.engines[0].stop(grace=3)
        await cluster.wait_for_engines(0)
        await self.stop_cluster(cluster)
        self.assertTrue(events)
        for event in events:
            text = formatEvent(event) + " " + " ".join(repr(v) for v in event.values())
            if "log_failure" in event:
                text += event["log_failure"].getTraceback()
            self.assert_no_swissnum(text, furls, "a log event")
        logs = list(cluster.profile.log_dir.iterdir())
        self.assertTrue(logs)
        for path in logs:
            self.assert_no_swissnum(path.read_text(errors="replace"), furls, path.name)

    @_deferred
    async def test_controller_process_log(self):
        """A `twistd taskcontroller` process and an engine process, run
        through a client session, write no furl secret to controller.log or
        to any output in the profile's log folder."""
        profile = Profile(temp_dir(self, "taskfarm-security-") / "profile")
        profile.ensure()
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(sys.path))
        slots = []

        async def stop_all():
            for slot in slots:
                await slot.stop(grace=5)

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop_all()))
        controller = ProcessSlot(
            "controller",
            twisted_argv("taskcontroller", "--profile-dir", str(profile.root), "--no-journal"),
            profile.log_dir / "controller.out",
            reactor,
            env=env,
            restart=False,
        )
        slots.append(controller)
        controller.start()
        await _wait_until(lambda: all(profile.furl_file(i).exists() for i in INTERFACES))
        furls = {i: profile.furl_file(i).read_text().strip() for i in INTERFACES}
        engine = ProcessSlot(
            "engine",
            twisted_argv("taskengine", "--furl-file", str(profile.furl_file(ENGINE))),
            profile.log_dir / "engine.out",
            reactor,
            env=env,
            restart=False,
        )
        slots.append(engine)
        engine.start()
        client = TaskClient(profile.furl_file(TASK), reactor, tub=self.client_tub())
        self.addCleanup(client.disconnect)
        for _ in range(600):
            if await client.engine_ids():
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        taskid = await client.run(Task("a = 6 * 7", pull="a"))
        self.assertEqual((await client.get_task_result(taskid, block=True)).ns.a, 42)
        await client.disconnect()
        await stop_all()
        names = sorted(p.name for p in profile.log_dir.iterdir())
        self.assertIn("controller.log", names)
        for name in names:
            text = (profile.log_dir / name).read_text(errors="replace")
            self.assert_no_swissnum(text, furls, name)
        self.assertIn("engine 0 registered", (profile.log_dir / "controller.log").read_text())


async def _wait_until(condition, timeout: float = 60.0) -> None:
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError("gave up waiting after %g s" % timeout)
        await task.deferLater(reactor, 0.05, lambda: None)
