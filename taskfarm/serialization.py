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
"""

from __future__ import annotations

import io
import pickle

import cloudpickle

from taskfarm.errors import BadRequest, MessageTooLarge, SerializationError

#: The default largest message (a batch of tasks or results) in bytes.
DEFAULT_MAX_MESSAGE_SIZE = 512 * 1024 * 1024

_PROTOCOL = pickle.HIGHEST_PROTOCOL


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


def loads(blob: bytes, what: str = "value") -> object:
    """Unpickle a user value made by `dumps`; `what` names it in errors."""
    try:
        return pickle.loads(blob)
    except Exception as e:
        raise SerializationError(
            "cannot unpickle %s: %s: %s" % (what, type(e).__name__, e)
        ) from None


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles built-in containers and scalars, refuses every class."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            "envelopes may hold plain data only, not %s.%s" % (module, name)
        )


def pack(value: object) -> bytes:
    """Pickle an envelope made of tuples, lists, dicts, str, bytes, numbers."""
    return pickle.dumps(value, protocol=_PROTOCOL)


def unpack(blob: bytes, limit: int | None = None) -> object:
    """Read an envelope made by `pack`; anything else raises `BadRequest`."""
    if not isinstance(blob, bytes):
        raise BadRequest("expected bytes, got %s" % type(blob).__name__)
    check_size(blob, limit)
    try:
        return _DataOnlyUnpickler(io.BytesIO(blob)).load()
    except Exception as e:
        raise BadRequest("malformed message: %s: %s" % (type(e).__name__, e)) from None


def check_size(blob: bytes, limit: int | None, what: str = "message") -> None:
    """Raise `MessageTooLarge` when `blob` is longer than `limit` bytes."""
    if limit is not None and len(blob) > limit:
        raise MessageTooLarge(
            "%s of %d bytes exceeds the limit of %d bytes" % (what, len(blob), limit)
        )
