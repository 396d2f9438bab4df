"""The IPython magics (`taskfarm.magics`) in a real IPython kernel.

A `RealCluster` of two engines runs in the test's reactor.  The kernel is a
real ipykernel process started by `jupyter_client`'s `KernelManager`; it
makes its own blocking `MultiEngineClient` (with its own reactor thread) and
runs the magics in its main thread.  The test drives the kernel from one
worker thread (`deferToThread`), so the reactor stays free to serve the
controller.  Every wait on the kernel is bounded, and the kernel is shut
down by its manager whatever happened.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.internet import threads
from twisted.trial import unittest

from taskfarm.profile import MULTIENGINE
from taskfarm.testing.cluster import ClusterTestCase
from taskfarm.testing.helpers import async_test, temp_dir

#: Seconds one cell may take, and the kernel's start.
CELL_TIMEOUT = 20.0
START_TIMEOUT = 30.0


class Cell:
    """What one executed cell produced: its reply status, its stream text
    (stdout, stderr), its displayed result and its error message, if any."""

    def __init__(self, code: str) -> None:
        self.code = code
        self.status = None
        self.stdout = ""
        self.stderr = ""
        self.result = ""
        self.error: dict | None = None

    @property
    def traceback(self) -> str:
        return "\n".join(self.error["traceback"]) if self.error else ""

    def __repr__(self) -> str:
        return "<cell %r: %s stdout=%r stderr=%r result=%r error=%r>" % (
            self.code, self.status, self.stdout, self.stderr, self.result, self.error,
        )


def run_kernel_session(cells: list[str], folder: Path) -> list[Cell]:
    """Start a kernel, run `cells` in it one by one, shut it down; returns
    each cell's `Cell`.  Blocking: call it from a thread."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    # Our own kernel spec: this Python, whatever kernels the machine has.
    spec_dir = folder / "kernels" / "taskfarm-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "taskfarm test", "language": "python",
    }))
    specs = KernelSpecManager(kernel_dirs=[str(folder / "kernels")], ensure_native_kernel=False)
    # Unix sockets in the test's folder, not TCP ports.
    manager = KernelManager(
        kernel_name="taskfarm-test", kernel_spec_manager=specs,
        transport="ipc", ip=str(folder / "kernel-ipc"),
    )
    manager.connection_file = str(folder / "connection.json")
    env = dict(
        os.environ,
        # The kernel finds this checkout's taskfarm first, as the engines do.
        PYTHONPATH=os.pathsep.join(sys.path),
        IPYTHONDIR=str(folder / "ipython"),
        JUPYTER_RUNTIME_DIR=str(folder / "runtime"),
        PYTHONUNBUFFERED="1",
    )
    manager.start_kernel(env=env)
    kernel = manager.client()
    try:
        kernel.start_channels()
        kernel.wait_for_ready(timeout=START_TIMEOUT)
        return [_run_cell(kernel, code) for code in cells]
    finally:
        kernel.stop_channels()
        manager.shutdown_kernel(now=False)


def _run_cell(kernel, code: str) -> Cell:
    cell = Cell(code)
    msg_id = kernel.execute(code)
    while True:
        try:
            msg = kernel.get_iopub_msg(timeout=CELL_TIMEOUT)
        except queue.Empty:
            raise AssertionError("no output from the kernel within %g s for %r" % (CELL_TIMEOUT, code)) from None
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            setattr(cell, content["name"], getattr(cell, content["name"]) + content["text"])
        elif kind == "execute_result":
            cell.result += content["data"].get("text/plain", "")
        elif kind == "error":
            cell.error = content
        elif kind == "status" and content["execution_state"] == "idle":
            break
    while True:
        try:
            reply = kernel.get_shell_msg(timeout=CELL_TIMEOUT)
        except queue.Empty:
            raise AssertionError("no reply from the kernel within %g s for %r" % (CELL_TIMEOUT, code)) from None
        if reply["parent_header"].get("msg_id") == msg_id:
            cell.status = reply["content"]["status"]
            return cell


class MagicsKernelTests(ClusterTestCase):
    """``%load_ext taskfarm.magics`` in a real kernel against real engines."""

    timeout = 90

    @async_test
    async def test_px_autopx_result(self):
        """Before `activate()`, `%px` says to call it.  Then `%px` runs code
        on every engine and shows each engine's output; engine errors fail
        the cell with each engine's error and remote traceback (not the
        client's frames); `%autopx` sends plain cells to the engines until
        toggled off, printing its state; `%result` and `%result N` show
        results from the history; the client's `targets` and `block` apply;
        an empty `%px` and `%result x` are usage errors."""
        await self.start_cluster(2)
        furl_file = str(self.cluster.profile.furl_file(MULTIENGINE))
        cells = [
            "%load_ext taskfarm.magics",
            "%px a = 1",
            "from taskfarm import client\n"
            "mec = client.MultiEngineClient(%r)\n"
            "mec.activate()" % furl_file,
            "%px a = 2 + 3",
            "%px print(a)",
            "%px 1/0",
            "%autopx",
            "b = a * 10\nprint('b is', b)",
            "%autopx",
            "'here'",
            "%result",
            "mec.pull('b')",
            "%result 1",
            "mec.targets = [1]",
            "%px print(id)",
            "%px",
            "mec.block = False",
            "pr = %px print('later')",
            "pr.r",
            "%result x",
        ]
        folder = temp_dir(self)
        (load, inactive, activate, px_set, px_print, px_fail, on, remote, off, local, result,
         pulled, result_1, _, px_one, px_empty, _, pending, pending_r, result_bad) = await threads.deferToThread(
            run_kernel_session, cells, folder
        )
        for cell in (load, activate, px_set, px_print, on, remote, off, local, result, pulled,
                     result_1, px_one, pending, pending_r):
            self.assertEqual(cell.status, "ok", cell)
        self.assertEqual(inactive.status, "error", inactive)
        self.assertIn("call its activate()", inactive.stderr)
        self.assertIn("Parallel execution on engines: all", px_set.stdout)
        self.assertIn("[0] In [1]: a = 2 + 3", px_set.result)
        self.assertIn("[1] In [1]: a = 2 + 3", px_set.result)
        # Each engine's output, marked with its id.
        self.assertIn("[0] Out[2]: 5", px_print.result)
        self.assertIn("[1] Out[2]: 5", px_print.result)

        self.assertEqual(px_fail.status, "error", px_fail)
        self.assertEqual(px_fail.error["ename"], "CompositeError")
        for engine_id in (0, 1):
            self.assertIn("[%d:execute]: ZeroDivisionError: division by zero" % engine_id, px_fail.traceback)
            # The remote traceback, under that engine's line.
            self.assertIn('File "<engine %d>", line 1' % engine_id, px_fail.traceback)
        # Not the local frames of the client's plumbing.
        self.assertNotIn("reactorthread", px_fail.traceback)

        self.assertIn("Auto Parallel Enabled", on.stdout)
        self.assertIn("Type %autopx to disable", on.stdout)
        self.assertIn("[0] Out[4]: b is 50", remote.result)
        self.assertIn("[1] Out[4]: b is 50", remote.result)
        self.assertIn("Auto Parallel Disabled", off.stdout)
        # Off again: cells run here.
        self.assertEqual(local.result, "'here'")
        self.assertEqual(pulled.result, "[50, 50]")
        # The engines' last command was the autopx cell.
        self.assertIn("[0] In [4]: b = a * 10", result.result)
        self.assertIn("[1] Out[4]: b is 50", result.result)
        self.assertIn("[0] In [1]: a = 2 + 3", result_1.result)
        self.assertNotIn("In [4]", result_1.result)
        # The client's targets are the magics' targets.
        self.assertIn("Parallel execution on engines: [1]", px_one.stdout)
        self.assertIn("[1] Out[5]: 1", px_one.result)
        self.assertNotIn("[0]", px_one.result)
        self.assertEqual(px_empty.status, "error", px_empty)
        self.assertIn("UsageError: %px needs code", px_empty.stderr)
        # And the client's block: a PendingResult, whose answer comes later.
        self.assertEqual(pending.result, "")
        self.assertIn("[1] Out[6]: later", pending_r.result)
        self.assertEqual(result_bad.status, "error", result_bad)
        self.assertIn("UsageError: %result takes an execute number, not 'x'", result_bad.stderr)


class NoActiveClientTests(unittest.TestCase):
    """The magics without an activated client."""

    timeout = 60

    @async_test
    async def test_message_names_activate(self):
        """`%px`, `%autopx` and `%result` before any `activate()` fail with a
        usage message that says to call `activate()`; nothing is toggled."""
        cells = ["%load_ext taskfarm.magics", "%px a = 1", "%autopx", "%result", "1 + 1"]
        load, px, autopx, result, plain = await threads.deferToThread(
            run_kernel_session, cells, temp_dir(self)
        )
        self.assertEqual(load.status, "ok", load)
        for cell in (px, autopx, result):
            self.assertEqual(cell.status, "error", cell)
            self.assertIn("UsageError: no MultiEngine client is active", cell.stderr)
            self.assertIn("mec.activate()", cell.stderr)
        self.assertEqual(plain.result, "2")  # %autopx did not turn on


class ImportTests(unittest.TestCase):
    """IPython stays optional."""

    def test_taskfarm_does_not_import_ipython(self):
        """Importing taskfarm and its client modules imports no IPython;
        `taskfarm.magics` does."""
        code = (
            "import sys, taskfarm, taskfarm.client, taskfarm.asyncclient\n"
            "print('IPython' in sys.modules)\n"
            "import taskfarm.magics\n"
            "print('IPython' in sys.modules)\n"
        )
        with tempfile.TemporaryDirectory() as folder:
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), cwd=folder,
            )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.split(), ["False", "True"])
