"""The bulk-data channel's protocol: one TLS connection per transfer.

The controller listens (`listen`) with its Tub's own certificate, so a
peer checks the certificate against the tubid of the furl it already
trusts (a Foolscap tubid is the base32 SHA-1 of the certificate's DER
bytes, `tubid_of`): the channel is as authenticated as the furl.  Nothing
moves without a capability: 32 random bytes that the controller handed
out over Foolscap (`Offers`), good for one transfer and for `ttl` seconds.

A transfer (peer to controller)::

    request   MAGIC, b"G", capability (32 bytes)
    answer    one status byte (OK, or REFUSED and the connection closes),
              then the offered parts' bytes, one after the other, and EOF.

The peer learnt the parts' sizes with the capability, preallocates one
`bytearray` per part and receives straight into it (`fetch`, blocking:
run it in a thread; stdlib ``ssl`` releases the GIL while it decrypts).
The controller streams each part in `CHUNK`-byte writes under
producer/consumer flow control, so it holds at most about one chunk of
ciphertext per connection beside the parts themselves.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import socket
import ssl

from twisted.internet import interfaces, protocol
from twisted.internet import ssl as tssl
from twisted.logger import Logger
from zope.interface import implementer

from taskfarm import wire
from taskfarm.errors import BulkRefused, ConnectionLost

_log = Logger()

MAGIC = b"TFB1"
GET = b"G"
OK = b"\x00"
REFUSED = b"\x01"
CAPABILITY_BYTES = wire.CAPABILITY_BYTES
REQUEST_BYTES = len(MAGIC) + 1 + CAPABILITY_BYTES

#: Bytes per write of the sender (Twisted's TLS encrypts each write whole).
CHUNK = 1 << 20

#: Seconds a connection may take to send its request.
REQUEST_TIMEOUT = 10.0


def tubid_of(der: bytes) -> str:
    """The Foolscap tubid of a certificate given as DER bytes."""
    return base64.b32encode(hashlib.sha1(der).digest()).lower().rstrip(b"=").decode()


class Offers:
    """Capabilities handed out and the parts each one gives, once.

    `offer` registers parts and answers a fresh capability; `take` hands
    them out and forgets the capability; an untaken one expires after
    `ttl` seconds on `clock` (its parts are dropped then)."""

    def __init__(self, clock, ttl: float = 60.0) -> None:
        self._clock = clock
        self._ttl = ttl
        self._offered: dict[bytes, tuple] = {}

    def offer(self, parts: list) -> bytes:
        """A new capability for `parts` (bytes-like objects)."""
        capability = secrets.token_bytes(CAPABILITY_BYTES)
        expiry = self._clock.callLater(self._ttl, self._offered.pop, capability, None)
        self._offered[capability] = (list(parts), expiry)
        return capability

    def take(self, capability: bytes) -> list | None:
        """The parts offered under `capability`, once; None for an unknown,
        used or expired one."""
        entry = self._offered.pop(capability, None)
        if entry is None:
            return None
        parts, expiry = entry
        if expiry.active():
            expiry.cancel()
        return parts

    def __len__(self) -> int:
        return len(self._offered)

    def clear(self) -> None:
        """Forget every offer (the controller stops)."""
        for _parts, expiry in self._offered.values():
            if expiry.active():
                expiry.cancel()
        self._offered.clear()


@implementer(interfaces.IPushProducer)
class _Sender(protocol.Protocol):
    """The controller's end of one transfer."""

    def __init__(self, offers: Offers, clock) -> None:
        self._offers = offers
        self._clock = clock
        self._request = b""
        self._parts: list = []
        self._part = 0
        self._offset = 0
        self._paused = False
        self._done = False
        self._timeout = None

    def connectionMade(self) -> None:
        self._timeout = self._clock.callLater(REQUEST_TIMEOUT, self._abort)

    def _abort(self) -> None:
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._done or self._parts:
            self._abort()  # nothing may follow the request
            return
        self._request += data
        if len(self._request) < REQUEST_BYTES:
            return
        request, self._request = self._request, b""
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        if len(request) != REQUEST_BYTES or request[: len(MAGIC) + 1] != MAGIC + GET:
            self._abort()
            return
        parts = self._offers.take(request[len(MAGIC) + 1 :])
        if parts is None:
            _log.info("bulk channel: refused an unknown, used or expired capability")
            self._done = True
            self.transport.write(REFUSED)
            self.transport.loseConnection()
            return
        self._parts = [memoryview(part).cast("B") for part in parts]
        self.transport.write(OK)
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        while not self._paused and not self._done:
            if self._part >= len(self._parts):
                self._finish()
                return
            view = self._parts[self._part]
            chunk = view[self._offset : self._offset + CHUNK]
            self._offset += len(chunk)
            if self._offset >= len(view):
                self._part += 1
                self._offset = 0
            if len(chunk):
                # Twisted's TLS takes bytes only.
                self.transport.write(chunk.tobytes())

    def _finish(self) -> None:
        self._done = True
        self._parts = []
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._done = True
        self._parts = []

    def connectionLost(self, reason) -> None:
        self._done = True
        self._parts = []
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()


class BulkFactory(protocol.Factory):
    """Serves transfers of the capabilities in `offers`."""

    def __init__(self, offers: Offers, clock) -> None:
        self.offers = offers
        self._clock = clock

    def buildProtocol(self, addr):
        return _Sender(self.offers, self._clock)


def server_options(cert_pem: bytes):
    """TLS options of the controller's end: its Tub's certificate and key."""
    return tssl.PrivateCertificate.loadPEM(cert_pem).options()


def listen(reactor, factory: BulkFactory, cert_pem: bytes, interface: str, port: int = 0):
    """Listen for transfers on `interface`:`port` (0: a free one) with TLS
    by the PEM certificate and key `cert_pem`; the listening port."""
    return reactor.listenSSL(port, factory, server_options(cert_pem), interface=interface)


def _receive_exactly(tls, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = tls.recv_into(view[got:])
        if not n:
            raise ConnectionLost(
                "the bulk transfer ended after %d of %d bytes" % (got, len(view))
            )
        got += n


def fetch(host: str, port: int, tubid: str, capability: bytes, sizes: list[int],
          timeout: float = 60.0, allocate=bytearray) -> list[bytearray]:
    """Receive the parts offered under `capability` (of `sizes` bytes) from
    the controller at `host`:`port` whose certificate has `tubid`.

    Blocking (run it in a thread); each socket operation is bounded by
    `timeout`; each part is received into ``allocate(size)``.  `BulkRefused` for a refused capability or a certificate
    that is not the furl's; `ConnectionLost` when the transfer breaks or
    sends other than the announced bytes: never a partial value."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The certificate is self-signed: it is checked against the tubid below.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ConnectionLost("cannot reach the bulk channel at %s:%d: %s" % (host, port, e)) from None
    try:
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
            if der is None or tubid_of(der) != tubid:
                raise BulkRefused(
                    "the bulk channel at %s:%d has a certificate that does not match "
                    "the furl's tubid" % (host, port)
                )
            tls.sendall(MAGIC + GET + capability)
            status = tls.recv(1)
            if status != OK:
                raise BulkRefused(
                    "the bulk channel at %s:%d refused the capability (unknown, used "
                    "or expired)" % (host, port)
                )
            parts = [allocate(size) for size in sizes]
            for part in parts:
                _receive_exactly(tls, memoryview(part))
            if tls.recv(1):
                raise ConnectionLost("the bulk transfer sent more than the %d bytes announced"
                                     % sum(sizes))
            return parts
    except (BulkRefused, ConnectionLost):
        raise
    except (OSError, ssl.SSLError) as e:
        raise ConnectionLost("the bulk transfer from %s:%d broke: %s" % (host, port, e)) from None
    finally:
        raw.close()
