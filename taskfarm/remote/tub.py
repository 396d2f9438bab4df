"""Making Tubs: the controller's (persistent identity, listening) and clients'.

The controller's certificate lives in the profile, so its furls stay valid
across restarts; so do their secret names and, unless told otherwise, the
port.  Furl files are written atomically with mode 0600.
"""

from __future__ import annotations

import re
import warnings

from foolscap.api import Tub
from foolscap.furl import decode_furl
from foolscap.util import allocate_tcp_port
from twisted.internet.endpoints import serverFromString

from taskfarm.errors import ProfileError
from taskfarm.profile import Profile, write_secret

#: Seconds of quiet before Foolscap pings a connection, and of silence
#: before it drops it.
KEEPALIVE = 10
DISCONNECT_AFTER = 60


def new_tub(cert_data: bytes | None = None) -> Tub:
    """A Tub with taskfarm's options; errors travel as data, never raised."""
    with warnings.catch_warnings():
        # pyOpenSSL warns about APIs Twisted's TLS still uses; not ours.
        warnings.simplefilter("ignore", DeprecationWarning)
        tub = Tub(certData=cert_data)
    tub.setOption("expose-remote-exception-types", False)
    # Foolscap pings a quiet connection and drops one silent for a minute,
    # so no call waits forever on a stopped peer.
    tub.setOption("keepaliveTimeout", KEEPALIVE)
    tub.setOption("disconnectTimeout", DISCONNECT_AFTER)
    tub.setOption("logLocalFailures", False)
    tub.setOption("logRemoteFailures", False)
    return tub


def load_or_create_cert(profile: Profile) -> bytes:
    """The controller's certificate and key, created once per profile."""
    profile.ensure()
    path = profile.cert_file
    if path.exists():
        return path.read_bytes()
    tub = new_tub()
    data = tub.getCertData()
    write_secret(path, data)
    return data


def previous_furl(profile: Profile, interface: str) -> tuple[str, list[str], str] | None:
    """(tub id, location hints, name) of the furl file written last time."""
    path = profile.furl_file(interface)
    try:
        return decode_furl(path.read_text().strip())
    except (OSError, ValueError):
        return None


def default_listen(profile: Profile) -> str:
    """Loopback, on the port used last time when there was one."""
    port = None
    last = previous_furl(profile, "task")
    if last is not None and last[1]:
        try:
            port = int(last[1][0].rsplit(":", 1)[1])
        except (IndexError, ValueError):
            port = None
    if port is None or not _port_free(port):
        port = allocate_tcp_port()
    return "tcp:%d:interface=127.0.0.1" % port


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def parse_listen(listen: str) -> tuple[str, int]:
    """(interface, port) of a ``tcp:PORT[:interface=HOST]`` endpoint string.

    Colons escaped as ``\\:`` (an IPv6 address) belong to their value.
    """
    parts = [part.replace("\\:", ":") for part in re.split(r"(?<!\\):", listen)]
    if not parts or parts[0] != "tcp" or len(parts) < 2:
        raise ValueError(
            "--listen must be a tcp endpoint like tcp:10105:interface=127.0.0.1, "
            "not %r" % (listen,)
        )
    try:
        port = int(parts[1])
    except ValueError:
        raise ValueError("the port in --listen %r is not a number" % (listen,)) from None
    interface = "0.0.0.0"
    for part in parts[2:]:
        if part.startswith("interface="):
            interface = part[len("interface="):]
    return interface, port


def listen_and_locate(tub: Tub, listen: str, location: str | None, reactor) -> str:
    """Listen on `listen` (port 0 picks a free one); returns the location."""
    interface, port = parse_listen(listen)
    if port == 0:
        port = allocate_tcp_port()
        listen = "tcp:%d:interface=%s" % (port, interface.replace(":", "\\:"))
    tub.listenOn(serverFromString(reactor, listen))
    if location is None:
        if interface in ("0.0.0.0", "::", ""):
            raise ValueError(
                "listening on all interfaces needs --location HOST:PORT, "
                "the address engines and clients should dial"
            )
        location = "%s:%d" % (interface, port)
    tub.setLocation("tcp:" + location if not location.startswith("tcp:") else location)
    return location


def register(tub: Tub, profile: Profile, interface: str, ref) -> str:
    """Register `ref` under its stable name; write and return its furl."""
    last = previous_furl(profile, interface)
    name = last[2] if last is not None and last[0] == tub.getTubID() else None
    furl = tub.registerReference(ref, name=name)
    write_secret(profile.furl_file(interface), furl + "\n")
    return furl


def check_profile_writable(profile: Profile) -> None:
    try:
        profile.ensure()
    except OSError as e:
        raise ProfileError("cannot use profile folder %s: %s" % (profile.root, e)) from None
