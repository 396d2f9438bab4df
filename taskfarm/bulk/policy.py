"""What travels over the bulk-data channel, and how answers carry it.

A ``results`` answer whose results' frames total `BULK_MIN` bytes or
more moves all those frames to the channel in one transfer
(`split_results`, on the controller); the client
receives them into one preallocated `bytearray` per frame and puts them
back as the results' data (`join_results`), which `serialization.loads`
unpickles without joining them.  Smaller answers stay on Foolscap:
below a few MiB, a TLS handshake and a thread hand-off cost more than
Foolscap's copies.
"""

from __future__ import annotations

from twisted.internet import threads

from taskfarm import serialization, wire
from taskfarm.bulk import channel
from taskfarm.errors import BadRequest, ConnectionLost, MessageTooLarge, to_wire

#: An answer whose results' frames total at least this many bytes sends
#: them all over the bulk-data channel, in one transfer.  Each transfer
#: costs a TLS handshake and a thread hand-off: measured
#: (bench/datapath.py ret1MB), one transfer per 1 MiB result came slower
#: than Foolscap, so the decision is per answer (`split_results`).
BULK_MIN = 4 << 20

#: Replies of at least this many bytes are uploaded by engines: each
#: upload costs a round trip for its capability and a TLS handshake of its
#: own, which 1 MiB results (bench/datapath.py ret1MB) do not repay.
UPLOAD_MIN = 8 << 20

#: The commands whose big replies engines upload: task results, which the
#: controller keeps and answers over the channel again (`results_bulk`),
#: and pulls, answered over it too (`engine_call_bulk`).
UPLOAD_OPS = frozenset({"task", "pull"})

#: Seconds each socket operation of a transfer may take.
TRANSFER_TIMEOUT = 60.0

#: Index of a result envelope's data field (`wire.ResultEnvelope`).
_DATA = 3


def split_results(envelopes: list, threshold: int = BULK_MIN, ok_at: int = 2,
                  data_at: int = _DATA) -> tuple[list, list, list]:
    """``(envelopes, parts, moved)``: the plain result envelopes with the
    data of every ok one held as frames (a value with buffers of
    `serialization.OOB_MIN` bytes or more) taken out (left ``b""``) when
    those frames total `threshold` bytes or more in the whole answer;
    those frames' buffers in order, and ``(index, count)`` for each
    envelope emptied (see `wire.BulkResults`).  Below the threshold
    nothing moves.  The decision is the answer's, not each value's: one
    transfer (one handshake) carries all of them, so a hundred 1 MiB
    results repay it as one 100 MiB result does.  `ok_at` and `data_at`
    say where an envelope has its ok flag and its data (a
    `wire.ResultEnvelope` by default; 1 and 2 for a `wire.EngineOutcome`)."""
    big = [
        index
        for index, envelope in enumerate(envelopes)
        if envelope is not None and envelope[ok_at] is True
        and serialization.is_frames(envelope[data_at])
    ]
    if sum(serialization.frames_size(envelopes[i][data_at]) for i in big) < threshold:
        return list(envelopes), [], []
    out = list(envelopes)
    parts: list = []
    moved: list = []
    for index in big:
        envelope = out[index]
        data = envelope[data_at]
        parts.extend(data)
        moved.append((index, len(data)))
        out[index] = envelope[:data_at] + (b"",) + envelope[data_at + 1 :]
    return out, parts, moved


def join_results(answer: wire.BulkResults, parts: list, data_at: int = _DATA) -> list:
    """The answer's envelopes with each moved one's data back, as frames
    made of the received `parts` (in the order `split_results` took them)."""
    if len(parts) != len(answer.sizes):
        raise BadRequest("the bulk transfer gave %d parts, not %d" % (len(parts), len(answer.sizes)))
    envelopes = list(answer.envelopes)
    at = 0
    for index, count in answer.moved:
        envelope = envelopes[index]
        if not isinstance(envelope, tuple) or len(envelope) <= data_at:
            raise BadRequest("bulk results: moved entry %d is not an envelope" % index)
        frames = tuple(parts[at : at + count])
        at += count
        envelopes[index] = envelope[:data_at] + (frames,) + envelope[data_at + 1 :]
    return envelopes


def results_answer(envelopes: list, offers, threshold: int = BULK_MIN, ok_at: int = 2,
                   data_at: int = _DATA) -> tuple:
    """A plain `wire.BulkResults` for `envelopes`: their big frames offered
    in `offers` (`taskfarm.bulk.channel.Offers`) under one capability."""
    envelopes, parts, moved = split_results(envelopes, threshold, ok_at, data_at)
    if not parts:
        return wire.BulkResults(envelopes, None, [], []).plain()
    sizes = [memoryview(part).nbytes for part in parts]
    return wire.BulkResults(envelopes, offers.offer(parts), sizes, moved).plain()


class BulkPolicy:
    """The controller's use of its bulk-data channel: where the channel is
    (`location`, HOST:PORT for `Hello`), the capabilities handed out
    (`offers`), from which size a result goes over it (``results``), and
    the uploads of engines' big replies."""

    def __init__(self, offers, location: str, threshold: int = BULK_MIN) -> None:
        self.offers = offers
        self.location = location
        self.threshold = threshold
        #: Capabilities handed out for results, and for engines' uploads, since the start.
        self.offered = 0
        self.uploads = 0
        #: Capabilities handed out to clients for pushes' values.
        self.pushes = 0
        #: capability -> ``[(seq, parts), ...]`` of a batch upload (several
        #: replies' frames in one transfer), while its offer is held.
        self._batches: dict[bytes, list] = {}

    def results_answer(self, envelopes: list) -> tuple:
        """`results_answer` with this policy's offers and threshold."""
        answer = results_answer(envelopes, self.offers, self.threshold)
        if answer[1] is not None:
            self.offered += 1
        return answer

    def outcomes_answer(self, outcomes: list) -> tuple:
        """A MultiEngine answer (plain `wire.EngineOutcome`s) as a plain
        `wire.BulkResults`, big values offered on the channel."""
        answer = results_answer(outcomes, self.offers, self.threshold, ok_at=1, data_at=2)
        if answer[1] is not None:
            self.offered += 1
        return answer

    def upload_capability(self, op: str | None, sizes: object, limit: int) -> bytes | None:
        """A capability to upload the reply to an `op` command, of parts of
        `sizes` bytes (a list of ints), checked against the message `limit`:
        `MessageTooLarge` at more, `BadRequest` for anything but sizes.
        None (reply over Foolscap) for a command whose reply is not in
        `UPLOAD_OPS`: a MultiEngine answer goes on to its client over
        Foolscap, where buffers received here would need a copy."""
        if op not in UPLOAD_OPS:
            return None
        capability = self._expect(sizes, limit)
        self.uploads += 1
        return capability

    def _expect(self, sizes: object, limit: int) -> bytes:
        if not isinstance(sizes, list) or not sizes or not all(
            type(n) is int and n >= 0 for n in sizes
        ):
            raise BadRequest("an upload needs a non-empty list of part sizes")
        if len(sizes) > serialization.parts_limit(limit):
            raise MessageTooLarge(
                "an upload of %d parts exceeds the limit of %d parts"
                % (len(sizes), serialization.parts_limit(limit))
            )
        total = sum(sizes)
        if total > limit:
            raise MessageTooLarge(
                "an upload of %d bytes exceeds the controller's message limit of %d bytes"
                % (total, limit)
            )
        return self.offers.expect(sizes)

    def upload_capability_for(self, op_of, seq: int, sizes: object, limit: int) -> bytes | None:
        """`upload_capability` for an ``upload(seq, sizes)`` request, where
        `op_of(seq)` names a command's op (None: not in flight).  `sizes`
        is a list of part sizes (the reply to `seq`), or a batch: a list of
        ``(seq, sizes)`` pairs, one per reply, all their parts uploaded in
        one transfer (`batch_capability`)."""
        if isinstance(sizes, list) and sizes and all(type(x) is tuple for x in sizes):
            return self.batch_capability(op_of, sizes, limit)
        return self.upload_capability(op_of(seq), sizes, limit)

    def batch_capability(self, op_of, groups: list, limit: int) -> bytes | None:
        """One capability to upload the frames of several replies, `groups`
        a list of ``(seq, sizes)`` pairs in the order of the parts; None
        (over Foolscap) unless every reply answers a command in
        `UPLOAD_OPS`.  Bounded as `upload_capability`; `BadRequest` for a
        malformed or repeated group."""
        seqs: list = []
        flat: list = []
        for group in groups:
            if len(group) != 2 or type(group[0]) is not int or not isinstance(group[1], list) \
                    or not group[1]:
                raise BadRequest("an upload batch needs (seq, sizes) pairs")
            seqs.append(group[0])
            flat.extend(group[1])
        if len(set(seqs)) != len(seqs):
            raise BadRequest("an upload batch names a command twice")
        if not all(op_of(seq) in UPLOAD_OPS for seq in seqs):
            return None
        capability = self.upload_capability("task", flat, limit)
        # Batches whose offers expired or were claimed are forgotten here.
        for held in [c for c in self._batches if c not in self.offers]:
            del self._batches[held]
        self._batches[capability] = [(seq, len(group[1])) for seq, group in zip(seqs, groups, strict=True)]
        return capability

    def resolve_uploads(self, replies: list) -> list:
        """`resolve_upload` for each of `replies`; the replies that name a
        batch capability share its parts, claimed once, in the batch's
        order.  A batch not held whole fails every reply that names it
        (`ConnectionLost`), and a reply it does not list fails too."""
        claimed: dict = {}
        out = []
        for reply in replies:
            capability = reply.upload
            if capability is None or capability not in self._batches and capability not in claimed:
                out.append(self.resolve_upload(reply))
                continue
            if capability not in claimed:
                claimed[capability] = self._split_batch(capability)
            frames = claimed[capability].get(reply.seq) if claimed[capability] else None
            if frames is None:
                error = ConnectionLost("the upload of this reply's value was not received whole")
                out.append(reply._replace(ok=False, data=to_wire(error), upload=None))
            else:
                out.append(reply._replace(data=frames, upload=None))
        return out

    def _split_batch(self, capability: bytes) -> dict | None:
        groups = self._batches.pop(capability)
        parts = self.offers.claim(capability)
        if parts is None:
            return None
        frames: dict = {}
        at = 0
        for seq, count in groups:
            frames[seq] = serialization.as_frames(parts[at : at + count])
            at += count
        return frames

    def push_capability(self, sizes: object, limit: int) -> bytes:
        """A capability for a client to upload a push's value, of parts of
        `sizes` bytes, bounded as `upload_capability` (`MessageTooLarge`,
        `BadRequest`)."""
        capability = self._expect(sizes, limit)
        self.pushes += 1
        return capability

    def uploaded_call(self, call: wire.EngineCall, capability: object) -> wire.EngineCall:
        """`call`, a push whose value was uploaded under `capability`, with
        the received frames as its value.  `ConnectionLost` unless the
        upload completed (and did not expire): the push never reaches an
        engine with part of its value; `BadRequest` for any call but a
        push of ``b""`` to every target."""
        if call.op != "push" or call.per_target is not None or tuple(call.args) != (b"",):
            raise BadRequest("only a push with its value left b\"\" takes an upload")
        if not (type(capability) is bytes and len(capability) == wire.CAPABILITY_BYTES):
            raise BadRequest("an uploaded push needs a capability of %d bytes"
                             % wire.CAPABILITY_BYTES)
        parts = self.offers.claim(capability)
        if parts is None:
            raise ConnectionLost("the upload of the pushed value was not received whole")
        return call._replace(args=(serialization.as_frames(parts),))

    def resolve_upload(self, reply: wire.Reply) -> wire.Reply:
        """`reply` with its uploaded frames as its data; a reply whose upload
        the controller does not hold (expired) becomes a `ConnectionLost`
        failure: never a partial value."""
        if reply.upload is None:
            return reply
        parts = self.offers.claim(reply.upload)
        if parts is None:
            error = ConnectionLost("the upload of this reply's value was not received whole")
            return reply._replace(ok=False, data=to_wire(error), upload=None)
        return reply._replace(data=serialization.as_frames(parts), upload=None)


#: Pushes whose value (its frames) is at least this many bytes are
#: uploaded by the client over the bulk-data channel; the controller
#: forwards them to the engines over Foolscap.
PUSH_MIN = BULK_MIN


async def upload_push(reactor, connection, location: str, frames) -> bytes:
    """Upload a push's value `frames` to the controller's bulk-data channel
    at `location` under a capability asked of `connection` (``upload``,
    bounded by the message limit); answers the capability, for
    ``engine_call_uploaded``.  Raises what the request or `channel.upload`
    raises."""
    views = [memoryview(part) for part in frames]
    capability = await connection.call("upload", serialization.pack([v.nbytes for v in views]))
    if not (type(capability) is bytes and len(capability) == wire.CAPABILITY_BYTES):
        raise BadRequest("the controller answered upload with no capability")
    host, port = location.rsplit(":", 1)
    await threads.deferToThreadPool(
        reactor, reactor.getThreadPool(), channel.upload, host, int(port), connection.tubid,
        capability, views, TRANSFER_TIMEOUT,
    )
    return capability


def big_replies(replies: list, threshold: int = UPLOAD_MIN) -> list:
    """The ok replies among an engine's batch (plain) that hold frames,
    when their frames total `threshold` bytes or more; else ``[]``: the
    batch's total decides, not each reply's size (one transfer, one
    handshake, carries them all: `upload_replies`)."""
    framed = [r for r in replies if r[1] is True and serialization.is_frames(r[2])]
    if sum(serialization.frames_size(r[2]) for r in framed) < threshold:
        return []
    return framed


async def upload_replies(reactor, session, replies: list) -> list:
    """Upload the frames of several big replies in one transfer under one
    capability (the request lists ``(seq, sizes)`` per reply); answers the
    plain replies that name it, or None when the controller wants them
    over Foolscap.  One reply: `upload_reply`'s request."""
    if len(replies) == 1:
        named = await upload_reply(reactor, session, replies[0])
        return None if named is replies[0] else [named]
    groups = [(r[0], [memoryview(part).nbytes for part in r[2]]) for r in replies]
    views = [memoryview(part) for r in replies for part in r[2]]
    capability = await session.request_upload(replies[0][0], groups)
    if capability is None:
        return None
    host, port = session.bulk_location.rsplit(":", 1)
    await threads.deferToThreadPool(
        reactor, reactor.getThreadPool(), channel.upload, host, int(port), session.tubid,
        capability, views, TRANSFER_TIMEOUT,
    )
    return [wire.Reply.parse(r)._replace(data=b"", upload=capability).plain() for r in replies]


async def upload_reply(reactor, session, reply: tuple) -> tuple:
    """Upload a big reply's frames over the session's bulk-data channel
    (`session.request_upload`, `session.bulk_location`, `session.tubid`);
    answers the plain reply that names the upload (`wire.Reply` version
    5), or `reply` itself when the controller wants it over Foolscap.
    Raises what the request or `channel.upload` raises."""
    frames = reply[2]
    views = [memoryview(part) for part in frames]
    capability = await session.request_upload(reply[0], [view.nbytes for view in views])
    if capability is None:
        return reply  # the controller wants it over Foolscap
    host, port = session.bulk_location.rsplit(":", 1)
    await threads.deferToThreadPool(
        reactor, reactor.getThreadPool(), channel.upload, host, int(port), session.tubid,
        capability, views, TRANSFER_TIMEOUT,
    )
    return wire.Reply.parse(reply)._replace(data=b"", upload=capability).plain()


async def receive_results(reactor, location: str, tubid: str, answer: wire.BulkResults,
                          data_at: int = _DATA) -> list:
    """The envelopes of a `wire.BulkResults` answer, their moved frames
    fetched from the bulk-data channel at `location` (HOST:PORT) whose
    certificate has `tubid`, in a thread of `reactor`'s pool.  Raises what
    `channel.fetch` raises; nothing partial is ever returned."""
    if answer.capability is None:
        return list(answer.envelopes)
    host, port = location.rsplit(":", 1)
    parts = await threads.deferToThreadPool(
        reactor, reactor.getThreadPool(), channel.fetch, host, int(port), tubid,
        answer.capability, answer.sizes, TRANSFER_TIMEOUT, serialization.ReceivedBuffer,
    )
    return join_results(answer, parts, data_at)
