"""The process that runs `depend` predicates for the controller.

Run as ``python -m taskfarm.controller.depend_child`` by
`taskfarm.controller.predicates.PredicatePool`, never by hand.  It speaks
length-prefixed pickles on its stdin and stdout:

* in: ``("hello", sys_path, cwd)`` once, then ``("eval", [(reqid, key,
  properties_blob, trace), ...])`` batches;
* out: ``("ready",)`` once, then ``(reqid, accepted, reason, loadable,
  read)`` per request, in the order asked, each as soon as it is known.
  `read` is None unless the request asked to `trace`: then it is the sorted
  list of the property names the predicate read (`ReadRecorder`).

Predicates are unpickled once and cached (a bounded number).  Whatever a
predicate does (raise `SystemExit`, print, read stdin) cannot disturb the
protocol; if it blocks or kills this process the controller notices.  The
process exits when its stdin closes or its parent goes away.

Only the standard library is imported here, so it starts fast.
"""

from __future__ import annotations

import collections
import os
import pickle
import signal
import struct
import sys
import threading
import time

_HEADER = struct.Struct(">I")

#: How many unpickled predicates one process keeps.
MAX_CACHED = 256

#: The longest reason text sent back.
MAX_REASON = 500


def read_frame(stream) -> object | None:
    """The next message on `stream`, or None at end of file."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    body = stream.read(size)
    if len(body) < size:
        return None
    return pickle.loads(body)


def write_frame(stream, message: object) -> None:
    """Send one message on `stream` and flush it."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(body)) + body)
    stream.flush()


def describe(error: BaseException) -> str:
    """``Type: message`` of an exception, short, even if its str() raises."""
    try:
        text = "%s: %s" % (type(error).__name__, error)
    except BaseException:
        text = "%s (its message cannot be shown)" % type(error).__name__
    return text[:MAX_REASON]


class ReadRecorder(dict):
    """The properties as a traced predicate sees them: a dict that notes the
    name of every key read (a lookup, ``in``, ``get``); iterating over it
    counts as reading every key."""

    def __init__(self, properties: dict) -> None:
        super().__init__(properties)
        self.read: set = set()

    def _all(self) -> None:
        self.read.update(dict.keys(self))

    def __getitem__(self, key):
        self.read.add(key)
        return dict.__getitem__(self, key)

    def __contains__(self, key) -> bool:
        self.read.add(key)
        return dict.__contains__(self, key)

    def get(self, key, default=None):
        self.read.add(key)
        return dict.get(self, key, default)

    def __iter__(self):
        self._all()
        return dict.__iter__(self)

    def keys(self):
        self._all()
        return dict.keys(self)

    def items(self):
        self._all()
        return dict.items(self)

    def values(self):
        self._all()
        return dict.values(self)

    def names(self) -> list[str]:
        """The names read, sorted (a key that is no str shown by its repr)."""
        return sorted(k if isinstance(k, str) else repr(k) for k in self.read)


class Evaluator:
    """Loads predicates (cached) and runs them; never raises."""

    def __init__(self) -> None:
        #: key -> (predicate, None) or (None, reason it cannot be loaded).
        self._cache: collections.OrderedDict = collections.OrderedDict()

    def load(self, key: bytes):
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        try:
            predicate = pickle.loads(key)
        except BaseException as e:
            cached = (None, "cannot load: " + describe(e))
        else:
            if callable(predicate):
                cached = (predicate, None)
            else:
                cached = (None, "cannot load: the depend is a %s, not a function"
                          % type(predicate).__name__)
        self._cache[key] = cached
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
        return cached

    def verdict(self, key: bytes, properties_blob: bytes, trace: bool = False) -> tuple:
        """``(accepted, reason, loadable, read)`` for one request; `read`
        is None unless `trace` (then the names the predicate read)."""
        predicate, reason = self.load(key)
        if predicate is None:
            return (False, reason, False, None)
        recorder = None
        try:
            properties = pickle.loads(properties_blob)
            if trace:
                properties = recorder = ReadRecorder(properties)
            accepted = bool(predicate(properties))
            return (accepted, None, True, _names(recorder))
        except BaseException as e:  # SystemExit and KeyboardInterrupt too
            return (False, "raised " + describe(e), True, _names(recorder))


def _names(recorder: ReadRecorder | None) -> list[str] | None:
    if recorder is None:
        return None
    try:
        return recorder.names()
    except BaseException:  # a key whose repr raises
        return None


def _exit_with_parent(parent: int) -> None:
    # A predicate may block for good; the stdin EOF is only seen between
    # requests, so also leave as soon as the controller is gone.
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def main() -> None:
    # Ctrl-C in a terminal signals the whole group: the controller decides
    # when this process ends (it closes our stdin).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    # The protocol gets private copies of stdin/stdout; predicates see
    # /dev/null and stderr there instead.
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    hello = read_frame(requests)
    if hello is None:
        return
    _, path, cwd = hello
    sys.path[:] = list(path)
    os.chdir(cwd)
    write_frame(replies, ("ready",))
    evaluator = Evaluator()
    while True:
        message = read_frame(requests)
        if message is None:
            return
        for request in message[1]:
            reqid, key, properties_blob = request[:3]
            trace = len(request) > 3 and bool(request[3])
            write_frame(replies, (reqid,) + evaluator.verdict(key, properties_blob, trace))


if __name__ == "__main__":
    main()
