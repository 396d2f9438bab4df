"""The MultiEngine interface's Referenceable: unpack, call, answer."""

from __future__ import annotations

from foolscap.api import Referenceable
from zope.interface import implementer

from taskfarm import serialization, wire
from taskfarm.remote import schemas, sweeper
from taskfarm.remote.server import hello_blob, reply


def _unpack(blob: bytes):
    return serialization.unpack(blob, schemas.message_limit())


@implementer(schemas.RIMultiEngine)
class RemoteMultiEngine(Referenceable):
    """The MultiEngine interface, served to clients holding its furl."""

    def __init__(self, multiengine) -> None:
        self._multiengine = multiengine

    def remote_hello(self):
        return hello_blob("multiengine")

    def remote_engine_call(self, request):
        def call():
            op, targets, args, per_target = wire.EngineCall.parse(_unpack(request))
            return self._multiengine.call(op, targets, args, per_target)

        return sweeper.once_answered(reply(call), request)

    def remote_properties(self, request):
        def call():
            action, targets, argument = wire.PropertiesRequest.parse(_unpack(request))
            return self._multiengine.properties(action, targets, argument)

        return reply(call)

    def remote_engine_ids(self):
        return reply(self._multiengine.engine_ids)

    def remote_queue_status(self, targets):
        return reply(lambda: self._multiengine.queue_status(_unpack(targets)))

    def remote_clear_queue(self, targets):
        return reply(lambda: self._multiengine.clear_queue(_unpack(targets)))

    def remote_kill_controller(self):
        return reply(self._multiengine.kill_controller)
