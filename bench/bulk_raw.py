"""The ceiling of a bulk channel on this machine: 200 MB over loopback.

Three ways, each a sender and a receiver in one process (the receiver in
a thread or the same reactor), receiving into a preallocated bytearray:

* plain TCP sockets (the copy floor of the kernel);
* TLS with Twisted (TLSMemoryBIOProtocol), the sender writing memoryview
  slices under producer/consumer flow control;
* TLS with stdlib ``ssl`` sockets, sender and receiver in threads.

Run: ``python bench/bulk_raw.py [MB]``; prints MB/s for each.  Sender and
receiver share one process (one reactor for Twisted), so each figure is a
lower bound of a channel between two processes.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

CHUNK = 1 << 20


def _cert_files(tmp: str) -> tuple[str, str]:
    from foolscap.crypto import createCertificate

    cert = createCertificate()
    path = os.path.join(tmp, "cert.pem")
    with open(path, "wb") as f:
        f.write(cert.dumpPEM())
    return path, path


def _recv_into(sock, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 4 * CHUNK))
        if not k:
            raise EOFError(got)
        got += k
    return buf


def plain_tcp(payload: bytes) -> float:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    out = {}

    def serve():
        conn, _ = srv.accept()
        out["buf"] = _recv_into(conn, len(payload))
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    c = socket.create_connection(srv.getsockname())
    start = time.perf_counter()
    c.sendall(payload)
    t.join()
    elapsed = time.perf_counter() - start
    c.close()
    srv.close()
    assert len(out["buf"]) == len(payload)
    return len(payload) / elapsed / 1e6


def stdlib_tls(payload: bytes, certfile: str) -> float:
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(certfile)
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.verify_mode = ssl.CERT_NONE
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    out = {}

    def serve():
        conn, _ = srv.accept()
        tls = sctx.wrap_socket(conn, server_side=True)
        out["buf"] = _recv_into(tls, len(payload))
        tls.close()

    t = threading.Thread(target=serve)
    t.start()
    c = cctx.wrap_socket(socket.create_connection(srv.getsockname()))
    view = memoryview(payload)
    start = time.perf_counter()
    for i in range(0, len(payload), 4 * CHUNK):
        c.sendall(view[i:i + 4 * CHUNK])
    t.join()
    elapsed = time.perf_counter() - start
    c.close()
    srv.close()
    assert len(out["buf"]) == len(payload)
    return len(payload) / elapsed / 1e6


def twisted_tls(payload: bytes, certfile: str, chunk: int) -> float:
    from twisted.internet import protocol, reactor
    from twisted.internet import ssl as tssl
    from twisted.internet.interfaces import IPushProducer
    from zope.interface import implementer

    pem = open(certfile, "rb").read()
    server_opts = tssl.PrivateCertificate.loadPEM(pem).options()
    client_opts = tssl.CertificateOptions(verify=False)
    n = len(payload)
    state = {}

    class Receiver(protocol.Protocol):
        def connectionMade(self):
            self.buf = bytearray(n)
            self.view = memoryview(self.buf)
            self.got = 0

        def dataReceived(self, data):
            self.view[self.got:self.got + len(data)] = data
            self.got += len(data)
            if self.got >= n:
                state["end"] = time.perf_counter()
                self.transport.loseConnection()
                reactor.stop()

    @implementer(IPushProducer)
    class Sender(protocol.Protocol):
        def connectionMade(self):
            self.view = memoryview(payload)
            self.pos = 0
            self.paused = False
            self.transport.registerProducer(self, True)
            state["start"] = time.perf_counter()
            self.resumeProducing()

        def pauseProducing(self):
            self.paused = True

        def resumeProducing(self):
            self.paused = False
            while not self.paused and self.pos < n:
                # TLSMemoryBIOProtocol takes bytes only (it appends `data + b""`).
                self.transport.write(self.view[self.pos:self.pos + chunk].tobytes())
                self.pos += chunk

        def stopProducing(self):
            self.paused = True

    f = protocol.Factory.forProtocol(Receiver)
    port = reactor.listenSSL(0, f, server_opts, interface="127.0.0.1")
    cf = protocol.ClientFactory.forProtocol(Sender)
    reactor.connectSSL("127.0.0.1", port.getHost().port, cf, client_opts)
    reactor.run()
    return n / (state["end"] - state["start"]) / 1e6


def main() -> None:
    mb = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    if len(sys.argv) > 3 and sys.argv[2] == "--twisted":
        return twisted_only(mb, int(sys.argv[3]))
    payload = os.urandom(mb * 1000 * 1000)
    with tempfile.TemporaryDirectory() as tmp:
        certfile, _ = _cert_files(tmp)
        print("plain TCP loopback        %7.0f MB/s" % plain_tcp(payload))
        print("stdlib ssl, threads       %7.0f MB/s" % stdlib_tls(payload, certfile))
        # A reactor runs once per process: each Twisted figure in a child.
        for chunk_mib in (1, 4):
            subprocess.run(
                [sys.executable, __file__, str(mb), "--twisted", str(chunk_mib)], check=True
            )


def twisted_only(mb: int, chunk_mib: int) -> None:
    payload = os.urandom(mb * 1000 * 1000)
    with tempfile.TemporaryDirectory() as tmp:
        certfile, _ = _cert_files(tmp)
        rate = twisted_tls(payload, certfile, chunk_mib * CHUNK)
    print("Twisted TLS, %d MiB writes %7.0f MB/s" % (chunk_mib, rate))


if __name__ == "__main__":
    main()
