"""Where user code runs on an engine: a persistent namespace, and its operations.

Everything here runs in the engine's one worker thread, never on the
reactor thread.  User errors never escape: each operation returns
``(ok, data)`` where `data` is pickled bytes on success and the wire form of
a typed error otherwise (`RemoteTaskError` with the remote traceback text).
"""

from __future__ import annotations

import builtins
import io
import os
import sys
import threading
import traceback
from collections.abc import Callable

from taskfarm import serialization
from taskfarm.errors import RemoteTaskError, SerializationError, TaskfarmError, to_wire
from taskfarm.task import CALL, EXEC

_THIS_DIR = os.path.dirname(os.path.abspath(__file__))
_TASKFARM_DIR = os.path.dirname(_THIS_DIR)


class Interrupt(BaseException):
    """Raised inside user code to stop it (a BaseException, so that a plain
    ``except Exception`` in user code does not swallow it)."""

    error: TaskfarmError


class _ThreadRoutedStream(io.TextIOBase):
    """Stands in for sys.stdout / sys.stderr: writes from a thread that is
    capturing go to that thread's buffer, all others to the real stream."""

    def __init__(self, real) -> None:
        self._real = real
        self._local = threading.local()

    def capture(self) -> io.StringIO:
        buffer = self._local.buffer = io.StringIO()
        return buffer

    def release(self) -> str:
        buffer = getattr(self._local, "buffer", None)
        self._local.buffer = None
        return buffer.getvalue() if buffer is not None else ""

    def write(self, text: str) -> int:
        buffer = getattr(self._local, "buffer", None)
        if buffer is not None:
            return buffer.write(text)
        return self._real.write(text)

    def flush(self) -> None:
        if getattr(self._local, "buffer", None) is None:
            self._real.flush()

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str):
        return getattr(self._real, name)


_streams: tuple[_ThreadRoutedStream, _ThreadRoutedStream] | None = None


def install_output_capture() -> tuple[_ThreadRoutedStream, _ThreadRoutedStream]:
    """Route stdout/stderr per thread (once per process)."""
    global _streams
    if _streams is None:
        _streams = (_ThreadRoutedStream(sys.stdout), _ThreadRoutedStream(sys.stderr))
        sys.stdout, sys.stderr = _streams
    return _streams


def _user_traceback(error: BaseException) -> str:
    """The traceback text, without the engine's own frames."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_TASKFARM_DIR):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(error), error, tb))


class Namespace:
    """One engine's persistent user namespace and the operations on it."""

    def __init__(self, engine_id: int = -1) -> None:
        self.engine_id = engine_id
        self.user_ns: dict = {}
        self.reset()
        self._operations: dict[str, Callable] = {
            "task": self.run_task,
            "execute": self.execute,
            "push": self.push,
            "pull": self.pull,
            "reset": self._reset_op,
            "keys": self.keys,
        }

    def reset(self) -> None:
        """Start from an empty namespace that holds only `id`."""
        self.user_ns = {
            "__name__": "__main__",
            "__builtins__": builtins,
            "id": self.engine_id,
        }

    def set_engine_id(self, engine_id: int) -> None:
        self.engine_id = engine_id
        self.user_ns["id"] = engine_id

    def run(self, op: str, args: tuple) -> tuple[bool, object]:
        """Run one command; returns ``(ok, data)``.  Raises only `Interrupt`."""
        operation = self._operations.get(op)
        if operation is None:
            return False, to_wire(TaskfarmError("unknown engine command %r" % (op,)))
        try:
            return True, operation(*args)
        except Interrupt:
            raise
        except TaskfarmError as e:
            return False, to_wire(
                RemoteTaskError(type(e).__name__, str(e), "", self.engine_id)
            )
        except BaseException as e:
            return False, to_wire(
                RemoteTaskError(
                    type(e).__name__, str(e), _user_traceback(e), self.engine_id
                )
            )

    # -- operations (each returns bytes, or raises) ----------------------------------

    def execute(self, code: str) -> bytes:
        """Run a code string; returns the pickled ``(stdout, stderr)``."""
        stdout, stderr = install_output_capture()
        stdout.capture()
        stderr.capture()
        try:
            self._exec(code)
        finally:
            out, err = stdout.release(), stderr.release()
        return serialization.pack((out, err))

    def _exec(self, code: str) -> None:
        compiled = compile(code, "<engine %d>" % self.engine_id, "exec")
        exec(compiled, self.user_ns)

    def push(self, blob: bytes) -> bytes:
        """Put pickled ``{name: value}`` into the namespace."""
        values = serialization.loads(blob, "the pushed values")
        self.user_ns.update(values)
        return b""

    def pull(self, names: tuple[str, ...]) -> bytes:
        """The pickled tuple of the values of `names`."""
        return serialization.pack(tuple(self._pull_one(name) for name in names))

    def _pull_one(self, name: str) -> bytes:
        return serialization.dumps(self._lookup(name), "%r" % name)

    def keys(self) -> bytes:
        """The pickled list of user names (without dunders)."""
        return serialization.pack(
            sorted(k for k in self.user_ns if not k.startswith("__"))
        )

    def _reset_op(self) -> bytes:
        self.reset()
        return b""

    def run_task(
        self,
        kind: str,
        payload: bytes,
        clear_before: bool,
        clear_after: bool,
        timeout: float | None = None,
    ) -> bytes:
        """Run a task (push, execute, pull; or call a function)."""
        if clear_before:
            self.reset()
        try:
            if kind == EXEC:
                expression, pull, push = serialization.loads(payload, "the task")
                if push is not None:
                    self.push(push)
                self._exec(expression)
                values = {name: self._lookup(name) for name in pull}
                return self._dump_pulled(values)
            if kind == CALL:
                function_blob, args_blob = serialization.loads(payload, "the task")
                function = serialization.loads(function_blob, "the task's function")
                args, kwargs = serialization.loads(args_blob, "the task's arguments")
                result = function(*args, **kwargs)
                return serialization.dumps(result, "the return value")
            raise TaskfarmError("unknown task kind %r" % (kind,))
        finally:
            if clear_after:
                self.reset()

    def _lookup(self, name: str) -> object:
        try:
            return self.user_ns[name]
        except KeyError:
            raise NameError(
                "name %r is not defined on engine %d" % (name, self.engine_id)
            ) from None

    @staticmethod
    def _dump_pulled(values: dict) -> bytes:
        try:
            return serialization.dumps(values, "the pulled values")
        except SerializationError:
            # Pickle them one by one to name the culprit in the error.
            for name, value in values.items():
                serialization.dumps(value, "pulled name %r" % name)
            raise
