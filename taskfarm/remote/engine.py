"""The engine's Foolscap transport: connect, hello, register, and nothing more.

`FoolscapControllerLink` implements `IControllerLink`.  It holds no policy:
`taskfarm.engine.link.EngineLink` decides when to try again.  The engine's
Referenceable is bounded by the controller's limit learnt at `hello`, so
commands over it are refused while their header is read.
"""

from __future__ import annotations

from foolscap.api import DeadReferenceError
from twisted.internet import defer
from zope.interface import implementer

from taskfarm import serialization, wire
from taskfarm.errors import BadRequest, ConnectionLost, WrongInterface, from_wire
from taskfarm.interfaces import IControllerLink, IEngineCommands, IEngineSession
from taskfarm.remote import schemas, sweeper
from taskfarm.remote.client import furl_location, peer_key
from taskfarm.remote.schemas import BoundedReferenceable
from taskfarm.remote.tub import new_tub

#: Seconds a connection attempt may take.
CONNECT_TIMEOUT = 10


@implementer(schemas.RIEngine)
class _EngineReferenceable(BoundedReferenceable):
    """What the controller calls on this engine."""

    def __init__(
        self,
        commands: IEngineCommands,
        max_message_size: int = serialization.DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        super().__init__(max_message_size)
        self._commands = commands

    def remote_commands(self, batch):
        sweeper.received(batch)
        self._commands.receive(serialization.unpack(batch, self.max_message_size))

    def remote_interrupt(self, seq):
        self._commands.interrupt(seq)

    def remote_cancel(self, seqs):
        self._commands.cancel(seqs)

    def remote_set_properties(self, properties):
        props = serialization.unpack(properties)
        if isinstance(props, dict):
            self._commands.set_properties(props)

    def remote_ping(self):
        return None


@implementer(IEngineSession)
class _FoolscapEngineSession:
    """One registration: replies go through the controller's session object."""

    def __init__(self, rref, session, engine_id: int, limit: int, location: str,
                 bulk_location: str | None = None, tubid: str | None = None) -> None:
        self._rref = rref
        self._session = session
        self.engine_id = engine_id
        self.max_message_size = limit
        self.location = location
        #: HOST:PORT of the controller's bulk-data channel (None: none), and
        #: the tubid its certificate must have (the furl's).
        self.bulk_location = bulk_location
        self.tubid = tubid
        # Checked against the controller's limit, as the controller will.
        self._bounded = schemas.bounded_call(session, "replies", limit)

    def send_replies(self, packed: bytes) -> bool:
        try:
            self._session.callRemoteOnly("replies", packed, **self._bounded)
        except DeadReferenceError:
            return False
        return True

    def notify_on_disconnect(self, callback) -> None:
        self._rref.notifyOnDisconnect(callback)

    def request_upload(self, seq: int, sizes: list) -> defer.Deferred:
        """A capability to upload the reply to command `seq`, of parts of
        `sizes` bytes (or a batch of replies' frames, ``(seq, sizes)``
        pairs), over the bulk-data channel; None: the controller
        wants it over Foolscap.  Fails with the controller's typed error."""
        return defer.Deferred.fromCoroutine(self._request_upload(seq, sizes))

    async def _request_upload(self, seq: int, sizes: list) -> bytes | None:
        try:
            answer = await self._session.callRemote("upload", seq, serialization.pack(sizes))
        except DeadReferenceError:
            raise ConnectionLost("lost the controller while asking to upload") from None
        ok, value = wire.Answer.parse(serialization.unpack(answer, self.max_message_size))
        if not ok:
            raise from_wire(value)
        if value is not None and not (
            type(value) is bytes and len(value) == wire.CAPABILITY_BYTES
        ):
            raise BadRequest("the controller answered upload with no capability")
        return value


@implementer(IControllerLink)
class FoolscapControllerLink:
    """Registers an engine over Foolscap, through `tub` (a test's in-process
    Tub, say) or else a fresh Tub of its own at each start."""

    def __init__(self, reactor, tub=None, connect_timeout: float = CONNECT_TIMEOUT):
        self._reactor = reactor
        self._given_tub = tub
        self._connect_timeout = connect_timeout
        self._tub = None

    def start(self) -> None:
        self._tub = self._given_tub or new_tub()
        self._tub.startService()
        sweeper.process_sweeper().start()

    async def _stop(self) -> None:
        sweeper.process_sweeper().stop()
        if self._tub is not None:
            tub, self._tub = self._tub, None
            await tub.stopService()

    def register(
        self, furl: str, commands: IEngineCommands, properties: dict, requested_id
    ) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(
            self._register(furl, commands, properties, requested_id)
        )

    def stop(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _register(
        self, furl: str, commands: IEngineCommands, properties: dict, requested_id
    ) -> _FoolscapEngineSession:
        location = furl_location(furl)
        rref = await self._tub.getReference(furl).addTimeout(self._connect_timeout, self._reactor)
        hello = wire.Hello.parse(serialization.unpack(await rref.callRemote("hello")))
        if hello.interface != "engine":
            raise WrongInterface(
                "the furl for %s is not the engine furl (security/engine.furl)" % location
            )
        # Commands may be as big as the controller accepts.
        limit = hello.max_message_size
        engine_id, session = await rref.callRemote(
            "register",
            _EngineReferenceable(commands, limit),
            serialization.pack(properties),
            requested_id,
        )
        return _FoolscapEngineSession(
            rref, session, engine_id, limit, location, hello.bulk, peer_key(furl)[0]
        )
