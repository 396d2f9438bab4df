"""The bulk-data channel's protocol (`taskfarm.bulk.channel`).

`OffersTests` and `SenderTests` run on a Clock and a StringTransport;
`BulkSocketTests` (marked process) move bytes over real TLS loopback
sockets with a Foolscap Tub's certificate.
"""

from __future__ import annotations

import socket
import ssl

from twisted.internet import reactor, task, threads
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from taskfarm.bulk import channel
from taskfarm.errors import BulkRefused, ConnectionLost


class OffersTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.offers = channel.Offers(self.clock, ttl=5.0)

    def test_a_capability_gives_its_parts_once(self):
        parts = [b"a" * 10, bytearray(b"b" * 3)]
        cap = self.offers.offer(parts)
        self.assertEqual(len(cap), channel.CAPABILITY_BYTES)
        self.assertEqual(self.offers.take(cap), parts)
        self.assertIsNone(self.offers.take(cap))
        self.assertEqual(len(self.offers), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_untaken_capability_expires(self):
        cap = self.offers.offer([b"x"])
        self.clock.advance(4.9)
        self.assertEqual(len(self.offers), 1)
        self.clock.advance(0.2)
        self.assertEqual(len(self.offers), 0)
        self.assertIsNone(self.offers.take(cap))

    def test_a_wrong_capability_is_refused(self):
        cap = self.offers.offer([b"x"])
        wrong = bytes([cap[0] ^ 1]) + cap[1:]
        self.assertIsNone(self.offers.take(wrong))
        self.assertEqual(self.offers.take(cap), [b"x"])

    def test_capabilities_differ(self):
        caps = {self.offers.offer([b""]) for _ in range(50)}
        self.assertEqual(len(caps), 50)

    def test_clear_forgets_everything(self):
        self.offers.offer([b"x"])
        self.offers.clear()
        self.assertEqual(len(self.offers), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SenderTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.offers = channel.Offers(self.clock)
        self.factory = channel.BulkFactory(self.offers, self.clock)

    def connect(self):
        sender = self.factory.buildProtocol(None)
        transport = StringTransport()
        sender.makeConnection(transport)
        return sender, transport

    def test_streams_the_parts_in_order_then_closes(self):
        big = bytes(range(256)) * (channel.CHUNK // 128 + 7)  # over two chunks
        cap = self.offers.offer([b"head", memoryview(big), bytearray(b"tail")])
        sender, transport = self.connect()
        sender.dataReceived(channel.MAGIC + channel.GET + cap[:5])
        self.assertEqual(transport.value(), b"")
        sender.dataReceived(cap[5:])
        self.assertEqual(transport.value(), channel.OK + b"head" + big + b"tail")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.offers), 0)

    def test_pauses_when_the_consumer_is_full(self):
        big = b"z" * (3 * channel.CHUNK)
        cap = self.offers.offer([big])
        sender, transport = self.connect()
        real_write = transport.write

        def write_then_pause(data):
            real_write(data)
            if len(data) > 1:
                sender.pauseProducing()

        transport.write = write_then_pause
        sender.dataReceived(channel.MAGIC + channel.GET + cap)
        self.assertEqual(len(transport.value()), 1 + channel.CHUNK)
        sender.resumeProducing()
        self.assertEqual(len(transport.value()), 1 + 2 * channel.CHUNK)
        sender.resumeProducing()
        sender.resumeProducing()
        self.assertEqual(transport.value(), channel.OK + big)
        self.assertTrue(transport.disconnecting)

    def test_an_unknown_capability_is_refused(self):
        sender, transport = self.connect()
        sender.dataReceived(channel.MAGIC + channel.GET + b"\0" * channel.CAPABILITY_BYTES)
        self.assertEqual(transport.value(), channel.REFUSED)
        self.assertTrue(transport.disconnecting)

    def test_a_malformed_request_is_dropped(self):
        cap = self.offers.offer([b"x"])
        sender, transport = self.connect()
        transport.abortConnection = lambda: setattr(transport, "aborted", True)
        sender.dataReceived(b"HTTP" + channel.GET + cap)
        self.assertTrue(transport.aborted)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(self.offers), 1)  # a bad request uses up nothing

    def test_a_silent_connection_is_dropped_after_the_bound(self):
        sender, transport = self.connect()
        transport.abortConnection = lambda: setattr(transport, "aborted", True)
        self.clock.advance(channel.REQUEST_TIMEOUT)
        self.assertTrue(transport.aborted)

    def test_a_connection_lost_midway_drops_the_parts(self):
        cap = self.offers.offer([b"z" * (3 * channel.CHUNK)])
        sender, transport = self.connect()
        transport.write = lambda data: sender.pauseProducing()
        sender.dataReceived(channel.MAGIC + channel.GET + cap)
        sender.connectionLost(None)
        self.assertEqual(sender._parts, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


def _tub_cert():
    from taskfarm.remote.tub import new_tub

    tub = new_tub()
    return tub.getCertData(), tub.getTubID()


class BulkSocketTests(unittest.TestCase):
    """Real TLS loopback sockets, the certificate of a Foolscap Tub."""

    def setUp(self):
        self.cert, self.tubid = _tub_cert()
        self.offers = channel.Offers(reactor, ttl=30.0)
        self.port = channel.listen(
            reactor, channel.BulkFactory(self.offers, reactor), self.cert, "127.0.0.1"
        )
        self.addCleanup(self.port.stopListening)
        self.addCleanup(self.offers.clear)
        self.where = ("127.0.0.1", self.port.getHost().port)

    def fetch(self, cap, sizes, tubid=None):
        return threads.deferToThread(
            channel.fetch, *self.where, tubid or self.tubid, cap, sizes, 10.0
        )

    def test_tubid_of_matches_foolscap(self):
        pem = self.cert.decode()
        end = "-----END CERTIFICATE-----"
        der = ssl.PEM_cert_to_DER_cert(pem[: pem.index(end) + len(end)])
        self.assertEqual(channel.tubid_of(der), self.tubid)

    async def _roundtrip(self):
        parts = [b"header", bytes(range(256)) * 20000, b"", bytearray(b"\x01" * 70000)]
        cap = self.offers.offer(parts)
        got = await self.fetch(cap, [len(p) for p in parts])
        self.assertEqual([bytes(p) for p in got], [bytes(p) for p in parts])
        self.assertTrue(all(type(p) is bytearray for p in got))
        with self.assertRaises(BulkRefused):
            await self.fetch(cap, [len(p) for p in parts])  # single use

    def test_roundtrip_and_single_use(self):
        from twisted.internet import defer

        return defer.Deferred.fromCoroutine(self._roundtrip())

    def test_a_wrong_tubid_is_refused_before_the_capability_is_sent(self):
        cap = self.offers.offer([b"secret"])
        other = _tub_cert()[1]
        d = self.fetch(cap, [6], tubid=other)
        self.assertFailure(d, BulkRefused)
        # The capability never left: it is still there to take.
        d.addCallback(lambda _: self.assertEqual(self.offers.take(cap), [b"secret"]))
        return d

    def test_fewer_bytes_than_announced_is_lost_not_partial(self):
        cap = self.offers.offer([b"abc"])
        d = self.fetch(cap, [4])
        return self.assertFailure(d, ConnectionLost)

    def test_more_bytes_than_announced_is_lost(self):
        cap = self.offers.offer([b"abcd"])
        d = self.fetch(cap, [3])
        return self.assertFailure(d, ConnectionLost)

    def test_a_port_nobody_listens_on(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        d = threads.deferToThread(channel.fetch, "127.0.0.1", free, self.tubid, b"x" * 32, [1], 5.0)
        return self.assertFailure(d, ConnectionLost)
