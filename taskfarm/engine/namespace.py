"""Where user code runs on an engine: a persistent namespace, and its operations.

Everything here runs in the engine's one worker thread, never on the
reactor thread.  User errors never escape: each operation returns
``(ok, data)`` where `data` is pickled bytes on success and the wire form of
a typed error otherwise (`RemoteTaskError` with the remote traceback text).
"""

from __future__ import annotations

import builtins
import collections
import io
import os
import sys
import threading
import traceback
import types
from collections.abc import Callable

from taskfarm import serialization
from taskfarm.errors import (
    RemoteTaskError,
    SerializationError,
    TaskfarmError,
    remote_wire,
    to_wire,
)
from taskfarm.task import CALL, EXEC

_THIS_DIR = os.path.dirname(os.path.abspath(__file__))
_TASKFARM_DIR = os.path.dirname(_THIS_DIR)


class Interrupt(BaseException):
    """Raised inside user code to stop it (a BaseException, so that a plain
    ``except Exception`` in user code does not swallow it)."""

    error: TaskfarmError


#: Bytes (UTF-8) of stdout, and as many of stderr, that one task keeps by
#: default (``--max-task-output``); what is beyond is cut, and counted.
DEFAULT_MAX_TASK_OUTPUT = 1024 * 1024


class BoundedOutput:
    """One stream's output of one task, kept up to `limit` bytes of UTF-8.

    Writes are appended to a list (no per-line work beyond a length); once
    the limit is reached the rest is only counted, and `getvalue` ends with
    ``[... N bytes cut]``.
    """

    __slots__ = ("_parts", "_room", "cut")

    def __init__(self, limit: int) -> None:
        self._parts: list[str] = []
        self._room = limit
        #: Bytes written beyond the limit.
        self.cut = 0

    def write(self, text: str) -> int:
        size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        room = self._room
        if size <= room:
            self._parts.append(text)
            self._room = room - size
        elif room <= 0:
            self.cut += size
        else:
            kept = text.encode("utf-8", "surrogatepass")[:room].decode("utf-8", "ignore")
            self._parts.append(kept)
            self.cut += size - len(kept.encode("utf-8", "surrogatepass"))
            self._room = 0
        return len(text)

    def getvalue(self) -> str:
        text = "".join(self._parts)
        if self.cut:
            text += "%s[... %d bytes cut]\n" % ("" if text.endswith("\n") or not text else "\n",
                                               self.cut)
        return text


class _ThreadRoutedStream(io.TextIOBase):
    """Stands in for sys.stdout / sys.stderr: writes from a thread that is
    capturing go to that thread's buffer, all others to the real stream."""

    def __init__(self, real) -> None:
        self._real = real
        self._local = threading.local()

    def capture(self, limit: int | None = None):
        """Route this thread's writes into a new buffer (bounded to `limit`
        bytes when given) until `release`."""
        buffer = self._local.buffer = io.StringIO() if limit is None else BoundedOutput(limit)
        # The bound method itself: one lookup per write (print writes twice a line).
        self._local.write = buffer.write
        return buffer

    def release(self) -> str:
        buffer = getattr(self._local, "buffer", None)
        self._local.buffer = self._local.write = None
        return buffer.getvalue() if buffer is not None else ""

    def write(self, text: str) -> int:
        write = getattr(self._local, "write", None)
        if write is not None:
            return write(text)
        return self._real.write(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if getattr(self._local, "buffer", None) is None:
            self._real.flush()

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str):
        return getattr(self._real, name)


_streams: tuple[_ThreadRoutedStream, _ThreadRoutedStream] | None = None


def install_output_capture() -> tuple[_ThreadRoutedStream, _ThreadRoutedStream]:
    """Route stdout/stderr per thread.

    Installed again over whatever replaced our streams since (user code, a
    logger, a test runner), or output would silently stop being captured.
    """
    global _streams
    out, err = _streams if _streams is not None else (None, None)
    if sys.stdout is not out:
        out = _ThreadRoutedStream(sys.stdout)
    if sys.stderr is not err:
        err = _ThreadRoutedStream(sys.stderr)
    _streams = (out, err)
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

    #: How many `execute` results `get_result` can still return.
    HISTORY_LENGTH = 100

    def __init__(
        self,
        engine_id: int = -1,
        properties: dict | None = None,
        names: dict | None = None,
        max_task_output: int = DEFAULT_MAX_TASK_OUTPUT,
    ) -> None:
        self.engine_id = engine_id
        #: Bytes of each of stdout and stderr one task keeps.
        self.max_task_output = max_task_output
        #: ``(stdout, stderr)`` of the last task run, until `take_output`.
        self._output: tuple[str, str] | None = None
        #: Names every fresh namespace holds besides `id` (``mpi`` on an MPI engine).
        self.preset_names: dict = dict(names or {})
        #: The engine's properties, as the controller last set them.
        self.properties: dict = dict(properties or {})
        self.user_ns: dict = {}
        self.execution_count = 0
        self.history: collections.OrderedDict[int, dict] = collections.OrderedDict()
        self._functions: dict[bytes, Callable] = {}
        self.reset()
        self._operations: dict[str, Callable] = {
            "task": self.run_task,
            "execute": self.execute,
            "push": self.push,
            "pull": self.pull,
            "reset": self._reset_op,
            "keys": self.keys,
            "get_result": self.get_result,
            "map": self.map,
        }

    def reset(self) -> None:
        """Start from an empty namespace that holds only `id` (and the
        preset names, such as ``mpi``)."""
        self.user_ns = {
            "__name__": "__main__",
            "__builtins__": builtins,
            **self.preset_names,
            "id": self.engine_id,
        }

    def set_engine_id(self, engine_id: int) -> None:
        self.engine_id = engine_id
        self.user_ns["id"] = engine_id

    def run(self, op: str, args: tuple) -> tuple[bool, object]:
        """Run one command; returns ``(ok, data)``.  Raises only `Interrupt`.

        A ``task``'s stdout and stderr are captured (per thread, bounded by
        `max_task_output`); `take_output` gives them, also after an
        `Interrupt`."""
        if op != "task":
            return self._run(op, args)
        stdout, stderr = install_output_capture()
        limit = self.max_task_output
        stdout.capture(limit)
        stderr.capture(limit)
        try:
            return self._run(op, args)
        finally:
            self._output = (stdout.release(), stderr.release())

    def take_output(self) -> tuple[str, str] | None:
        """``(stdout, stderr)`` of the task run last, once; None if none."""
        output, self._output = self._output, None
        return output

    def _run(self, op: str, args: tuple) -> tuple[bool, object]:
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
            # The exception itself travels too (cloudpickle: a class from
            # the user's __main__ by value), so the client can raise its class.
            return False, remote_wire(
                type(e).__name__,
                str(e),
                _user_traceback(e),
                self.engine_id,
                serialization.dumps_exception(e),
            )

    # -- operations (each returns bytes, or raises) ----------------------------------

    def execute(self, code: str) -> bytes:
        """Run a code string; returns the pickled result dict (number,
        input, stdout, stderr), also kept for `get_result`."""
        stdout, stderr = install_output_capture()
        stdout.capture()
        stderr.capture()
        self.execution_count += 1
        number = self.execution_count
        try:
            self._exec(code)
        finally:
            out, err = stdout.release(), stderr.release()
        result = {
            "id": self.engine_id,
            "number": number,
            "input": {"raw": code, "translated": code},
            "stdout": out,
            "stderr": err,
        }
        self.history[number] = result
        while len(self.history) > self.HISTORY_LENGTH:
            self.history.popitem(last=False)
        return serialization.pack(result)

    def get_result(self, number: int | None = None) -> bytes:
        """The result dict of execute number `number` (the last if None)."""
        if number is None:
            if not self.history:
                raise IndexError("engine %d has executed nothing yet" % self.engine_id)
            number = next(reversed(self.history))
        try:
            return serialization.pack(self.history[number])
        except KeyError:
            raise IndexError(
                "engine %d keeps results %s, not %r"
                % (self.engine_id, _span(self.history), number)
            ) from None

    def map(self, function_blob: bytes, chunk_blob: bytes) -> bytes:
        """``[function(*args) for args in chunk]``, pickled."""
        function = self._function(function_blob)
        chunk = serialization.loads(chunk_blob, "the mapped arguments")
        return serialization.dumps_value(
            [function(*args) for args in chunk], "the mapped results"
        )

    def _function(self, blob: bytes) -> Callable:
        """Unpickle a function (cached: a map sends the same one many times)
        and let it see the engine's names that it does not define itself."""
        function = self._functions.get(blob)
        if function is None:
            function = serialization.loads(blob, "the function")
            if len(self._functions) >= 32:
                self._functions.clear()
            self._functions[blob] = function
        return self._bind(function)

    def _bind(self, function: Callable) -> Callable:
        # Like the original push_function: names set up on the engine (an
        # import done with execute, say) are visible to the function.
        if not isinstance(function, types.FunctionType):
            return function
        own = function.__globals__
        missing = [
            name
            for name in function.__code__.co_names
            if name not in own and name in self.user_ns
        ]
        if not missing:
            return function
        merged = dict(own)
        merged.update((name, self.user_ns[name]) for name in missing)
        bound = types.FunctionType(
            function.__code__,
            merged,
            function.__name__,
            function.__defaults__,
            function.__closure__,
        )
        bound.__kwdefaults__ = function.__kwdefaults__
        return bound

    def set_properties(self, properties: dict) -> None:
        """Replace the engine's properties (the controller's copy is the one
        that counts; this one is sent again when the engine re-registers)."""
        self.properties = properties

    def _exec(self, code: str) -> None:
        compiled = compile(code, "<engine %d>" % self.engine_id, "exec")
        exec(compiled, self.user_ns)

    def push(self, blob) -> bytes:
        """Put pickled ``{name: value}`` (a blob or frames) into the namespace."""
        values = serialization.loads(blob, "the pushed values")
        self.user_ns.update(values)
        return b""

    def pull(self, names: tuple[str, ...]):
        """The pickled tuple of the values of `names` (each a blob or its
        frames; big buffers stay out of band)."""
        return serialization.pack_frames(tuple(self._pull_one(name) for name in names))

    def _pull_one(self, name: str):
        return serialization.dumps_value(self._lookup(name), "%r" % name)

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
        payload,
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
                function = self._function(function_blob)
                args, kwargs = serialization.loads(args_blob, "the task's arguments")
                result = function(*args, **kwargs)
                return serialization.dumps_value(result, "the return value")
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
    def _dump_pulled(values: dict):
        try:
            return serialization.dumps_value(values, "the pulled values")
        except SerializationError:
            # Pickle them one by one to name the culprit in the error.
            for name, value in values.items():
                serialization.dumps(value, "pulled name %r" % name)
            raise


def _span(history: dict) -> str:
    if not history:
        return "none"
    numbers = list(history)
    return "%d..%d" % (numbers[0], numbers[-1])
