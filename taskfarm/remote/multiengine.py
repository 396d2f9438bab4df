"""The MultiEngine interface's Referenceable: unpack, call, answer."""

from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from taskfarm import serialization, wire
from taskfarm.errors import BadRequest
from taskfarm.remote import schemas, sweeper
from taskfarm.remote.answers import hello_blob, reply, reply_in_parts
from taskfarm.remote.schemas import BoundedReferenceable


@implementer(schemas.RIMultiEngine)
class RemoteMultiEngine(BoundedReferenceable):
    """The MultiEngine interface, served to clients holding its furl."""

    def __init__(
        self, multiengine, max_message_size: int = serialization.DEFAULT_MAX_MESSAGE_SIZE,
        bulk=None,
    ) -> None:
        super().__init__(max_message_size)
        self._multiengine = multiengine
        #: The bulk-data channel's policy (`taskfarm.bulk.policy`), or None.
        self.bulk = bulk

    def remote_hello(self):
        return hello_blob(
            "multiengine", max_message_size=self.max_message_size,
            bulk=None if self.bulk is None else self.bulk.location,
        )

    def _unpack(self, blob: bytes):
        return serialization.unpack(blob, self.max_message_size)

    def remote_engine_call(self, request):
        def call():
            op, targets, args, per_target, timeout = wire.EngineCall.parse(self._unpack(request))
            return self._multiengine.call(op, targets, args, per_target, timeout)

        return sweeper.once_answered(reply_in_parts(call), request)

    def remote_engine_call_bulk(self, request):
        """`remote_engine_call`, answered as a `wire.BulkResults`: big values
        are fetched over the bulk-data channel (version 5)."""

        def offered(outcomes):
            if self.bulk is None:
                return wire.BulkResults(outcomes, None, [], []).plain()
            return self.bulk.outcomes_answer(outcomes)

        def call():
            op, targets, args, per_target, timeout = wire.EngineCall.parse(self._unpack(request))
            d = defer.maybeDeferred(
                self._multiengine.call, op, targets, args, per_target, timeout
            )
            return d.addCallback(offered)

        return sweeper.once_answered(reply_in_parts(call), request)

    def remote_upload(self, sizes):
        """A capability to upload a push's value over the bulk-data channel."""

        def capability():
            if self.bulk is None:
                raise BadRequest("this controller has no bulk-data channel")
            return self.bulk.push_capability(self._unpack(sizes), self.max_message_size)

        return reply(capability)

    def remote_engine_call_uploaded(self, request, capability):
        """`remote_engine_call` of a push whose value was uploaded: the
        received frames go on to the engines over Foolscap."""

        def call():
            if self.bulk is None:
                raise BadRequest("this controller has no bulk-data channel")
            parsed = wire.EngineCall.parse(self._unpack(request))
            op, targets, args, per_target, timeout = self.bulk.uploaded_call(parsed, capability)
            return self._multiengine.call(op, targets, args, per_target, timeout)

        return sweeper.once_answered(reply_in_parts(call), request)

    def remote_properties(self, request):
        def call():
            action, targets, argument = wire.PropertiesRequest.parse(self._unpack(request))
            return self._multiengine.properties(action, targets, argument)

        return reply(call)

    def remote_engine_ids(self):
        return reply(self._multiengine.engine_ids)

    def remote_queue_status(self, targets):
        return reply(lambda: self._multiengine.queue_status(self._unpack(targets)))

    def remote_clear_queue(self, targets):
        return reply(lambda: self._multiengine.clear_queue(self._unpack(targets)))

    def remote_kill_controller(self):
        return reply(self._multiengine.kill_controller)
