"""What goes over the bulk-data channel (`taskfarm.bulk.policy`), on a
Clock and in-process fakes: results split and joined, upload capabilities
bounded by the message limit, uploads resolved or failed, and an engine
that falls back to Foolscap."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from taskfarm import serialization, wire
from taskfarm.bulk import channel, policy
from taskfarm.engine.link import EngineLink
from taskfarm.errors import BadRequest, ConnectionLost, MessageTooLarge, from_wire
from taskfarm.serialization import ReceivedBuffer
from taskfarm.wire import CALL

BIG = policy.BULK_MIN
MIB = 1 << 20


def _envelope(taskid: int, data, ok: bool = True) -> tuple:
    return wire.ResultEnvelope(taskid, CALL, ok, data, 0, 1.0, 2.0, 3.0).plain()


def _frames(nbytes: int):
    return serialization.dumps_value(bytes(range(256)) * (nbytes // 256))


class SplitJoinTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.offers = channel.Offers(task.Clock())

    def test_all_frames_move_when_the_answer_is_big(self):
        """The answer's frames total the threshold: every result held as
        frames moves, the small one too (one transfer for all); blobs,
        failures and unfinished tasks stay."""
        big, other = _frames(BIG), _frames(2 * BIG)
        small = _frames(BIG // 2)
        error = wire.WireError("KeyError", "x").plain()
        envelopes = [_envelope(1, big), _envelope(2, small), None,
                     _envelope(3, error, ok=False), _envelope(4, b"blob"), _envelope(5, other)]
        answer = wire.BulkResults.parse(policy.results_answer(envelopes, self.offers))
        self.assertEqual(answer.moved, [(0, len(big)), (1, len(small)), (5, len(other))])
        self.assertEqual(answer.envelopes[0][3], b"")
        self.assertEqual(answer.envelopes[1][3], b"")
        self.assertEqual(answer.envelopes[2:5], envelopes[2:5])
        self.assertEqual(answer.sizes, [memoryview(p).nbytes for p in (*big, *small, *other)])
        self.assertEqual(len(self.offers), 1)
        parts = self.offers.take(answer.capability, channel.GET)
        received = [ReceivedBuffer(memoryview(p)) for p in parts]
        joined = policy.join_results(answer, received)
        for index, frames in ((0, big), (1, small), (5, other)):
            value = serialization.loads(wire.ResultEnvelope.parse(joined[index]).data)
            self.assertEqual(value, serialization.loads(frames))

    def test_many_small_results_at_below_above_the_threshold(self):
        """1 MiB results: their total decides, at, just below and above
        the threshold; a hundred go as one capability."""
        frames = _frames(MIB)
        one = serialization.frames_size(frames)
        four = [_envelope(i, frames) for i in range(4)]
        moved = policy.split_results(four, threshold=4 * one)[2]
        self.assertEqual(moved, [(i, len(frames)) for i in range(4)])
        self.assertEqual(policy.split_results(four, threshold=4 * one + 1)[1:], ([], []))
        self.assertEqual(len(policy.split_results(four, threshold=3 * one)[2]), 4)
        # With the default threshold (4 MiB): three stay, four move.
        self.assertEqual(policy.split_results(four[:3])[2], [])
        self.assertEqual(len(policy.split_results(four)[2]), 4)
        hundred = [_envelope(i, frames) for i in range(100)]
        answer = wire.BulkResults.parse(policy.results_answer(hundred, self.offers))
        self.assertEqual(len(answer.moved), 100)
        self.assertEqual(len(answer.sizes), 100 * len(frames))
        self.assertEqual(len(self.offers), 1)
        parts = self.offers.take(answer.capability, channel.GET)
        joined = policy.join_results(answer, [ReceivedBuffer(memoryview(p)) for p in parts])
        self.assertEqual([serialization.loads(wire.ResultEnvelope.parse(e).data) for e in joined],
                         [serialization.loads(frames)] * 100)

    def test_small_results_below_the_threshold_stay(self):
        small = _frames(BIG // 4)
        envelopes = [_envelope(1, small), _envelope(2, small), _envelope(3, b"blob")]
        answer = policy.results_answer(envelopes, self.offers)
        self.assertEqual(answer[1:], (None, [], []))
        self.assertEqual(len(self.offers), 0)

    def test_engine_outcomes_move_their_big_values(self):
        big = _frames(BIG)
        outcomes = [wire.EngineOutcome(0, True, big).plain(),
                    wire.EngineOutcome(1, True, b"small").plain(),
                    wire.EngineOutcome(2, False, wire.WireError("E", "x").plain()).plain()]
        bulk = policy.BulkPolicy(self.offers, "127.0.0.1:1")
        answer = wire.BulkResults.parse(bulk.outcomes_answer(outcomes))
        self.assertEqual(answer.moved, [(0, len(big))])
        self.assertEqual(answer.envelopes[0][2], b"")
        self.assertEqual(answer.envelopes[1:], outcomes[1:])
        parts = self.offers.take(answer.capability, channel.GET)
        joined = policy.join_results(answer, [ReceivedBuffer(memoryview(p)) for p in parts],
                                     data_at=2)
        value = serialization.loads(wire.EngineOutcome.parse(joined[0]).data)
        self.assertEqual(value, serialization.loads(big))
        self.assertEqual(bulk.offered, 1)

    def test_at_the_threshold_moves_just_below_stays(self):
        frames = _frames(BIG)
        size = serialization.frames_size(frames)
        moved = policy.split_results([_envelope(1, frames)], threshold=size)[2]
        self.assertEqual(moved, [(0, len(frames))])
        kept = policy.split_results([_envelope(1, frames)], threshold=size + 1)[2]
        self.assertEqual(kept, [])

    def test_nothing_big_gives_no_capability(self):
        answer = policy.results_answer([_envelope(1, b"x")], self.offers)
        self.assertEqual(answer[1:], (None, [], []))
        self.assertEqual(len(self.offers), 0)

    def test_a_transfer_of_other_parts_is_refused(self):
        answer = wire.BulkResults.parse(
            policy.results_answer([_envelope(1, _frames(BIG))], self.offers))
        with self.assertRaises(BadRequest):
            policy.join_results(answer, [])

    def test_received_arrays_keep_their_buffer(self):
        """`loads` hands a whole ReceivedBuffer to NumPy: no copy, and the
        array is writable only if it was."""
        import numpy

        for writeable in (True, False):
            array = numpy.arange(BIG // 8, dtype=numpy.float64)
            array.flags.writeable = writeable
            header, *buffers = serialization.dumps_value(array)
            received = [ReceivedBuffer(memoryview(header))] + [
                ReceivedBuffer(memoryview(b)) for b in buffers]
            back = serialization.loads(received)
            self.assertTrue(numpy.array_equal(back, array))
            self.assertEqual(back.flags.writeable, writeable)
            self.assertFalse(back.flags.owndata)


class UploadPolicyTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.bulk = policy.BulkPolicy(channel.Offers(self.clock), "127.0.0.1:1")

    def test_sizes_at_the_limit_are_accepted_over_it_refused(self):
        self.assertIsNotNone(self.bulk.upload_capability("task", [600, 400], 1000))
        with self.assertRaises(MessageTooLarge):
            self.bulk.upload_capability("task", [600, 401], 1000)
        with self.assertRaises(MessageTooLarge):
            self.bulk.upload_capability("task", [0] * (serialization.parts_limit(1000) + 1), 1000)
        self.assertEqual(self.bulk.uploads, 1)

    def test_bad_sizes_are_a_bad_request(self):
        for sizes in ([], [-1], ["1"], None, [True]):
            with self.assertRaises(BadRequest):
                self.bulk.upload_capability("task", sizes, 1000)

    def test_only_task_and_pull_replies_are_uploaded(self):
        self.assertIsNotNone(self.bulk.upload_capability("pull", [10], 1000))
        self.bulk.offers.clear()
        for op in ("execute", "push", None):
            self.assertIsNone(self.bulk.upload_capability(op, [10], 1000))
        self.assertEqual(len(self.bulk.offers), 0)

    def test_a_completed_upload_becomes_the_replys_frames(self):
        cap = self.bulk.upload_capability("task", [3, 4], 1000)
        self.bulk.offers.take(cap, channel.PUT)
        self.bulk.offers.deposit(cap, [ReceivedBuffer(b"abc"), ReceivedBuffer(b"defg")])
        reply = wire.Reply.parse(wire.Reply(7, True, b"", 1.0, 2.0, upload=cap).plain())
        resolved = self.bulk.resolve_upload(reply)
        self.assertIsNone(resolved.upload)
        self.assertEqual([bytes(p.raw()) for p in resolved.data], [b"abc", b"defg"])
        self.assertEqual(len(self.bulk.offers), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_upload_not_held_fails_the_reply(self):
        """Never partial: an upload that did not complete (or expired) is a
        ConnectionLost failure of that reply."""
        cap = self.bulk.upload_capability("task", [3], 1000)
        self.bulk.offers.take(cap, channel.PUT)  # under way, never deposited
        reply = wire.Reply(7, True, b"", 1.0, 2.0, upload=cap)
        resolved = self.bulk.resolve_upload(reply)
        self.assertFalse(resolved.ok)
        self.assertIsInstance(from_wire(resolved.data), ConnectionLost)
        self.clock.advance(60)
        self.assertEqual(len(self.bulk.offers), 0)


class BatchUploadPolicyTests(unittest.SynchronousTestCase):
    """Several replies' frames in one upload: the controller's side."""

    def setUp(self):
        self.clock = task.Clock()
        self.bulk = policy.BulkPolicy(channel.Offers(self.clock), "127.0.0.1:1")
        self.ops = {1: "task", 2: "task", 3: "pull", 4: "execute"}

    def test_a_batch_gets_one_capability_bounded_by_the_limit(self):
        cap = self.bulk.upload_capability_for(self.ops.get, 1, [(1, [300, 200]), (2, [500])], 1000)
        self.assertIsNotNone(cap)
        self.assertEqual(self.bulk.offers.take(cap, channel.PUT), [300, 200, 500])
        with self.assertRaises(MessageTooLarge):
            self.bulk.upload_capability_for(self.ops.get, 1, [(1, [600]), (2, [401])], 1000)
        self.assertEqual(self.bulk.uploads, 1)

    def test_a_batch_with_a_reply_of_another_command_goes_over_foolscap(self):
        for seq in (4, 9):  # not an upload op; not in flight
            self.assertIsNone(
                self.bulk.upload_capability_for(self.ops.get, 1, [(1, [10]), (seq, [10])], 1000))
        self.assertEqual(len(self.bulk.offers), 0)

    def test_bad_batches_are_a_bad_request(self):
        for groups in ([(1, [10]), (1, [10])], [(1, [])], [(1, [10]), ("2", [1])],
                       [(1, [10], 3)], [(1, [-1]), (2, [1])]):
            with self.assertRaises(BadRequest):
                self.bulk.upload_capability_for(self.ops.get, 1, groups, 1000)

    def _uploaded(self, groups, contents):
        cap = self.bulk.upload_capability_for(self.ops.get, groups[0][0], groups, 1000)
        self.bulk.offers.take(cap, channel.PUT)
        self.bulk.offers.deposit(cap, [ReceivedBuffer(c) for c in contents])
        return cap

    def test_a_completed_batch_is_shared_among_its_replies_in_order(self):
        cap = self._uploaded([(1, [3, 4]), (3, [2])], [b"abc", b"defg", b"hi"])
        replies = [wire.Reply(3, True, b"", 1.0, 2.0, upload=cap),
                   wire.Reply(2, True, b"plain", 1.0, 2.0),
                   wire.Reply(1, True, b"", 1.0, 2.0, upload=cap)]
        resolved = self.bulk.resolve_uploads(replies)
        self.assertEqual([r.upload for r in resolved], [None] * 3)
        self.assertEqual([bytes(p.raw()) for p in resolved[0].data], [b"hi"])
        self.assertEqual(resolved[1].data, b"plain")
        self.assertEqual([bytes(p.raw()) for p in resolved[2].data], [b"abc", b"defg"])
        self.assertEqual(len(self.bulk.offers), 0)
        self.assertEqual(self.bulk._batches, {})

    def test_a_batch_not_held_whole_fails_every_reply_never_partial(self):
        cap = self.bulk.upload_capability_for(self.ops.get, 1, [(1, [3]), (2, [3])], 1000)
        self.bulk.offers.take(cap, channel.PUT)  # under way, never deposited
        replies = [wire.Reply(1, True, b"", 1.0, 2.0, upload=cap),
                   wire.Reply(2, True, b"", 1.0, 2.0, upload=cap)]
        for reply in self.bulk.resolve_uploads(replies):
            self.assertFalse(reply.ok)
            self.assertIsInstance(from_wire(reply.data), ConnectionLost)
        self.assertEqual(self.bulk._batches, {})

    def test_a_reply_the_batch_does_not_list_fails(self):
        cap = self._uploaded([(1, [3]), (2, [1])], [b"abc", b"d"])
        replies = [wire.Reply(1, True, b"", 1.0, 2.0, upload=cap),
                   wire.Reply(3, True, b"", 1.0, 2.0, upload=cap)]
        first, stranger = self.bulk.resolve_uploads(replies)
        self.assertEqual([bytes(p.raw()) for p in first.data], [b"abc"])
        self.assertIsInstance(from_wire(stranger.data), ConnectionLost)

    def test_a_batch_under_way_is_kept_while_another_is_asked_for(self):
        """A batch whose transfer has begun (taken, not yet deposited) keeps
        its record when the next batch comes: its replies still share it."""
        groups = [(1, [3]), (2, [1])]
        cap = self.bulk.upload_capability_for(self.ops.get, 1, groups, 1000)
        self.bulk.offers.take(cap, channel.PUT)
        self.bulk.upload_capability_for(self.ops.get, 3, [(3, [1])], 1000)
        self.bulk.offers.deposit(cap, [ReceivedBuffer(b"abc"), ReceivedBuffer(b"d")])
        first, second = self.bulk.resolve_uploads(
            [wire.Reply(1, True, b"", 1.0, 2.0, upload=cap),
             wire.Reply(2, True, b"", 1.0, 2.0, upload=cap)])
        self.assertEqual([bytes(p.raw()) for p in first.data], [b"abc"])
        self.assertEqual([bytes(p.raw()) for p in second.data], [b"d"])

    def test_expired_batches_are_forgotten(self):
        self.bulk.upload_capability_for(self.ops.get, 1, [(1, [3]), (2, [3])], 1000)
        self.clock.advance(61)
        self.bulk.upload_capability_for(self.ops.get, 1, [(1, [3]), (2, [3])], 1000)
        self.assertEqual(len(self.bulk._batches), 1)


class PushPolicyTests(unittest.SynchronousTestCase):
    """A client's upload of a push's value: the controller's side."""

    def setUp(self):
        self.clock = task.Clock()
        self.bulk = policy.BulkPolicy(channel.Offers(self.clock), "127.0.0.1:1")

    def _call(self, args=(b"",), op="push", per_target=None):
        return wire.EngineCall(op, "all", args, per_target, None)

    def test_the_capability_is_bounded_by_the_limit(self):
        self.assertIsNotNone(self.bulk.push_capability([600, 400], 1000))
        with self.assertRaises(MessageTooLarge):
            self.bulk.push_capability([600, 401], 1000)
        for sizes in ([], [-1], None):
            with self.assertRaises(BadRequest):
                self.bulk.push_capability(sizes, 1000)

    def test_a_completed_upload_becomes_the_pushs_value(self):
        frames = _frames(BIG)
        cap = self.bulk.push_capability([memoryview(p).nbytes for p in frames], 1 << 30)
        self.bulk.offers.take(cap, channel.PUT)
        self.bulk.offers.deposit(cap, [ReceivedBuffer(memoryview(p)) for p in frames])
        call = self.bulk.uploaded_call(self._call(), cap)
        self.assertEqual(call.op, "push")
        self.assertEqual(serialization.loads(call.args[0]), serialization.loads(frames))
        self.assertEqual(len(self.bulk.offers), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_upload_not_held_whole_never_pushes(self):
        """The client died mid-upload (or it expired): ConnectionLost, and
        the offer is gone after its ttl."""
        cap = self.bulk.push_capability([3], 1000)
        self.bulk.offers.take(cap, channel.PUT)  # under way, never deposited
        with self.assertRaises(ConnectionLost):
            self.bulk.uploaded_call(self._call(), cap)
        cap = self.bulk.push_capability([3], 1000)
        self.clock.advance(61)
        with self.assertRaises(ConnectionLost):
            self.bulk.uploaded_call(self._call(), cap)
        self.assertEqual(len(self.bulk.offers), 0)

    def test_only_a_push_of_nothing_takes_an_upload(self):
        cap = self.bulk.push_capability([3], 1000)
        for call in (self._call(op="execute", args=("x",)), self._call(args=(b"v",)),
                     self._call(per_target={0: (b"",)})):
            with self.assertRaises(BadRequest):
                self.bulk.uploaded_call(call, cap)
        with self.assertRaises(BadRequest):
            self.bulk.uploaded_call(self._call(), b"short")
        self.assertEqual(len(self.bulk.offers), 1)  # untouched


UPLOAD = policy.UPLOAD_MIN


class _Session:
    """An engine session whose upload request answers `answer`."""

    engine_id = 0
    max_message_size = 1 << 30
    location = "here"
    bulk_location = "127.0.0.1:1"
    tubid = "x"

    def __init__(self, answer):
        self.answer = answer
        self.sent: list = []
        self.asked: list = []

    def request_upload(self, seq, sizes):
        self.asked.append((seq, sizes))
        return self.answer

    def send_replies(self, message) -> bool:
        self.sent.append(message)
        return True


class EngineFallbackTests(unittest.SynchronousTestCase):
    def send(self, session, replies):
        link = EngineLink(lambda: "", None, task.Clock(), transport=object())
        link._sender(session)(replies)

    def test_a_failed_upload_request_replies_over_foolscap(self):
        frames = _frames(UPLOAD)
        reply = wire.Reply(3, True, frames, 1.0, 2.0).plain()
        small = wire.Reply(4, True, b"small", 1.0, 2.0).plain()
        session = _Session(defer.fail(ConnectionLost("gone")))
        self.send(session, [reply, small])
        self.assertEqual(session.asked, [(3, [memoryview(p).nbytes for p in frames])])
        sent = [wire.Reply.parse(r) for m in session.sent for r in serialization.unpack(m)]
        self.assertEqual(sorted(r.seq for r in sent), [3, 4])
        big = next(r for r in sent if r.seq == 3)
        self.assertIsNone(big.upload)
        self.assertEqual(serialization.loads(big.data), serialization.loads(frames))
        self.flushLoggedErrors()

    def test_the_controller_may_want_it_over_foolscap(self):
        session = _Session(defer.succeed(None))
        self.send(session, [wire.Reply(3, True, _frames(UPLOAD), 1.0, 2.0).plain()])
        (message,) = session.sent
        (reply,) = serialization.unpack(message)
        self.assertIsNone(wire.Reply.parse(reply).upload)

    def test_a_reply_below_the_upload_threshold_is_not_uploaded(self):
        session = _Session(defer.succeed(b"c" * 32))
        self.send(session, [wire.Reply(3, True, _frames(UPLOAD // 2), 1.0, 2.0).plain()])
        self.assertEqual(session.asked, [])
        self.assertEqual(len(session.sent), 1)

    def test_without_a_channel_nothing_is_asked(self):
        session = _Session(None)
        session.bulk_location = None
        self.send(session, [wire.Reply(3, True, _frames(UPLOAD), 1.0, 2.0).plain()])
        self.assertEqual(session.asked, [])
        self.assertEqual(len(session.sent), 1)

    def test_the_batch_total_decides_what_is_uploaded(self):
        """1 MiB replies: below the upload threshold in total, none is
        uploaded; at it, all in one request (one capability)."""
        frames = _frames(MIB)
        one = serialization.frames_size(frames)
        replies = [wire.Reply(i, True, frames, 1.0, 2.0).plain() for i in range(10)]
        small = wire.Reply(99, True, b"small", 1.0, 2.0).plain()
        self.assertEqual(policy.big_replies(replies[:2] + [small], threshold=2 * one + 1), [])
        self.assertEqual(policy.big_replies(replies[:2] + [small], threshold=2 * one),
                         replies[:2])
        count = -(-UPLOAD // one)  # the fewest 1 MiB replies at the default threshold
        self.assertEqual(policy.big_replies(replies[: count - 1]), [])
        self.assertEqual(len(policy.big_replies(replies[:count])), count)
        session = _Session(defer.succeed(None))
        self.send(session, replies[:count] + [small])
        (seq, groups), = session.asked
        self.assertEqual(seq, 0)
        self.assertEqual(groups, [(i, [memoryview(p).nbytes for p in frames]) for i in range(count)])
        sent = [wire.Reply.parse(r) for m in session.sent for r in serialization.unpack(m)]
        self.assertEqual(sorted(r.seq for r in sent), list(range(count)) + [99])
        self.assertTrue(all(r.upload is None for r in sent))

    def test_a_failed_batch_upload_replies_over_foolscap(self):
        frames = _frames(MIB)
        replies = [wire.Reply(i, True, frames, 1.0, 2.0).plain() for i in range(9)]
        session = _Session(defer.fail(ConnectionLost("gone")))
        self.send(session, replies)
        sent = [wire.Reply.parse(r) for m in session.sent for r in serialization.unpack(m)]
        self.assertEqual(sorted(r.seq for r in sent), list(range(9)))
        self.assertEqual(serialization.loads(sent[0].data), serialization.loads(frames))
        self.flushLoggedErrors()


class ReplyVersionTests(unittest.SynchronousTestCase):
    def test_an_uploaded_reply_round_trips_as_version_5(self):
        cap = b"c" * wire.CAPABILITY_BYTES
        reply = wire.Reply(1, True, b"", 1.0, 2.0, "out", None, cap)
        plain = reply.plain()
        self.assertEqual(plain[5], 5)
        self.assertEqual(wire.Reply.parse(serialization.unpack(serialization.pack(plain))), reply)
        # Without an upload, the older versions as before.
        self.assertEqual(len(reply._replace(upload=None).plain()), 8)
        self.assertEqual(len(wire.Reply(1, True, b"x", 1.0, 2.0).plain()), 5)


class BulkListenOptionTests(unittest.SynchronousTestCase):
    """``twistd taskcontroller --bulk-listen``."""

    def parse(self, *argv):
        from taskfarm.controller.tap import Options

        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_default_none_and_an_endpoint(self):
        self.assertIsNone(self.parse()["bulk-listen"])
        self.assertEqual(self.parse("--bulk-listen", "none")["bulk-listen"], "none")
        endpoint = "tcp:10106:interface=127.0.0.1"
        self.assertEqual(self.parse("--bulk-listen", endpoint)["bulk-listen"], endpoint)

    def test_a_bad_endpoint_is_a_usage_error_naming_the_option(self):
        from twisted.python import usage

        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--bulk-listen", "udp:1")
        self.assertIn("--bulk-listen", str(caught.exception))


class ReceivedBufferTests(unittest.SynchronousTestCase):
    """Frames received into `ReceivedBuffer`s are read without a copy."""

    def test_a_pulled_envelope_keeps_its_received_buffers(self):
        import numpy

        array = numpy.arange(BIG // 8, dtype=numpy.float64)
        envelope = serialization.pack_frames((serialization.dumps_value(array),))
        received = [ReceivedBuffer(memoryview(p)) for p in envelope]
        frames = wire.EngineOutcome.parse((0, True, received)).data
        (value_frames,) = serialization.unpack(frames)
        value = serialization.loads(value_frames)
        self.assertTrue(numpy.array_equal(value, array))
        self.assertTrue(value.flags.writeable)
        self.assertFalse(value.flags.owndata)
        base = value
        while getattr(base, "base", None) is not None:
            base = base.base
        self.assertTrue(any(base is r or getattr(base, "obj", None) is r for r in received))

    def test_other_bytearrays_are_still_refused_in_a_message(self):
        with self.assertRaises(BadRequest):
            serialization.unpack([bytearray(serialization.pack(1))])
