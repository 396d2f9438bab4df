"""The bulk-data channel's protocol: one TLS connection per transfer.

The controller listens (`BulkServer`) with its Tub's own certificate, so a
peer checks the certificate against the tubid of the furl it already
trusts (a Foolscap tubid is the base32 SHA-1 of the certificate's DER
bytes, `tubid_of`): the channel is as authenticated as the furl.  Nothing
moves without a capability: 32 random bytes that the controller handed
out over Foolscap (`Offers`), good for one transfer and for `ttl` seconds.

Two transfers::

    fetch   peer: MAGIC, GET, capability
            controller: OK and the offered parts' bytes one after the
            other (or REFUSED), then it closes.
    upload  peer: MAGIC, PUT, capability
            controller: OK (or REFUSED, and it closes)
            peer: the parts' bytes one after the other
            controller: OK once it holds every byte.

The sizes travel with the capability (over Foolscap), never on this
channel: the receiver preallocates one buffer per part from them and
receives straight into it (``recv_into``), and the sender's bytes beyond
or short of them fail the transfer (`ConnectionLost`): nothing partial is
ever delivered.

Transfers run in threads with the stdlib ``ssl`` module, on both sides:
measured on this project's machine (bench/bulk_raw.py,
docs/performance.md), it moves about twice what Twisted's TLS does (which
encrypts each write into a buffer in the reactor's thread), and it sends
memoryview slices and receives into buffers with no copy of its own.
The controller accepts in its reactor and hands each connection to a
bounded thread pool; the capability table is locked, since those threads
take from it.  No user value is opened here: bytes only.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import socket
import ssl
import tempfile
import threading

from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from taskfarm import wire
from taskfarm.errors import BulkRefused, ConnectionLost
from taskfarm.serialization import ReceivedBuffer

_log = Logger()

MAGIC = b"TFB1"
GET = b"G"
PUT = b"P"
OK = b"\x00"
REFUSED = b"\x01"
CAPABILITY_BYTES = wire.CAPABILITY_BYTES
REQUEST_BYTES = len(MAGIC) + 1 + CAPABILITY_BYTES

#: Bytes per send call.
CHUNK = 4 << 20

#: Seconds each socket operation of a transfer may take, by default.
TIMEOUT = 60.0

#: Seconds a connection has for its TLS handshake and request: a peer
#: without a capability holds a thread no longer.
REQUEST_TIMEOUT = 10.0

#: Transfers the controller serves at once (more wait for a thread).
THREADS = 4


def tubid_of(der: bytes) -> str:
    """The Foolscap tubid of a certificate given as DER bytes."""
    return base64.b32encode(hashlib.sha1(der).digest()).lower().rstrip(b"=").decode()


class Offers:
    """The capabilities handed out, each good for one transfer.

    In the reactor's thread: `offer` (parts to fetch) and `expect` (an
    upload of parts of given sizes) answer a fresh capability; `claim`
    takes an upload's received parts; an entry untaken after `ttl` seconds
    on `clock` is dropped with its parts.  In a transfer's thread: `take`
    and `deposit`.  A lock guards the table."""

    def __init__(self, clock, ttl: float = 60.0) -> None:
        self._clock = clock
        self._ttl = ttl
        self._lock = threading.Lock()
        #: capability -> (kind, parts or sizes)
        self._entries: dict[bytes, tuple[bytes, list]] = {}
        #: capability -> its expiry (reactor thread only)
        self._timers: dict = {}

    def _add(self, kind: bytes, value: list) -> bytes:
        capability = secrets.token_bytes(CAPABILITY_BYTES)
        with self._lock:
            self._entries[capability] = (kind, value)
        self._timers[capability] = self._clock.callLater(self._ttl, self._expire, capability)
        return capability

    def offer(self, parts: list) -> bytes:
        """A new capability to fetch `parts` (bytes-like objects) once."""
        return self._add(GET, list(parts))

    def expect(self, sizes: list[int]) -> bytes:
        """A new capability to upload parts of `sizes` bytes once."""
        return self._add(PUT, list(sizes))

    def take(self, capability: bytes, kind: bytes) -> list | None:
        """The parts (GET) or sizes (PUT) of `capability`, once; None for
        an unknown, used, expired one or one of another kind."""
        with self._lock:
            entry = self._entries.get(capability)
            if entry is None or entry[0] != kind:
                return None
            del self._entries[capability]
        return entry[1]

    def deposit(self, capability: bytes, parts: list) -> None:
        """Keep an upload's received `parts` for `claim` (until expiry)."""
        with self._lock:
            self._entries[capability] = (b"done", parts)

    def claim(self, capability: bytes) -> list | None:
        """The parts uploaded under `capability`, once; None unless an
        upload of it completed (and did not expire)."""
        with self._lock:
            entry = self._entries.get(capability)
            if entry is None or entry[0] != b"done":
                return None
            del self._entries[capability]
        self._cancel(capability)
        return entry[1]

    def _cancel(self, capability: bytes) -> None:
        timer = self._timers.pop(capability, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _expire(self, capability: bytes) -> None:
        self._timers.pop(capability, None)
        with self._lock:
            self._entries.pop(capability, None)

    def __contains__(self, capability: bytes) -> bool:
        """Whether `capability` is still held: neither claimed nor expired
        (a transfer of it may be under way).  Reactor thread only."""
        return capability in self._timers

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        """Forget every entry (the controller stops)."""
        for capability in list(self._timers):
            self._cancel(capability)
        with self._lock:
            self._entries.clear()


def _context(cert_pem: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # load_cert_chain reads files only: a private file, removed at once.
    folder = tempfile.mkdtemp(prefix="taskfarm-bulk-")
    path = os.path.join(folder, "cert.pem")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert_pem)
        context.load_cert_chain(path)
    finally:
        try:
            os.unlink(path)
        finally:
            os.rmdir(folder)
    return context


class BulkServer:
    """The controller's end: accepts in the reactor, transfers in threads.

    `start` listens on `interface`:`port` (0: a free one; `port` tells
    which afterwards); `stop` closes the listener and every transfer in
    progress (their parts are dropped) and waits for the threads."""

    def __init__(self, reactor, offers: Offers, cert_pem: bytes, interface: str = "127.0.0.1",
                 port: int = 0, timeout: float = TIMEOUT, threads: int = THREADS) -> None:
        self._reactor = reactor
        self.offers = offers
        self._context = _context(cert_pem)
        self._interface = interface
        self._port = port
        self._timeout = timeout
        self._pool = ThreadPool(0, threads, "taskfarm-bulk")
        self._listener: socket.socket | None = None
        self._active: set[socket.socket] = set()
        self._active_lock = threading.Lock()
        self.port: int | None = None
        #: Transfers completed, refused, failed (for tests and metrics).
        self.completed = 0
        self.refused = 0
        self.failed = 0

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._interface else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._interface, self._port))
        listener.listen(16)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._pool.start()
        self._reactor.addReader(self)

    def stop(self) -> None:
        if self._listener is None:
            return
        self._reactor.removeReader(self)
        self._listener.close()
        self._listener = None
        with self._active_lock:
            for conn in self._active:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._pool.stop()
        self.offers.clear()

    # -- IReadDescriptor, for the listening socket --------------------------------

    def fileno(self) -> int:
        return self._listener.fileno() if self._listener is not None else -1

    def logPrefix(self) -> str:
        return "BulkServer"

    def connectionLost(self, reason) -> None:
        pass

    def doRead(self) -> None:
        while self._listener is not None:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                _log.warn("bulk channel: accept failed: {error}", error=str(e))
                return
            conn.setblocking(True)
            conn.settimeout(min(self._timeout, REQUEST_TIMEOUT))
            with self._active_lock:
                self._active.add(conn)
            self._pool.callInThread(self._serve, conn)

    # -- one transfer, in a thread -------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        try:
            with self._context.wrap_socket(conn, server_side=True) as tls:
                request = bytearray(REQUEST_BYTES)
                _receive_exactly(tls, memoryview(request))
                tls.settimeout(self._timeout)
                head, capability = bytes(request[: len(MAGIC) + 1]), bytes(request[len(MAGIC) + 1 :])
                if head == MAGIC + GET:
                    self._send(tls, capability)
                elif head == MAGIC + PUT:
                    self._receive(tls, capability)
                else:
                    self.failed += 1
        except (OSError, ssl.SSLError, ConnectionLost) as e:
            self.failed += 1
            _log.info("bulk channel: a transfer failed: {error}", error=str(e))
        finally:
            with self._active_lock:
                self._active.discard(conn)
            conn.close()

    def _send(self, tls, capability: bytes) -> None:
        parts = self.offers.take(capability, GET)
        if parts is None:
            self.refused += 1
            tls.sendall(REFUSED)
            return
        tls.sendall(OK)
        for part in parts:
            _send_all(tls, part)
        self.completed += 1

    def _receive(self, tls, capability: bytes) -> None:
        sizes = self.offers.take(capability, PUT)
        if sizes is None:
            self.refused += 1
            tls.sendall(REFUSED)
            return
        tls.sendall(OK)
        parts = [ReceivedBuffer(size) for size in sizes]
        for part in parts:
            _receive_exactly(tls, memoryview(part))
        # Held for `claim` before the peer hears OK: its Foolscap reply
        # that names the capability comes after.
        self.offers.deposit(capability, parts)
        tls.sendall(OK)
        self.completed += 1


def _send_all(tls, part) -> None:
    view = memoryview(part).cast("B")
    for start in range(0, len(view), CHUNK):
        tls.sendall(view[start : start + CHUNK])


def _receive_exactly(tls, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = tls.recv_into(view[got:], min(len(view) - got, CHUNK))
        if not n:
            raise ConnectionLost(
                "the bulk transfer ended after %d of %d bytes" % (got, len(view))
            )
        got += n


def _connect(host: str, port: int, tubid: str, timeout: float):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The certificate is self-signed: it is checked against the tubid below.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ConnectionLost("cannot reach the bulk channel at %s:%d: %s" % (host, port, e)) from None
    try:
        tls = context.wrap_socket(raw)
    except (OSError, ssl.SSLError) as e:
        raw.close()
        raise ConnectionLost("the bulk channel at %s:%d: %s" % (host, port, e)) from None
    der = tls.getpeercert(binary_form=True)
    if der is None or tubid_of(der) != tubid:
        tls.close()
        raise BulkRefused(
            "the bulk channel at %s:%d has a certificate that does not match "
            "the furl's tubid" % (host, port)
        )
    return tls


def _refused(host: str, port: int) -> BulkRefused:
    return BulkRefused(
        "the bulk channel at %s:%d refused the capability (unknown, used or expired)"
        % (host, port)
    )


def fetch(host: str, port: int, tubid: str, capability: bytes, sizes: list[int],
          timeout: float = TIMEOUT, allocate=bytearray) -> list:
    """Receive the parts offered under `capability` (of `sizes` bytes) from
    the controller at `host`:`port` whose certificate has `tubid`, each into
    ``allocate(size)``.

    Blocking (run it in a thread); each socket operation is bounded by
    `timeout`.  `BulkRefused` for a refused capability or a certificate
    that is not the furl's (checked before the capability is sent);
    `ConnectionLost` when the transfer breaks or sends other than the
    announced bytes: never a partial value."""
    tls = _connect(host, port, tubid, timeout)
    try:
        with tls:
            tls.sendall(MAGIC + GET + capability)
            if tls.recv(1) != OK:
                raise _refused(host, port)
            parts = [allocate(size) for size in sizes]
            for part in parts:
                _receive_exactly(tls, memoryview(part))
            if tls.recv(1):
                raise ConnectionLost(
                    "the bulk transfer sent more than the %d bytes announced" % sum(sizes)
                )
            return parts
    except (OSError, ssl.SSLError) as e:
        if isinstance(e, ConnectionLost):
            raise
        raise ConnectionLost("the bulk transfer from %s:%d broke: %s" % (host, port, e)) from None


def upload(host: str, port: int, tubid: str, capability: bytes, parts: list,
           timeout: float = TIMEOUT) -> None:
    """Send `parts` (bytes-like) under the upload `capability` to the
    controller at `host`:`port` whose certificate has `tubid`; returns once
    the controller holds them all.  Blocking; raises as `fetch` does."""
    tls = _connect(host, port, tubid, timeout)
    try:
        with tls:
            tls.sendall(MAGIC + PUT + capability)
            if tls.recv(1) != OK:
                raise _refused(host, port)
            for part in parts:
                _send_all(tls, part)
            if tls.recv(1) != OK:
                raise ConnectionLost("the bulk channel at %s:%d did not confirm the upload"
                                     % (host, port))
    except (OSError, ssl.SSLError) as e:
        if isinstance(e, ConnectionLost):
            raise
        raise ConnectionLost("the bulk upload to %s:%d broke: %s" % (host, port, e)) from None
