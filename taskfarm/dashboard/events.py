"""Server-sent events: one snapshot of the monitor for every open page.

`EventStream` builds the dashboard's snapshot once per tick (at most
`1 / period` per second, only while someone watches) and writes the same
bytes to every client.  Each client is bounded: a client whose connection
cannot take more (its transport paused us, as a slow reader's does) is
skipped rather than buffered for, and dropped once it has been stuck for
`slow_timeout` seconds; at most `max_clients` are served at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from twisted.internet import task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

#: Seconds between snapshots (so at most 2 updates per second).
DEFAULT_PERIOD = 0.5
#: Pages served live at once; one more is answered 503.
DEFAULT_MAX_CLIENTS = 8
#: Seconds a client may be unable to take data before it is dropped.
DEFAULT_SLOW_TIMEOUT = 5.0


@implementer(IPushProducer)
class EventClient:
    """One open event stream: its request, and whether it can take data."""

    def __init__(self, stream: EventStream, request) -> None:
        self._stream = stream
        self.request = request
        #: Whether the transport asked us to stop writing (its buffer is full).
        self.paused = False
        #: When it paused (the stream's clock), while paused.
        self.paused_since = 0.0
        #: Snapshots it did not get while paused.
        self.skipped = 0
        #: Snapshots written to it.
        self.sent = 0
        self.gone = False

    # IPushProducer: the transport tells us when its buffer fills and drains.
    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.paused_since = self._stream.clock.seconds()

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self._stream.remove(self)

    def send(self, data: bytes) -> None:
        self.request.write(data)
        self.sent += 1


class EventStream:
    """Every open event stream, and the timer that feeds them."""

    _log = Logger()

    def __init__(
        self,
        clock,
        snapshot: Callable[[], dict],
        period: float = DEFAULT_PERIOD,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        slow_timeout: float = DEFAULT_SLOW_TIMEOUT,
    ) -> None:
        self.clock = clock
        self._snapshot = snapshot
        self.period = period
        self.max_clients = max_clients
        self.slow_timeout = slow_timeout
        self.clients: list[EventClient] = []
        self._loop: task.LoopingCall | None = None
        #: Snapshots built so far (one per tick, shared by every client).
        self.built = 0
        #: Clients dropped for being too slow.
        self.dropped = 0

    def add(self, request) -> EventClient | None:
        """Serve `request` as an event stream; None if `max_clients` are
        served already (the caller answers 503)."""
        if len(self.clients) >= self.max_clients:
            return None
        client = EventClient(self, request)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        request.registerProducer(client, True)
        request.notifyFinish().addBoth(lambda _: self.remove(client))
        self.clients.append(client)
        # The first snapshot goes at once: the page fills without a wait.
        client.send(self._message())
        if self._loop is None:
            self._loop = task.LoopingCall(self.tick)
            self._loop.clock = self.clock
            self._loop.start(self.period, now=False)
        return client

    def remove(self, client: EventClient) -> None:
        """Forget `client` (its connection closed, or it was dropped)."""
        if client.gone:
            return
        client.gone = True
        if client in self.clients:
            self.clients.remove(client)
        if not self.clients and self._loop is not None:
            if self._loop.running:
                self._loop.stop()
            self._loop = None

    def _message(self) -> bytes:
        self.built += 1
        data = json.dumps(self._snapshot(), separators=(",", ":"), allow_nan=False)
        return b"event: snapshot\ndata: " + data.encode("utf-8") + b"\n\n"

    def tick(self) -> None:
        """Send one snapshot to every client that can take it now."""
        if not self.clients:
            return
        now = self.clock.seconds()
        message = None
        for client in list(self.clients):
            if client.paused:
                client.skipped += 1
                if now - client.paused_since >= self.slow_timeout:
                    self._drop(client)
                continue
            if message is None:
                message = self._message()
            client.send(message)

    def _drop(self, client: EventClient) -> None:
        self.dropped += 1
        self._log.info(
            "dashboard: dropping an event stream that took nothing for {seconds} s",
            seconds=self.slow_timeout,
        )
        self.remove(client)
        transport = getattr(client.request, "channel", None)
        transport = getattr(transport, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def close(self) -> None:
        """End every stream (the dashboard stops)."""
        for client in list(self.clients):
            self.remove(client)
            try:
                client.request.unregisterProducer()
                client.request.finish()
            except Exception:
                pass  # its connection is gone already
