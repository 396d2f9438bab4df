"""Big values out of band: pickle-5 buffers from the engine to the client,
relayed by the controller as opaque byte strings.

Unit tests: `serialization` (frames, messages in parts, limits, the
journal's form), `wire` (frames in value fields, old forms still read),
and whole round trips through a `LocalGrid` (the real clients, the real
Referenceables and controller, the in-process transport that carries each
part as Foolscap would).
"""

from __future__ import annotations

import pickle

import numpy
from twisted.internet import defer
from twisted.trial import unittest

from taskfarm import serialization, wire
from taskfarm.batching import pickled_size_bound
from taskfarm.errors import BadRequest, MessageTooLarge
from taskfarm.remote.server import fit_results
from taskfarm.serialization import OOB_MIN
from taskfarm.task import MapTask, Task, result_from_envelope
from taskfarm.testing.grid import LocalGrid

BIG = OOB_MIN * 4


def _arrays() -> dict:
    """Every kind of array the data path must carry, big and small."""
    n = BIG // 8
    return {
        "float64": numpy.arange(n, dtype=numpy.float64),
        "int8": (numpy.arange(BIG) % 127).astype(numpy.int8),
        "complex128": numpy.arange(n // 2) * (1 + 2j),
        "bool": numpy.arange(BIG) % 3 == 0,
        "uint16_2d": numpy.arange(n * 4, dtype=numpy.uint16).reshape(-1, 64),
        "structured": numpy.zeros(n // 2, dtype=[("a", "<i4"), ("b", "<f8"), ("c", "S4")]),
        "datetime": numpy.arange(0, n, dtype="datetime64[s]"),
        "big_endian": numpy.arange(n, dtype=">f8"),
        "fortran": numpy.asfortranarray(numpy.arange(n, dtype=numpy.float64).reshape(256, -1)),
        "non_contiguous": numpy.arange(2 * n, dtype=numpy.float64).reshape(-1, 64)[:, ::2],
        "zero_d": numpy.array(3.5),
        "empty": numpy.zeros((0, 7)),
        "small": numpy.arange(10),
        "object": numpy.array([1, "a", None], dtype=object),
    }


def _readonly(array):
    array = array.copy()
    array.flags.writeable = False
    return array


class FramesTests(unittest.SynchronousTestCase):
    """`dumps_value` / `loads`: every buffer kind, and what stays a blob."""

    def roundtrip(self, value):
        frames = serialization.dumps_value(value)
        # What the controller stores and relays: the message's parts.
        message = serialization.pack_message((1, True, frames))
        _, _, received = serialization.unpack(message, 10 * BIG)
        stored = wire.Reply.parse((1, True, received, None, 1.0)).data
        return frames, serialization.loads(stored)

    def assert_same_array(self, got, want):
        self.assertIs(type(got), numpy.ndarray)
        self.assertEqual((got.dtype, got.shape), (want.dtype, want.shape))
        self.assertTrue(numpy.array_equal(got, want) or got.dtype.kind == "O" and list(got) == list(want))
        self.assertEqual(got.flags.writeable, want.flags.writeable)
        self.assertEqual(got.flags.f_contiguous and not got.flags.c_contiguous,
                         want.flags.f_contiguous and not want.flags.c_contiguous)

    def test_every_array_kind(self):
        """Arrays of several dtypes, 2-d, Fortran-ordered, non-contiguous,
        0-d, empty and object come back equal, with their dtype, shape,
        order and writability; big contiguous ones travel out of band."""
        for name, array in _arrays().items():
            frames, got = self.roundtrip(array)
            self.assert_same_array(got, array)
            big_contiguous = array.nbytes >= OOB_MIN and array.dtype.kind != "O" and (
                array.flags.c_contiguous or array.flags.f_contiguous)
            self.assertEqual(serialization.is_frames(frames), big_contiguous, name)
            if big_contiguous:
                self.assertEqual(memoryview(frames[1]).nbytes, array.nbytes, name)
        # Non-contiguous data: numpy's own pickle, in the stream, still right.
        self.assertFalse(_arrays()["non_contiguous"].flags.c_contiguous)

    def test_a_readonly_array_stays_readonly_without_a_copy(self):
        array = _readonly(numpy.arange(BIG // 8, dtype=numpy.float64))
        frames = serialization.dumps_value(array)
        parts = serialization.pack_message(frames)
        got = serialization.loads(serialization.unpack(parts))
        self.assertFalse(got.flags.writeable)
        base = got
        while isinstance(base, numpy.ndarray):
            base = base.base
        self.assertTrue(base is parts[2], "the array is not a view of the received bytes")
        self.assertTrue(numpy.array_equal(got, array))

    def test_a_writable_array_comes_back_writable(self):
        _, got = self.roundtrip(numpy.zeros(BIG // 8))
        got[0] = 1.0  # its own memory, not the received bytes
        self.assertEqual(got[0], 1.0)

    def test_bytes_travel_as_themselves(self):
        """A big bytes value is the very object out of band at each hop:
        the engine's, the message part, the client's."""
        blob = b"b" * BIG
        frames = serialization.dumps_value(blob)
        message = serialization.pack_message(frames)
        self.assertIs(message[2], blob)
        received = serialization.unpack(message)
        self.assertIs(received[1], blob)
        self.assertIs(serialization.loads(wire.Reply.parse((1, True, received, None, 1.0)).data), blob)

    def test_bytearray_and_memoryview(self):
        for value in (bytearray(b"a" * BIG), memoryview(b"m" * BIG),
                      memoryview(bytearray(b"w" * BIG)),
                      memoryview(numpy.arange(BIG // 8, dtype=numpy.float64)).cast("B").cast("d"),
                      memoryview(b"tiny"), bytearray(b"tiny")):
            frames, got = self.roundtrip(value)
            self.assertIs(type(got), type(value))
            self.assertEqual(bytes(got), bytes(value))
            if isinstance(value, memoryview):
                self.assertEqual((got.format, got.shape, got.readonly),
                                 (value.format, value.shape, value.readonly))
            self.assertEqual(serialization.is_frames(frames), len(bytes(value)) >= OOB_MIN)

    def test_a_non_contiguous_memoryview(self):
        value = memoryview(bytearray(range(256)) * (BIG // 256))[::2]
        _, got = self.roundtrip(value)
        self.assertEqual(bytes(got), bytes(value))

    def test_nested_in_dicts_and_lists(self):
        arrays = _arrays()
        value = {
            "blob": b"x" * BIG,
            "list": [bytearray(b"y" * BIG), arrays["float64"], (1, b"z" * BIG)],
            "nested": {"f": arrays["fortran"], "nc": arrays["non_contiguous"], "n": None},
            "small": b"s",
        }
        frames, got = self.roundtrip(value)
        self.assertGreaterEqual(len(frames), 6)  # the header and 5 buffers at least
        self.assertEqual(got["blob"], value["blob"])
        self.assertEqual(got["list"][0], value["list"][0])
        self.assertIs(type(got["list"][0]), bytearray)
        self.assert_same_array(got["list"][1], arrays["float64"])
        self.assertEqual(got["list"][2], (1, b"z" * BIG))
        self.assert_same_array(got["nested"]["f"], arrays["fortran"])
        self.assert_same_array(got["nested"]["nc"], arrays["non_contiguous"])
        self.assertEqual((got["nested"]["n"], got["small"]), (None, b"s"))

    def test_just_below_and_at_the_out_of_band_threshold(self):
        below, at = b"x" * (OOB_MIN - 1), b"x" * OOB_MIN
        self.assertIsInstance(serialization.dumps_value(below), bytes)
        frames = serialization.dumps_value(at)
        self.assertTrue(serialization.is_frames(frames))
        self.assertEqual(serialization.loads(frames), at)
        self.assertEqual(serialization.loads(serialization.dumps_value(below)), below)

    def test_small_values_stay_one_blob_that_old_readers_read(self):
        blob = serialization.dumps_value({"a": 1, "b": [1.0, "x"]})
        self.assertIsInstance(blob, bytes)
        self.assertEqual(pickle.loads(blob), {"a": 1, "b": [1.0, "x"]})


class MessageTests(unittest.SynchronousTestCase):
    """`pack_message` / `unpack`: parts, limits, the data-only unpickler."""

    def message(self, *sizes):
        return serialization.pack_message([serialization.dumps_value(b"x" * s) for s in sizes])

    def test_limit_on_the_whole_message_below_at_above(self):
        parts = self.message(BIG, BIG)
        size = serialization.message_size(parts)
        self.assertEqual(size, serialization.packed_size(
            [serialization.dumps_value(b"x" * BIG) for _ in range(2)]))
        self.assertEqual(len(serialization.unpack(parts, size + 1)), 2)
        self.assertEqual(len(serialization.unpack(parts, size)), 2)
        with self.assertRaises(MessageTooLarge):
            serialization.unpack(parts, size - 1)

    def test_too_many_parts(self):
        limit = 4 * OOB_MIN
        parts = [serialization.pack([])] + [b""] * serialization.parts_limit(limit)
        with self.assertRaises(MessageTooLarge):
            serialization.unpack(parts, limit)

    def test_parts_never_carry_code(self):
        """The envelope of a message in parts is read by the data-only
        unpickler: a class in it is refused, whatever its buffers."""
        evil = pickle.dumps(BadRequest("x"), protocol=5)
        for message in ([evil], [evil, b"x" * 10]):
            with self.assertRaises(BadRequest):
                serialization.unpack(message)
        with self.assertRaises(BadRequest):
            serialization.unpack(["not bytes"])
        with self.assertRaises(BadRequest):
            serialization.unpack([])
        # A buffer the envelope does not account for is harmless data, one
        # too few is malformed.
        header = pickle.dumps(pickle.PickleBuffer(b"y" * 10), protocol=5, buffer_callback=lambda b: False)
        with self.assertRaises(BadRequest):
            serialization.unpack([header])

    def test_sizes_count_buffers_once(self):
        frames = serialization.dumps_value(b"x" * BIG)
        reply = (1, True, frames, 1.0, 2.0)
        exact = serialization.packed_size(reply)
        self.assertGreaterEqual(pickled_size_bound(reply), exact)
        self.assertLess(pickled_size_bound(reply), exact + 200)
        self.assertGreater(exact, BIG)

    def test_the_journal_form(self):
        frames = serialization.dumps_value({"a": b"x" * BIG, "b": numpy.arange(BIG // 8)})
        parts = serialization.frames_parts(frames)
        # The parts themselves, not copies: written one after the other.
        self.assertEqual([len(p) for p in parts], [memoryview(f).nbytes for f in frames])
        self.assertIs(parts[1], frames[1].raw().obj)
        back = serialization.as_frames(parts)
        got = serialization.loads(back)
        self.assertEqual(got["a"], b"x" * BIG)
        self.assertTrue(numpy.array_equal(got["b"], numpy.arange(BIG // 8)))


class WireTests(unittest.SynchronousTestCase):
    def test_value_fields_take_frames(self):
        frames = serialization.dumps_value(b"x" * BIG)
        received = serialization.unpack(serialization.pack_message(frames))
        self.assertIsInstance(received, tuple)
        for parsed in (
            wire.Reply.parse((1, True, received, None, 1.0)).data,
            wire.ResultEnvelope.parse((1, "call", True, list(received), 0, 0.0, 1.0, 2.0)).data,
            wire.TaskArgs.parse(("call", received, False, False, None)).payload,
            wire.PushArgs.parse((received,)).values,
            wire.MapArgs.parse((b"f", received)).chunk,
            wire.EngineOutcome.parse((0, True, received)).data,
        ):
            self.assertEqual(serialization.loads(parsed), b"x" * BIG)

    def test_old_forms_still_read(self):
        """Version 1 and 3 result envelopes and replies with one blob (what a
        journal of an older controller holds) parse as before."""
        blob = serialization.dumps(7)
        v1 = (1, "call", True, blob, 0, 0.0, 1.0, 2.0)
        v3 = v1 + (3, 2)
        self.assertEqual(result_from_envelope(v1).value, 7)
        self.assertEqual(result_from_envelope(v3).attempts, 2)
        self.assertEqual(wire.Reply.parse((1, True, blob, None, 1.0)).data, blob)

    def test_bad_frames_are_refused(self):
        for bad in ([], [1, 2], ("a",)):
            with self.assertRaises(BadRequest):
                wire.Reply.parse((1, True, bad, None, 1.0))
        with self.assertRaises(BadRequest):
            wire.ResultEnvelope.parse((1, "call", True, [], 0, 0.0, 1.0, 2.0))

    def test_fit_results_counts_frames(self):
        frames = serialization.dumps_value(b"x" * BIG)
        envelopes = [(i, "call", True, frames, 0, 0.0, 1.0, 2.0) for i in range(4)]
        self.assertEqual(len(fit_results(envelopes, 2 * BIG + 2000)), 2)
        (alone,) = fit_results(envelopes, BIG // 2)
        self.assertIsInstance(result_from_envelope(alone).failure, MessageTooLarge)


def make(kind: str):
    """A value of each kind, made on the engine."""
    import numpy

    n = 4 * 64 * 1024
    values = {
        "bytes": b"r" * n,
        "bytearray": bytearray(b"a" * n),
        "memoryview": memoryview(b"m" * n),
        "float32": numpy.arange(n // 4, dtype=numpy.float32),
        "fortran": numpy.asfortranarray(numpy.arange(n // 8, dtype=numpy.float64).reshape(64, -1)),
        "non_contiguous": numpy.arange(n // 4, dtype=numpy.float64)[::2],
        "zero_d": numpy.array(2.5),
        "empty": numpy.zeros((0, 3), dtype=numpy.int16),
        "nested": {"a": [b"x" * n, numpy.ones(n // 8)], "b": (bytearray(b"y" * n), 1)},
    }
    return values[kind]


KINDS = ["bytes", "bytearray", "memoryview", "float32", "fortran", "non_contiguous",
         "zero_d", "empty", "nested"]


def _fortran(array) -> bool:
    return array.flags.f_contiguous and not array.flags.c_contiguous


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, numpy.ndarray):
        return (type(b) is numpy.ndarray and a.dtype == b.dtype and a.shape == b.shape
                and numpy.array_equal(a, b) and _fortran(a) == _fortran(b))
    if isinstance(a, memoryview):
        return type(b) is memoryview and a.tobytes() == b.tobytes()
    return type(a) is type(b) and a == b


class _GridTestCase(unittest.SynchronousTestCase):
    """The real clients and controller, in-process, with two engines."""

    def setUp(self):
        self.grid = LocalGrid()
        self.addCleanup(self.grid.stop)
        self.grid.add_engine()
        self.grid.add_engine()

    def value(self, d: defer.Deferred):
        for _ in range(500):
            if d.called:
                break
            self.grid.clock.advance(0.001)
        return self.successResultOf(d)


class GridTests(_GridTestCase):
    """Round trips of every buffer kind through the clients and controller."""

    def test_task_results_of_every_kind(self):
        tc = self.grid.task_client()
        for kind in KINDS:
            taskid = self.value(tc.run(MapTask(make, args=(kind,))))
            value = self.value(tc.get_task_result(taskid, block=True))
            self.assertTrue(_equal(make(kind), value), kind)
        values = self.value(tc.map(make, KINDS))
        for kind, got in zip(KINDS, values, strict=True):
            self.assertTrue(_equal(make(kind), got), kind)

    def test_task_pushes_and_pulls_every_kind(self):
        tc = self.grid.task_client()
        push = {kind: make(kind) for kind in KINDS}
        taskid = self.value(tc.run(Task("out = dict(%s)" % ", ".join("%s=%s" % (k, k) for k in KINDS),
                                        push=push, pull="out")))
        result = self.value(tc.get_task_result(taskid, block=True))
        self.assertTrue(_equal(push, result.ns.out))

    def test_multiengine_push_and_pull_every_kind(self):
        mec = self.grid.multiengine_client()
        for kind in KINDS:
            value = make(kind)
            self.value(mec.push({"v": value}, targets=0, block=True))
            (got,) = self.value(mec.pull("v", targets=0, block=True))
            self.assertTrue(_equal(value, got), kind)
        arrays = [make("float32"), make("fortran")]
        self.value(mec.push({"a": arrays[0], "b": arrays[1]}, targets="all", block=True))
        pulled = self.value(mec.pull(("a", "b"), targets="all", block=True))
        for engine_values in pulled:
            self.assertTrue(_equal(list(engine_values), arrays))
        self.value(mec.scatter("s", list(range(10)), block=True))
        self.assertEqual(self.value(mec.gather("s", block=True)), list(range(10)))


class JournalFramesTests(unittest.TestCase):
    """A result kept as frames is written to its file part by part and
    read back as frames (the journal's own thread, the real reactor)."""

    timeout = 60

    @defer.inlineCallbacks
    def test_frames_result_file_round_trip(self):
        from twisted.internet import reactor

        from taskfarm.controller import resultfiles
        from taskfarm.controller.journal import Journal
        from taskfarm.controller.tasks import TaskRecord, TaskSpec
        from taskfarm.testing.helpers import temp_dir

        path = temp_dir(self, "taskfarm-buffers-journal-") / "journal.sqlite"
        journal = Journal(path, reactor)
        journal.file_threshold = BIG  # these frames (2 x BIG) go to a file
        journal.open()
        self.addCleanup(journal.close)
        blob = serialization.pack(Task("a = 1").to_envelope())
        journal.accept_batch([(0, blob, 100.0, 0)])
        record = TaskRecord(0, TaskSpec.from_envelope(serialization.unpack(blob)), 100.0)
        record.start(engine_id=0, seq=0)
        value = {"blob": b"x" * BIG, "array": numpy.arange(BIG // 8)}
        frames = serialization.dumps_value(value)
        record.succeed(frames, 101.0, 102.0)
        journal.finished(record, record.link)
        yield journal.sync()
        self.assertEqual(
            resultfiles.read(journal.blob_dir / "0.frames"), serialization.frames_parts(frames)
        )
        journal.close()
        journal = Journal(path, reactor)
        journal.open()
        self.addCleanup(journal.close)
        (stored,) = journal.tasks()
        back = serialization.as_frames(journal.stored_data(stored))
        self.assertTrue(serialization.is_frames(back))
        got = serialization.loads(back)
        self.assertEqual(got["blob"], value["blob"])
        self.assertTrue(numpy.array_equal(got["array"], value["array"]))


class PushLimitTests(_GridTestCase):
    """A MultiEngine push of a big value just below, at and above the
    controller's limit: the client counts every part of the request, and
    refuses one over the limit with `MessageTooLarge` before sending it."""

    def test_push_below_at_and_above_the_limit(self):
        mec = self.grid.multiengine_client()
        self.assertEqual(sorted(self.value(mec.get_ids())), [0, 1])
        value = {"v": b"p" * BIG}
        request = wire.EngineCall(
            "push", 0, (serialization.dumps_value(value, "the pushed namespace"),), None
        ).plain()
        size = serialization.message_size(serialization.pack_message(request))
        self.assertGreater(size, BIG)
        for limit, fits in ((size + 1, True), (size, True), (size - 1, False)):
            mec._connection.max_message_size = limit
            d = mec.push(value, targets=0, block=True)
            for _ in range(500):
                if d.called:
                    break
                self.grid.clock.advance(0.001)
            if fits:
                self.successResultOf(d)
            else:
                self.failureResultOf(d, MessageTooLarge)
        mec._connection.max_message_size = serialization.DEFAULT_MAX_MESSAGE_SIZE
        (got,) = self.value(mec.pull("v", targets=0, block=True))
        self.assertEqual(got, value["v"])
