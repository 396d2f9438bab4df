"""What an in-process stand-in for Foolscap needs from Foolscap itself.

`taskfarm.testing.local` delivers calls between objects of one process as
a Foolscap connection would.  To fail the same way it needs Foolscap's
exception classes and its schema checks, and only this package may import
foolscap; so they are re-exported here.  Nothing here holds any policy.
"""

from __future__ import annotations

from foolscap.api import DeadReferenceError, RemoteException, Violation
from foolscap.ipb import IReferenceable
from foolscap.remoteinterface import getRemoteInterface
from twisted.python.failure import Failure

__all__ = [
    "DeadReferenceError",
    "RemoteException",
    "Violation",
    "check_arguments",
    "check_answer",
    "is_referenceable",
    "remote_failure",
]


def is_referenceable(value) -> bool:
    """Whether Foolscap would send `value` by reference (a Referenceable)."""
    return IReferenceable.providedBy(value)


def _schema(target, method: str):
    # As Foolscap's receiving side does: the target's own interface, which
    # for a `BoundedReferenceable` carries that object's message limit.
    get_interface = getattr(target, "getInterface", None)
    interface = get_interface() if get_interface is not None else getRemoteInterface(target)
    if interface is None:
        return None
    try:
        return interface[method]
    except KeyError:
        raise Violation(
            "%s has no method %r" % (interface.__remote_name__, method)
        ) from None


def check_arguments(target, method: str, args: tuple) -> None:
    """Check `args` of a call of `method` on `target` against its
    RemoteInterface, as the caller's side of Foolscap does; `Violation`."""
    schema = _schema(target, method)
    if schema is not None:
        schema.checkAllArgs(args, {}, False)


def check_answer(target, method: str, answer) -> None:
    """Check the answer of `method` against its declared return type."""
    schema = _schema(target, method)
    if schema is not None:
        schema.checkResults(answer, False)


def remote_failure(failure: Failure) -> RemoteException:
    """The error a caller sees when the remote method failed: Foolscap wraps
    it in `RemoteException` (taskfarm's Tubs do not expose remote types)."""
    return RemoteException(failure)
