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
        #: Capabilities handed out for results, and for uploads, since the start.
        self.offered = 0
        self.uploads = 0

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
        self.uploads += 1
        return self.offers.expect(sizes)

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


def is_big_reply(reply: tuple, threshold: int = UPLOAD_MIN) -> bool:
    """Whether an engine's plain reply should upload its frames."""
    return (
        reply[1] is True
        and serialization.is_frames(reply[2])
        and serialization.frames_size(reply[2]) >= threshold
    )


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
