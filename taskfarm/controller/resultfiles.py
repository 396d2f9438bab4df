"""Big task results in files of their own, beside the journal.

A result is a byte string or a sequence of byte strings (a pickle and its
out-of-band buffers).  It is written once, with ``os.writev`` of the
strings themselves (no joined copy), behind a small header that records
how many strings there are and how long each is, and fsynced before the
journal commits the row that names the file.  Reading gives back the same
shape: a byte string, or a list of byte strings.

File layout (all integers little-endian)::

    b"TFRF"  format (1 byte: 1)  shape (1 byte: 0 one string, 1 a list)
    2 pad bytes  count (u32)  count x length (u64)  the strings, in order

A file whose size does not match its header is refused (`ResultFileError`):
a partial file is never taken for a result.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path

MAGIC = b"TFRF"
FORMAT = 1
_HEADER = struct.Struct("<4sBBxxI")
_LENGTH = struct.Struct("<Q")
#: How many buffers one writev call takes (Linux's IOV_MAX is 1024).
_IOV_MAX = 1024

# PickleBuffer: a result kept as out-of-band frames (`serialization.dumps_value`).
_BYTES_TYPES = (bytes, bytearray, memoryview, pickle.PickleBuffer)


class ResultFileError(OSError):
    """A result file is missing, truncated or not a result file."""


class StoredResult:
    """The place of a big result the controller holds on disk only.

    A task record holds one of these instead of its result's bytes once the
    journal has made the file durable and the store chose not to keep the
    bytes in memory; the result is read back when a client asks for it.
    """

    __slots__ = ("taskid", "nbytes")

    def __init__(self, taskid: int, nbytes: int) -> None:
        self.taskid = taskid
        self.nbytes = nbytes

    def __repr__(self) -> str:
        return "<StoredResult of task %d, %d bytes>" % (self.taskid, self.nbytes)


def chunks_of(value: object) -> list | None:
    """The byte strings of `value` (one string, or a list/tuple of them) as
    a list of flat memoryviews; None if `value` is neither."""
    if isinstance(value, _BYTES_TYPES):
        parts: Sequence = (value,)
    elif isinstance(value, (list, tuple)) and all(isinstance(v, _BYTES_TYPES) for v in value):
        parts = value
    else:
        return None
    views = []
    for part in parts:
        view = part if isinstance(part, memoryview) else memoryview(part)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        views.append(view)
    return views


def nbytes(value: object) -> int:
    """How many bytes the strings of `value` hold (0 if it has none)."""
    views = chunks_of(value)
    return 0 if views is None else sum(v.nbytes for v in views)


def header(value: object) -> bytes:
    """The header naming the shape and lengths of `value`'s strings."""
    views = chunks_of(value)
    if views is None:
        raise TypeError("a result is bytes or a list of bytes, not %s" % type(value).__name__)
    shape = 0 if isinstance(value, _BYTES_TYPES) else 1
    lengths = b"".join(_LENGTH.pack(v.nbytes) for v in views)
    return _HEADER.pack(MAGIC, FORMAT, shape, len(views)) + lengths


def encode(value: object) -> bytes:
    """`value` framed as one byte string (for small values kept inline)."""
    return header(value) + b"".join(chunks_of(value))


def decode(blob: bytes) -> bytes | list:
    """The value `encode` framed."""
    view = memoryview(blob)
    shape, lengths, offset = _parse_header(view)
    if offset + sum(lengths) != len(view):
        raise ResultFileError("a framed result of %d bytes, its header says %d"
                              % (len(view), offset + sum(lengths)))
    parts = []
    for length in lengths:
        parts.append(bytes(view[offset:offset + length]))
        offset += length
    return parts[0] if shape == 0 else parts


def write(path: Path, value: object) -> int:
    """Write `value` to a new file at `path` (0600) and fsync it; returns
    the bytes written.  A failed write removes what it wrote."""
    views = [memoryview(header(value))] + chunks_of(value)
    total = sum(v.nbytes for v in views)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, views)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        remove(path)
        raise
    os.close(fd)
    return total


def _write_all(fd: int, views: list) -> None:
    views = [v for v in views if v.nbytes]
    i = 0
    while i < len(views):
        written = os.writev(fd, views[i:i + _IOV_MAX])
        # A short write (a signal, a pipe-like file system): go on from there.
        while written:
            size = views[i].nbytes
            if written >= size:
                written -= size
                i += 1
            else:
                views[i] = views[i][written:]
                written = 0


def read(path: Path) -> bytes | list:
    """The value written to `path`: bytes, or a list of bytes.
    `ResultFileError` if the file is missing, partial or not ours."""
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise ResultFileError("no result file %s" % path) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        fixed = f.read(_HEADER.size)
        count = _HEADER.unpack(fixed)[3] if len(fixed) == _HEADER.size else 0
        if count * _LENGTH.size > size:
            raise ResultFileError("the result file %s is shorter than its header" % path)
        shape, lengths, offset = _parse_header(fixed + f.read(count * _LENGTH.size))
        if offset + sum(lengths) != size:
            raise ResultFileError(
                "the result file %s holds %d bytes, its header says %d"
                % (path, size, offset + sum(lengths))
            )
        parts = [_read_exactly(f, n, path) for n in lengths]
    return parts[0] if shape == 0 else parts


def _parse_header(raw) -> tuple[int, list[int], int]:
    # (shape, lengths, offset of the first string) of a header at raw's start.
    if len(raw) < _HEADER.size:
        raise ResultFileError("a result shorter than its header")
    magic, form, shape, count = _HEADER.unpack(bytes(raw[: _HEADER.size]))
    if magic != MAGIC or form != FORMAT or shape not in (0, 1):
        raise ResultFileError("not a taskfarm result (starts %r)" % (bytes(raw[:6]),))
    end = _HEADER.size + count * _LENGTH.size
    if len(raw) < end:
        raise ResultFileError("a result shorter than its header")
    lengths = [length for (length,) in _LENGTH.iter_unpack(bytes(raw[_HEADER.size:end]))]
    if shape == 0 and count != 1:
        raise ResultFileError("a single-string result with %d strings" % count)
    return shape, lengths, end


def _read_exactly(f, n: int, path: Path) -> bytes:
    # One allocation and (for a regular file) one read call: no copy.
    data = f.read(n)
    if len(data) == n:
        return data
    parts, got = [data], len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            raise ResultFileError("the result file %s ends early" % path)
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def remove(path: Path) -> None:
    """Remove `path` if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: Path) -> None:
    """Make the entries of the folder `path` durable (new files in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
