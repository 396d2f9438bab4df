"""IPython magics for the MultiEngine interface: ``%px``, ``%autopx``, ``%result``.

In IPython or a Jupyter kernel::

    %load_ext taskfarm.magics
    from taskfarm import client
    mec = client.MultiEngineClient()
    mec.activate()
    %px a = 2 + 3

Every magic speaks to the client last `activate`d
(`taskfarm.client.MultiEngineClient.activate`), on that client's
`targets`, with its `block`.

This module imports IPython; nothing else in taskfarm does, so IPython is
needed only by those who load the extension.

The magics run in the shell's main thread and use the blocking client,
whose calls hop onto its reactor thread (`taskfarm.reactorthread`) and wait
there; the reactor never waits for the main thread, so nothing deadlocks.
"""

from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class, no_var_expand

from taskfarm import client
from taskfarm.errors import CompositeError
from taskfarm.results import ResultList

NO_ACTIVE_CLIENT = (
    "no MultiEngine client is active: make one and call its activate(), e.g.\n"
    "    from taskfarm import client\n"
    "    mec = client.MultiEngineClient()\n"
    "    mec.activate()"
)


def _active() -> client.MultiEngineClient:
    mec = client.active_client()
    if mec is None:
        raise UsageError(NO_ACTIVE_CLIENT)
    return mec


def _engine_report(error: CompositeError) -> list[str]:
    """The lines IPython shows for a failed command: each engine's error
    and its remote traceback, instead of the local frames of the client."""
    lines = [error.message]
    for engine_id, method, engine_error in error.elist:
        lines.append("[%s:%s]: %s: %s" % (
            engine_id, method, getattr(engine_error, "ename", type(engine_error).__name__),
            getattr(engine_error, "evalue", engine_error),
        ))
        remote = (getattr(engine_error, "traceback", "") or "").rstrip("\n")
        if remote:
            lines.extend("    " + line for line in remote.splitlines())
    return lines


@magics_class
class ParallelMagics(Magics):
    """``%px``, ``%autopx`` and ``%result`` on the active MultiEngine client."""

    def __init__(self, shell) -> None:
        super().__init__(shell)
        #: Whether every cell goes to the engines (`%autopx`).
        self.autopx = False

    @line_magic
    @no_var_expand
    def px(self, line: str):
        """Run CODE on the active client's targets: ``%px a = 2 + 3``.

        Returns the `execute` result (each engine's input and output).  When
        engines fail, the cell fails with their `CompositeError`, shown as
        one line per engine and that engine's remote traceback.  CODE is
        sent as typed: ``$name`` and ``{expr}`` are not expanded here.
        """
        mec = _active()
        if not line.strip():
            raise UsageError("%px needs code to run on the engines, e.g. %px a = 1")
        print("Parallel execution on engines: %s" % (mec.targets,))
        try:
            return mec.execute(line)
        except CompositeError as e:
            report = _engine_report(e)
            # IPython shows what `_render_traceback_` returns in place of the
            # local traceback, whose frames are only the client's plumbing.
            e._render_traceback_ = lambda: report
            raise

    @line_magic
    def autopx(self, line: str) -> None:
        """Toggle auto-parallel mode: while on, every cell runs on the
        active client's targets as ``%px CELL`` would, except a cell that
        starts with ``%`` (so that ``%autopx`` turns it off again)."""
        if line.strip():
            raise UsageError("%autopx takes no arguments; it toggles auto-parallel mode")
        if self.autopx:
            self._stop_autopx()
            print("Auto Parallel Disabled")
            return
        mec = _active()
        self.shell.input_transformers_cleanup.append(self._send_cell)
        self.autopx = True
        print("Auto Parallel Enabled (engines: %s)" % (mec.targets,))
        print("Type %autopx to disable")

    @line_magic
    def result(self, line: str):
        """The last `execute` result of each target (``%result N``: number N)."""
        mec = _active()
        text = line.strip()
        if text:
            try:
                number = int(text)
            except ValueError:
                raise UsageError("%%result takes an execute number, not %r" % text) from None
        else:
            number = None
        answer = mec.get_result(number)
        return ResultList(answer) if isinstance(answer, list) else answer

    def _send_cell(self, lines: list[str]) -> list[str]:
        """The input transformer of `%autopx`: a cell becomes ``%px`` of it."""
        code = "".join(lines)
        first = code.lstrip()
        if not first or first.startswith("%"):
            return lines
        return ["get_ipython().run_line_magic('px', %r)\n" % code]

    def _stop_autopx(self) -> None:
        transformers = self.shell.input_transformers_cleanup
        while self._send_cell in transformers:
            transformers.remove(self._send_cell)
        self.autopx = False


_loaded: list[ParallelMagics] = []


def load_ipython_extension(ipython) -> None:
    """``%load_ext taskfarm.magics``."""
    magics = ParallelMagics(ipython)
    ipython.register_magics(magics)
    _loaded.append(magics)


def unload_ipython_extension(ipython) -> None:
    """``%unload_ext taskfarm.magics``: `%autopx` stops; the magics stay
    defined but still need an active client."""
    for magics in [m for m in _loaded if m.shell is ipython]:
        magics._stop_autopx()
        _loaded.remove(magics)
