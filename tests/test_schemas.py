"""The message limit belongs to each Referenceable, not to the process:
`schemas.bounded` copies, and real Tubs in one process that each refuse
only what is over their own limit, while the header is read."""

from __future__ import annotations

from foolscap.api import Violation
from twisted.internet import reactor
from twisted.trial import unittest
from zope.interface import implementer

from taskfarm.remote import schemas
from taskfarm.remote.schemas import MESSAGE, BoundedReferenceable, bounded, bounded_call
from taskfarm.remote.tub import listen_and_locate, new_tub
from taskfarm.serialization import DEFAULT_MAX_MESSAGE_SIZE, parts_limit
from taskfarm.testing.helpers import async_test as run


@implementer(schemas.RIEngineSession)
class _Sink(BoundedReferenceable):
    """Counts the bytes of each `replies` batch it is sent."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.received: list[int] = []

    def remote_replies(self, batch):
        self.received.append(sum(map(len, batch)))


def _string_limit(constraint) -> int:
    """The byte-string bound of a `MESSAGE`, or of each part of a `PARTS`."""
    if hasattr(constraint, "constraint"):
        return constraint.constraint.maxLength
    return constraint.maxLength


class BoundedTests(unittest.SynchronousTestCase):
    def test_copies_bound_only_messages(self):
        """A bounded copy limits every MESSAGE argument and answer to its
        limit, keeps the other constraints, and is made once per limit; the
        declared interface stays at the default."""
        small = bounded(schemas.RITaskController, 1024)
        self.assertIs(bounded(schemas.RITaskController, 1024), small)
        self.assertIsNot(bounded(schemas.RITaskController, 2048), small)
        submit = small["submit"]
        self.assertEqual(_string_limit(submit.argConstraints["batch"]), 1024)
        self.assertEqual(submit.responseConstraint.maxLength, 1024)
        # A message in parts: each part, and how many, bounded for the limit.
        batch = submit.argConstraints["batch"]
        self.assertEqual(batch.maxLength, parts_limit(1024))
        self.assertEqual(_string_limit(small["results"].responseConstraint), 1024)
        results = small["results"]
        self.assertIs(
            results.argConstraints["block"],
            schemas.RITaskController["results"].argConstraints["block"],
        )
        self.assertEqual(sorted(small.names()), sorted(schemas.RITaskController.names()))
        self.assertEqual(MESSAGE.maxLength, DEFAULT_MAX_MESSAGE_SIZE)
        self.assertEqual(
            _string_limit(schemas.RITaskController["submit"].argConstraints["batch"]),
            DEFAULT_MAX_MESSAGE_SIZE,
        )

    def test_a_referenceable_announces_the_declared_name(self):
        """Peers see the versioned declared name; Foolscap's inbound checks
        get the bounded copy."""
        sink = _Sink(1000)
        self.assertEqual(sink.getInterfaceName(), "taskfarm.RIEngineSession.v1")
        self.assertIs(sink.getInterface(), bounded(schemas.RIEngineSession, 1000))
        self.assertEqual(_string_limit(sink.getInterface()["replies"].argConstraints["batch"]), 1000)


class PerTubLimitTests(unittest.TestCase):
    timeout = 60

    def tub(self, listen: bool = True):
        tub = new_tub()
        if listen:
            listen_and_locate(tub, "tcp:0:interface=127.0.0.1", None, reactor)
        tub.startService()
        self.addCleanup(tub.stopService)
        return tub

    async def send(self, client, furl: str, size: int):
        """None if a `replies` batch of `size` bytes was taken, else the error text."""
        ref = await client.getReference(furl)
        try:
            await ref.callRemote("replies", [b"x" * size])
        except Exception as e:
            return str(e)
        return None

    @run
    async def test_two_tubs_in_one_process_keep_their_own_limits(self):
        """A Tub serving at 1,000 bytes and one at 5,000 (and, on the first
        Tub, a second object at 5,000) each refuse only what exceeds their
        own limit, with Foolscap's token check, and take the rest."""
        small_tub, big_tub = self.tub(), self.tub()
        small, big, big_on_small_tub = _Sink(1000), _Sink(5000), _Sink(5000)
        furls = {
            "small": small_tub.registerReference(small),
            "big": big_tub.registerReference(big),
            "big_on_small_tub": small_tub.registerReference(big_on_small_tub),
        }
        client = self.tub(listen=False)
        refused = await self.send(client, furls["small"], 3000)
        self.assertIn("STRING token too large: 3000>1000", refused)
        self.assertIsNone(await self.send(client, furls["small"], 1000))
        self.assertIsNone(await self.send(client, furls["big"], 3000))
        self.assertIsNone(await self.send(client, furls["big_on_small_tub"], 3000))
        refused = await self.send(client, furls["big"], 6000)
        self.assertIn("STRING token too large: 6000>5000", refused)
        self.assertEqual(small.received, [1000])
        self.assertEqual(big.received, [3000])
        self.assertEqual(big_on_small_tub.received, [3000])

    @run
    async def test_a_sender_checks_against_the_peer_limit(self):
        """With `bounded_call`, a call over the peer's limit is refused on our
        side before anything is sent; at the limit it goes through."""
        server = self.tub()
        sink = _Sink(1000)
        ref = await self.tub(listen=False).getReference(server.registerReference(sink))
        with self.assertRaises(Violation) as caught:
            await ref.callRemote("replies", [b"x" * 1001], **bounded_call(ref, "replies", 1000))
        self.assertIn("too long (1001 > 1000)", str(caught.exception))
        await ref.callRemote("replies", [b"x" * 1000], **bounded_call(ref, "replies", 1000))
        self.assertEqual(sink.received, [1000])
