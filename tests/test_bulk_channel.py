"""The bulk-data channel's protocol (`taskfarm.bulk.channel`).

`OffersTests` run on a Clock; `BulkSocketTests` (marked process) move
bytes over real TLS loopback sockets with a Foolscap Tub's certificate.
"""

from __future__ import annotations

import socket
import ssl
import threading

from twisted.internet import reactor, task, threads
from twisted.trial import unittest

from taskfarm.bulk import channel
from taskfarm.errors import BulkRefused, ConnectionLost
from taskfarm.serialization import ReceivedBuffer
from taskfarm.testing.helpers import async_test as run


class OffersTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.offers = channel.Offers(self.clock, ttl=5.0)

    def test_a_capability_gives_its_parts_once(self):
        parts = [b"a" * 10, bytearray(b"b" * 3)]
        cap = self.offers.offer(parts)
        self.assertEqual(len(cap), channel.CAPABILITY_BYTES)
        self.assertEqual(self.offers.take(cap, channel.GET), parts)
        self.assertIsNone(self.offers.take(cap, channel.GET))
        self.assertEqual(len(self.offers), 0)
        self.clock.advance(5)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_untaken_capability_expires(self):
        cap = self.offers.offer([b"x"])
        self.clock.advance(4.9)
        self.assertEqual(len(self.offers), 1)
        self.clock.advance(0.2)
        self.assertEqual(len(self.offers), 0)
        self.assertIsNone(self.offers.take(cap, channel.GET))

    def test_a_wrong_capability_or_kind_is_refused(self):
        cap = self.offers.offer([b"x"])
        wrong = bytes([cap[0] ^ 1]) + cap[1:]
        self.assertIsNone(self.offers.take(wrong, channel.GET))
        self.assertIsNone(self.offers.take(cap, channel.PUT))
        self.assertIsNone(self.offers.claim(cap))
        self.assertEqual(self.offers.take(cap, channel.GET), [b"x"])

    def test_an_upload_is_claimed_once_and_only_when_complete(self):
        cap = self.offers.expect([3, 4])
        self.assertIsNone(self.offers.claim(cap))  # nothing received yet
        self.assertEqual(self.offers.take(cap, channel.PUT), [3, 4])
        self.assertIsNone(self.offers.take(cap, channel.PUT))  # single use
        self.assertIsNone(self.offers.claim(cap))  # under way
        self.offers.deposit(cap, [b"abc", b"defg"])
        self.assertEqual(self.offers.claim(cap), [b"abc", b"defg"])
        self.assertIsNone(self.offers.claim(cap))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_unclaimed_upload_expires_with_its_parts(self):
        cap = self.offers.expect([3])
        self.offers.take(cap, channel.PUT)
        self.offers.deposit(cap, [b"abc"])
        self.clock.advance(5)
        self.assertEqual(len(self.offers), 0)
        self.assertIsNone(self.offers.claim(cap))

    def test_capabilities_differ(self):
        caps = {self.offers.offer([b""]) for _ in range(50)}
        self.assertEqual(len(caps), 50)

    def test_clear_forgets_everything(self):
        self.offers.offer([b"x"])
        self.offers.expect([1])
        self.offers.clear()
        self.assertEqual(len(self.offers), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


def _tub_cert():
    from taskfarm.remote.tub import new_tub

    tub = new_tub()
    return tub.getCertData(), tub.getTubID()


_CERT = None


def _cert():
    global _CERT
    if _CERT is None:
        _CERT = _tub_cert()
    return _CERT


class BulkSocketTests(unittest.TestCase):
    """Real TLS loopback sockets, the certificate of a Foolscap Tub."""

    def setUp(self):
        self.cert, self.tubid = _cert()
        self.offers = channel.Offers(reactor, ttl=30.0)
        self.server = channel.BulkServer(reactor, self.offers, self.cert, "127.0.0.1",
                                         timeout=5.0)
        self.server.start()
        self.addCleanup(self.server.stop)
        self.where = ("127.0.0.1", self.server.port)

    def fetch(self, cap, sizes, tubid=None):
        return threads.deferToThread(
            channel.fetch, *self.where, tubid or self.tubid, cap, sizes, 5.0, ReceivedBuffer
        )

    def upload(self, cap, parts, tubid=None):
        return threads.deferToThread(
            channel.upload, *self.where, tubid or self.tubid, cap, parts, 5.0
        )

    async def until(self, predicate):
        for _ in range(200):
            if predicate():
                return
            await task.deferLater(reactor, 0.01, lambda: None)
        self.fail("never happened")

    def test_tubid_of_matches_foolscap(self):
        pem = self.cert.decode()
        end = "-----END CERTIFICATE-----"
        der = ssl.PEM_cert_to_DER_cert(pem[: pem.index(end) + len(end)])
        self.assertEqual(channel.tubid_of(der), self.tubid)

    @run
    async def test_fetch_roundtrip_and_single_use(self):
        parts = [b"header", bytes(range(256)) * 40000, b"", bytearray(b"\x01" * 70000)]
        cap = self.offers.offer(parts)
        got = await self.fetch(cap, [len(p) for p in parts])
        self.assertEqual([bytes(p) for p in got], [bytes(p) for p in parts])
        self.assertTrue(all(type(p) is ReceivedBuffer for p in got))
        with self.assertRaises(BulkRefused):
            await self.fetch(cap, [len(p) for p in parts])
        self.assertEqual((self.server.completed, self.server.refused), (1, 1))

    @run
    async def test_upload_roundtrip_and_single_use(self):
        parts = [b"h" * 5, memoryview(bytes(range(256)) * 40000), bytearray(3)]
        cap = self.offers.expect([5, 256 * 40000, 3])
        await self.upload(cap, parts)
        got = self.offers.claim(cap)
        self.assertEqual([bytes(p) for p in got], [bytes(p) for p in parts])
        self.assertIsNone(self.offers.claim(cap))
        with self.assertRaises(BulkRefused):
            await self.upload(cap, parts)
        self.assertEqual(len(self.offers), 0)

    @run
    async def test_a_wrong_tubid_is_refused_before_the_capability_is_sent(self):
        cap = self.offers.offer([b"secret"])
        with self.assertRaises(BulkRefused):
            await self.fetch(cap, [6], tubid=_tub_cert()[1])
        # The capability never left: it is still there to take.
        self.assertEqual(self.offers.take(cap, channel.GET), [b"secret"])

    @run
    async def test_an_upload_capability_does_not_fetch(self):
        cap = self.offers.expect([3])
        with self.assertRaises(BulkRefused):
            await self.fetch(cap, [3])
        offered = self.offers.offer([b"abc"])
        with self.assertRaises(BulkRefused):
            await self.upload(offered, [b"abc"])

    @run
    async def test_fewer_or_more_bytes_than_announced_fail(self):
        with self.assertRaises(ConnectionLost):
            await self.fetch(self.offers.offer([b"abc"]), [4])
        with self.assertRaises(ConnectionLost):
            await self.fetch(self.offers.offer([b"abcd"]), [3])

    @run
    async def test_an_upload_cut_short_leaves_nothing(self):
        """The uploader stops midway and closes: the controller drops the
        buffers; nothing is claimable, nothing stays in the table."""
        cap = self.offers.expect([1_000_000])

        def half():
            tls = channel._connect(*self.where, self.tubid, 5.0)
            with tls:
                tls.sendall(channel.MAGIC + channel.PUT + cap)
                assert tls.recv(1) == channel.OK
                tls.sendall(b"x" * 400_000)

        await threads.deferToThread(half)
        await self.until(lambda: self.server.failed == 1)
        self.assertIsNone(self.offers.claim(cap))
        self.assertEqual(len(self.offers), 0)

    @run
    async def test_a_fetch_cut_short_is_lost_not_partial(self):
        """The controller stops mid-fetch: the receiver raises, with no
        part handed out."""
        big = b"z" * (64 * 1024 * 1024)
        cap = self.offers.offer([big])
        started, proceed = threading.Event(), threading.Event()

        def allocate(size):
            started.set()
            proceed.wait(5)  # the controller stops while nothing is read
            return bytearray(size)

        d = threads.deferToThread(channel.fetch, *self.where, self.tubid, cap, [len(big)], 5.0,
                                  allocate)
        await threads.deferToThread(started.wait, 5)
        self.server.stop()
        proceed.set()
        with self.assertRaises(ConnectionLost):
            await d

    @run
    async def test_a_silent_peer_is_dropped_after_the_timeout(self):
        def silent():
            with socket.create_connection(self.where) as s:
                s.settimeout(10)
                return s.recv(1)  # the server closes it after its 5 s timeout

        self.server.stop()
        self.server = channel.BulkServer(reactor, self.offers, self.cert, "127.0.0.1",
                                         timeout=0.3)
        self.server.start()
        self.addCleanup(self.server.stop)
        self.where = ("127.0.0.1", self.server.port)
        self.assertEqual(await threads.deferToThread(silent), b"")
        await self.until(lambda: self.server.failed == 1)

    def test_a_port_nobody_listens_on(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        d = threads.deferToThread(channel.fetch, "127.0.0.1", free, self.tubid, b"x" * 32, [1], 5.0)
        return self.assertFailure(d, ConnectionLost)

