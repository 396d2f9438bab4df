"""How values become bytes and back: the only module that uses cloudpickle.

Two kinds of bytes travel:

* **user values** (pushed data, pulled results, functions, `depend`
  predicates): `dumps` / `loads`, with cloudpickle, so closures and lambdas
  work.  The controller never unpickles these: `depend` predicates are
  unpickled and run in its evaluator processes
  (`taskfarm.controller.predicates`).
* **envelopes** (batches of tasks, results, commands): `pack` / `unpack`,
  plain pickle restricted to built-in data types, so a peer that sends a
  malformed or hostile envelope gets `BadRequest`, never code execution.

**Big buffers travel out of band** (pickle protocol 5).  `dumps_value`
pickles a user value with NumPy arrays, `bytes`, `bytearray` and
`memoryview` of `OOB_MIN` bytes or more kept outside the pickle: its
*frames* are a tuple ``(header, buffer, ...)`` of `pickle.PickleBuffer`
objects, the header the pickle stream itself.  A value without such
buffers stays one `bytes` blob, as before.  Envelopes hold frames like any
other field; `pack_message` turns an envelope into what travels: a list
of byte strings, the envelope's own pickle first and then every buffer as
it is (no concatenation, no re-pickling).  `unpack` reads either form with the
data-only unpickler: the buffers come back as the very `bytes` objects
received, so a relay (the controller) stores and sends them on without
copying or opening them.  `loads` rebuilds a value from its blob or its
frames.
"""

from __future__ import annotations

import io
import pickle
from pickle import PickleBuffer

import cloudpickle

from taskfarm.errors import BadRequest, MessageTooLarge, SerializationError

#: The default largest message (a batch of tasks or results) in bytes.
DEFAULT_MAX_MESSAGE_SIZE = 512 * 1024 * 1024

_PROTOCOL = pickle.HIGHEST_PROTOCOL

#: Buffers of at least this many bytes travel out of band; smaller ones
#: stay inside the pickle (a buffer of its own costs more than a copy).
OOB_MIN = 64 * 1024


def parts_limit(limit: int) -> int:
    """The most byte strings one message of `limit` bytes may be made of: a
    value's frames hold one buffer of `OOB_MIN` bytes at least besides their
    header, so a message has at most about two parts per `OOB_MIN` bytes."""
    return 2 * (limit // OOB_MIN) + 16


# -- user values, with big buffers out of band ------------------------------------


def _rebuild_bytes(buffer) -> bytes:
    # The buffer is the received `bytes` object itself: no copy.
    return buffer if type(buffer) is bytes else bytes(buffer)


def _rebuild_bytearray(buffer) -> bytearray:
    return bytearray(buffer)


def _rebuild_memoryview(buffer, fmt: str, shape: tuple, readonly: bool) -> memoryview:
    if not readonly and not isinstance(buffer, bytearray):
        buffer = bytearray(buffer)
    view = memoryview(buffer)
    if readonly and not view.readonly:
        view = view.toreadonly()
    try:
        return view.cast("B").cast(fmt, shape) if (fmt, shape) != ("B", (view.nbytes,)) else view
    except (TypeError, ValueError):
        return view  # a format memoryview.cast cannot make: the raw bytes


def _rebuild_array(buffer, dtype, shape: tuple, fortran: bool, writeable: bool):
    import numpy

    if writeable and not isinstance(buffer, bytearray):
        # Received bytes are immutable: a writable array needs its own copy.
        buffer = bytearray(buffer)
    array = numpy.frombuffer(buffer, dtype=dtype)
    if not writeable and array.flags.writeable:
        array.flags.writeable = False  # a ReceivedBuffer, kept as it was sent
    return array.reshape(shape, order="F" if fortran else "C")


class ReceivedBuffer(bytearray):
    """A buffer received straight into this process's memory (the bulk-data
    channel receives each frame into one): `loads` hands it to the value
    it rebuilds as it is, so a NumPy array keeps it without a copy."""

    __slots__ = ()


class _Raw:
    """A big `bytes` or `bytearray` found in a value, pickled out of band."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value

    def __reduce_ex__(self, protocol):
        rebuild = _rebuild_bytes if type(self.value) is bytes else _rebuild_bytearray
        return rebuild, (PickleBuffer(self.value),)


def _wrap(value, depth: int = 0):
    """`value` with its big `bytes`/`bytearray` (itself, or inside lists,
    tuples and dicts near the top) marked for out-of-band pickling.  The
    pickler never sees exact bytes as anything but bytes, so they are
    found here; containers are rebuilt only where one was found."""
    kind = type(value)
    if kind is bytes or kind is bytearray:
        return _Raw(value) if len(value) >= OOB_MIN else value
    if kind not in (list, tuple, dict) or depth >= 3 or len(value) > 256:
        return value
    if kind is dict:
        items = {k: _wrap(v, depth + 1) for k, v in value.items()}
        changed = any(items[k] is not v for k, v in value.items())
        return items if changed else value
    items = [_wrap(v, depth + 1) for v in value]
    if all(a is b for a, b in zip(items, value, strict=True)):
        return value
    return items if kind is list else tuple(items)


class _ValuePickler(cloudpickle.Pickler):
    """cloudpickle, with contiguous NumPy arrays and memoryviews out of band
    through taskfarm's own rebuilders (so a writable array comes back
    writable, and a read-only one without a copy)."""

    def reducer_override(self, obj):
        kind = type(obj)
        if kind is memoryview:
            return self._reduce_memoryview(obj)
        if kind.__module__ == "numpy" and kind.__name__ == "ndarray":
            reduced = self._reduce_array(obj)
            if reduced is not None:
                return reduced
        return super().reducer_override(obj)

    @staticmethod
    def _reduce_memoryview(view: memoryview):
        data = PickleBuffer(view) if view.c_contiguous else view.tobytes()
        return _rebuild_memoryview, (data, view.format, view.shape, view.readonly)

    @staticmethod
    def _reduce_array(array):
        if array.dtype.hasobject or array.nbytes < OOB_MIN:
            return None
        flags = array.flags
        if flags.c_contiguous:
            fortran = False
        elif flags.f_contiguous:
            fortran = True
        else:
            return None  # numpy's own pickle copies it into the stream
        try:
            buffer = PickleBuffer(array)
        except (ValueError, TypeError, BufferError):
            # A dtype without a buffer format (datetime64 ...): its bytes.
            try:
                buffer = PickleBuffer(array.ravel(order="K").view("u1"))
            except (ValueError, TypeError, BufferError):
                return None
        return _rebuild_array, (buffer, array.dtype, array.shape, fortran, bool(flags.writeable))


def _frames(header: bytes, buffers: list) -> bytes | tuple:
    if not buffers:
        return header
    return (PickleBuffer(header), *buffers)


def dumps_value(value: object, what: str = "value") -> bytes | tuple:
    """Pickle a user value (cloudpickle, protocol 5): one `bytes` blob, or
    its frames ``(header, buffer, ...)`` when it holds big buffers (see the
    module docstring).  `loads` reads either."""
    buffers: list = []

    def out_of_band(buffer: PickleBuffer) -> bool:
        # True keeps a buffer in the stream: numpy offers even tiny ones.
        if memoryview(buffer).nbytes < OOB_MIN:
            return True
        buffers.append(buffer)
        return False

    try:
        stream = io.BytesIO()
        _ValuePickler(stream, protocol=_PROTOCOL, buffer_callback=out_of_band).dump(_wrap(value))
        header = stream.getvalue()
    except Exception as e:
        raise SerializationError(
            "cannot pickle %s of type %s: %s: %s"
            % (what, type(value).__name__, type(e).__name__, e)
        ) from None
    return _frames(header, buffers)


def is_frames(data: object) -> bool:
    """Whether `data` is frames (a tuple or list of buffers), not one blob."""
    return type(data) is tuple or type(data) is list


def frames_size(frames) -> int:
    """The bytes in `frames` (or in a single blob)."""
    if not is_frames(frames):
        return len(frames)
    return sum(memoryview(part).nbytes for part in frames)


def as_frames(value: object) -> tuple | None:
    """Received frames (a sequence of bytes) as stored frames (a tuple of
    `PickleBuffer`, which `pack_message` sends out of band again), or
    None when `value` is not a non-empty sequence of bytes-like parts."""
    if not is_frames(value) or not value:
        return None
    try:
        return tuple(part if type(part) is PickleBuffer else PickleBuffer(part) for part in value)
    except TypeError:
        return None


def _part_bytes(part) -> bytes:
    """A frame as the `bytes` that Foolscap sends: the object itself when
    the frame wraps a whole `bytes`, else a copy."""
    view = part.raw() if type(part) is PickleBuffer else memoryview(part)
    owner = view.obj
    if type(owner) is bytes and view.nbytes == len(owner):
        return owner
    return view.tobytes()


def _loadable(part):
    """A frame as `loads` hands it to pickle: a whole `ReceivedBuffer` as
    it is (the value may keep it), else as `_part_bytes`."""
    view = part.raw() if type(part) is PickleBuffer else memoryview(part)
    owner = view.obj
    if type(owner) is ReceivedBuffer and view.nbytes == len(owner):
        return owner
    return _part_bytes(part)


def dumps(value: object, what: str = "value") -> bytes:
    """Pickle a user value with cloudpickle; `what` names it in errors."""
    try:
        return cloudpickle.dumps(value, protocol=_PROTOCOL)
    except Exception as e:
        raise SerializationError(
            "cannot pickle %s of type %s: %s: %s"
            % (what, type(value).__name__, type(e).__name__, e)
        ) from None


def dumps_exception(error: BaseException) -> bytes | None:
    """An engine's exception as bytes for the client, or None when it
    cannot be pickled.

    cloudpickle, so a class defined in ``__main__`` travels by value.  The
    bytes hold ``(class, args, __dict__, pickled exception)``: the client
    (`taskfarm.errors.from_wire`) unpickles the exception itself, or
    rebuilds it from the class, args and attributes where plain pickle
    would call an ``__init__`` of the user's that may not take its own
    ``args`` back.
    """
    try:
        whole = cloudpickle.dumps(error, protocol=_PROTOCOL)
    except Exception:
        whole = None
    for state in (vars(error), {}):
        try:
            return cloudpickle.dumps(
                (type(error), error.args, state, whole), protocol=_PROTOCOL
            )
        except Exception:
            continue
    return whole


def loads(blob, what: str = "value") -> object:
    """Unpickle a user value made by `dumps` or `dumps_value` (a blob or its
    frames); `what` names it in errors."""
    try:
        if is_frames(blob):
            parts = [_loadable(part) for part in blob]
            return pickle.loads(parts[0], buffers=parts[1:])
        return pickle.loads(blob)
    except Exception as e:
        raise SerializationError(
            "cannot unpickle %s: %s: %s" % (what, type(e).__name__, e)
        ) from None


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles built-in containers and scalars, refuses every class.
    Out-of-band buffers come back as the byte strings they arrived as."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            "envelopes may hold plain data only, not %s.%s" % (module, name)
        )


def pack(value: object) -> bytes:
    """Pickle an envelope made of tuples, lists, dicts, str, bytes, numbers
    (and frames, copied into the one blob: for the journal and for sizes)."""
    return pickle.dumps(value, protocol=_PROTOCOL)


def pack_frames(value: object) -> bytes | tuple:
    """Pickle an envelope that holds frames (a task's payload, a pull's
    values) keeping their buffers out of band: one blob, or frames whose
    header is the envelope's data-only pickle."""
    buffers: list = []
    header = pickle.dumps(value, protocol=_PROTOCOL, buffer_callback=buffers.append)
    return _frames(header, buffers)


def pack_message(value: object) -> list:
    """An envelope as it travels in parts: ``[envelope pickle, buffer,
    ...]``, each buffer the very `bytes` object its frame wraps (see the
    module docstring); just ``[envelope pickle]`` when it holds no frames."""
    buffers: list = []
    header = pickle.dumps(value, protocol=_PROTOCOL, buffer_callback=buffers.append)
    return [header, *map(_part_bytes, buffers)]


def message_size(message) -> int:
    """The bytes of a message made by `pack_message` (or `pack`)."""
    if isinstance(message, bytes):
        return len(message)
    return sum(len(part) for part in message)


def packed_size(value: object) -> int:
    """``message_size(pack_message(value))``: the envelope's pickle plus its
    buffers, without copying the buffers."""
    buffers: list = []
    header = pickle.dumps(value, protocol=_PROTOCOL, buffer_callback=buffers.append)
    return len(header) + sum(memoryview(b).nbytes for b in buffers)


def unpack(blob, limit: int | None = None) -> object:
    """Read an envelope made by `pack`, `pack_frames` or `pack_message` (one
    blob, or a list or tuple of parts); anything else raises `BadRequest`.
    A message of parts is refused with `MessageTooLarge` when all its parts
    together exceed `limit`."""
    if isinstance(blob, bytes):
        check_size(blob, limit)
        header, buffers = blob, None
    elif is_frames(blob) and blob:
        parts = [_unpackable(p) for p in blob]
        if not all(type(part) is bytes or type(part) is ReceivedBuffer for part in parts):
            raise BadRequest("expected a list of byte strings")
        if limit is not None and len(parts) > parts_limit(limit):
            raise MessageTooLarge(
                "a message of %d parts exceeds the limit of %d parts"
                % (len(parts), parts_limit(limit))
            )
        check_size(parts, limit)
        header, buffers = parts[0], parts[1:]
    else:
        raise BadRequest("expected bytes, got %s" % type(blob).__name__)
    try:
        return _DataOnlyUnpickler(io.BytesIO(header), buffers=buffers).load()
    except Exception as e:
        raise BadRequest("malformed message: %s: %s" % (type(e).__name__, e)) from None


def _unpackable(part):
    """A part of a message as `unpack` reads it: a whole `ReceivedBuffer`
    as it is (the values unpickled from it may keep it: no copy), a
    `PickleBuffer` as `_part_bytes`, anything else unchanged (and
    refused unless bytes)."""
    if type(part) is PickleBuffer:
        view = part.raw()
        if type(view.obj) is ReceivedBuffer and view.nbytes == len(view.obj):
            return view.obj
        return _part_bytes(part)
    return part


def check_size(blob, limit: int | None, what: str = "message") -> None:
    """Raise `MessageTooLarge` when `blob` (bytes, or a message's parts) is
    longer than `limit` bytes."""
    if limit is None:
        return
    size = len(blob) if isinstance(blob, bytes) else message_size(blob)
    if size > limit:
        raise MessageTooLarge(
            "%s of %d bytes exceeds the limit of %d bytes" % (what, size, limit)
        )


# -- frames in the journal ------------------------------------------------------------


def frames_parts(frames) -> list[bytes]:
    """Stored frames as the byte strings to write one after the other (the
    journal's result file and its inline form keep their boundaries, and
    give them back as a list); no copy where a frame wraps a whole `bytes`."""
    return [_part_bytes(part) for part in frames]



def frames_views(frames) -> list[memoryview]:
    """Stored frames as flat memoryviews over their buffers (no copy,
    whatever holds the bytes): for writing them out."""
    views = []
    for part in frames:
        view = part.raw() if type(part) is PickleBuffer else memoryview(part).cast("B")
        views.append(view)
    return views
