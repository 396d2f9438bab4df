"""docs/multiengine-guide.md, run in page order as a reader would run it.

Every ```` ```python ```` block of the guide runs, in the order of the page,
in one Python process (one namespace: a block may go on with the names
of the one before), against a cluster of two engines started with
``taskfarm cluster -n 2 --daemon``; the ``>>>`` session of section 1 runs
as typed at the prompt.  What each block printed must be what the output
block after it shows, once the values that differ between machines
(pids, host names, task ids...) are masked (`normalize`).

HTML comments before a block say how a reader runs it:

- ``<!-- guide-test: skip -->``: not run (a signature; an example that
  needs a cluster without engines, shown by tests/test_multiengine.py);
- ``<!-- guide-test: file NAME -->``: the block is the file NAME, written
  into the folder the examples run in;
- ``<!-- guide-test: alone -->``: run as a program of its own (it runs
  Twisted's reactor itself);
- ``<!-- guide-test: restart -->`` after a block: the cluster stopped
  (``kill(controller=True)``) and is started again, as the guide says.

``python tests/test_multiengine_guide.py --update`` runs the guide the same
way and writes what each block printed into its output block.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from twisted.trial import unittest

from taskfarm.cluster.manage import read_state
from taskfarm.profile import Profile
from taskfarm.testing.helpers import proc_stat
from taskfarm.testing.processes import TASKFARM, kill_if_alive

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "multiengine-guide.md"
#: The profile folder the guide's text names.
DOC_PROFILE = "/tmp/docs2-prof"
SEPARATOR = "=== guide block %d ==="
STATEMENT = "=== guide statement ==="
MARKER = re.compile(r"^<!-- guide-test: (skip|alone|restart|file (\S+)) -->$")


class Block(NamedTuple):
    """One runnable block: `kind` is python, session, alone or file; `output`
    the (start, end) lines of its output block in the guide, or None."""

    kind: str
    code: str
    line: int
    output: tuple[int, int] | None
    restart_after: bool = False
    filename: str | None = None


def guide_blocks(lines: list[str]) -> list[Block]:
    blocks: list[Block] = []
    marker = None
    i = 0
    while i < len(lines):
        line = lines[i]
        found = MARKER.match(line)
        if found:
            if found.group(1) == "restart":
                blocks[-1] = blocks[-1]._replace(restart_after=True)
            else:
                marker = found
            i += 1
            continue
        if not line.startswith("```"):
            i += 1
            continue
        end = lines.index("```", i + 1)
        body = lines[i + 1 : end]
        kind = None
        if line == "```python":
            kind = "python"
        elif line == "```" and body and body[0].startswith(">>> "):
            kind = "session"
        if kind is not None and marker is not None:
            what = marker.group(1)
            kind = None if what == "skip" else ("file" if what.startswith("file") else what)
        if kind is None:
            marker = None
            i = end + 1
            continue
        output = None
        after = end + 1
        while after < len(lines) and not lines[after].strip():
            after += 1
        if kind in ("python", "alone") and after < len(lines) and lines[after] == "```":
            out_end = lines.index("```", after + 1)
            output = (after + 1, out_end)
        elif kind == "session":
            output = (i + 1, end)
        blocks.append(
            Block(kind, "\n".join(body) + "\n", i + 1, output,
                  filename=marker.group(2) if marker is not None and kind == "file" else None)
        )
        marker = None
        i = end + 1
    return blocks


def session_statements(code: str) -> list[str]:
    """The statements of a ``>>>`` transcript, each as typed."""
    statements: list[str] = []
    for line in code.splitlines():
        if line.startswith(">>> "):
            statements.append(line[4:])
        elif line.startswith("... "):
            statements[-1] += "\n" + line[4:]
    return statements


def session_output(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines if not line.startswith((">>> ", "... ")))


#: Values that differ from one machine or run to the next.
VOLATILE = [
    (re.compile(r"'hostname': '[^']*'"), "'hostname': *"),
    (re.compile(r"'python': '[^']*'"), "'python': *"),
    (re.compile(r"'(pid|ncpus|ram)': \d+"), r"'\1': *"),
    (re.compile(r"ID:\d+"), "ID:*"),
    (re.compile(r" at 0x[0-9a-f]+"), " at 0x*"),
]


def normalize(text: str) -> str:
    for pattern, replacement in VOLATILE:
        text = pattern.sub(replacement, text)
    return text.rstrip("\n")


DRIVER = r"""
import json, os, subprocess, sys, time, traceback
steps = json.load(open(sys.argv[1]))
taskfarm = json.loads(sys.argv[2])
profile = sys.argv[3]
namespace = {"__name__": "__main__"}
for index, step in enumerate(steps):
    print(%r %% index, flush=True)
    began = time.monotonic()
    try:
        if step["kind"] == "python":
            exec(compile(step["code"], "<guide line %%d>" %% step["line"], "exec"), namespace)
        elif step["kind"] == "session":
            for statement in step["statements"]:
                print(%r, flush=True)
                exec(compile(statement, "<stdin>", "single"), namespace)
        elif step["kind"] == "file":
            with open(step["filename"], "w") as f:
                f.write(step["code"])
        elif step["kind"] == "alone":
            done = subprocess.run([sys.executable, "-c", step["code"]], capture_output=True,
                                  text=True, timeout=60)
            sys.stdout.write(done.stdout)
            if done.returncode:
                raise RuntimeError("exited %%d: %%s" %% (done.returncode, done.stderr))
        sys.stdout.flush()
        if step["restart_after"]:
            subprocess.run(taskfarm + ["stop", "--profile-dir", profile], timeout=60,
                           capture_output=True)
            started = subprocess.run(taskfarm + ["cluster", "-n", "2", "--daemon",
                                     "--profile-dir", profile], timeout=120,
                                     capture_output=True, text=True)
            if started.returncode:
                raise RuntimeError("the cluster did not start again: " + started.stdout + started.stderr)
        print("block at line %%d took %%.1f s" %% (step["line"], time.monotonic() - began),
              file=sys.stderr)
    except BaseException:
        traceback.print_exc(file=sys.stdout)
        print("GUIDE BLOCK FAILED", flush=True)
        os._exit(1)
os._exit(0)
""" % (SEPARATOR, STATEMENT)


class GuideRun:
    """A cluster on a temporary profile, the guide's blocks run against it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="taskfarm-guide-"))
        self.profile = Profile(self.root / "profile")
        self.work = self.root / "work"
        self.work.mkdir()
        self.pids: dict[int, str] = {}

    def env(self) -> dict:
        import os

        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), PYTHONUNBUFFERED="1",
                   TASKFARM_PROFILE=str(self.profile.root))
        return env

    def start(self) -> None:
        started = subprocess.run(
            TASKFARM + ["cluster", "-n", "2", "--daemon", "--profile-dir", str(self.profile.root)],
            env=self.env(), capture_output=True, text=True, timeout=120,
        )
        self.remember_pids()
        if started.returncode != 0:
            raise AssertionError("the cluster did not start:\n%s%s" % (started.stdout, started.stderr))

    def remember_pids(self) -> None:
        state = read_state(self.profile) or {}
        if not state:
            return
        pids = [state["launcher"]["pid"], state["controller"]["pid"]]
        pids += [entry["pid"] for entry in state.get("engines", []) if entry.get("pid")]
        for pid in pids:
            fields = proc_stat(pid)
            if fields is not None:
                self.pids[pid] = fields[19]

    def run(self, blocks: list[Block]) -> tuple[int, list[str]]:
        """The driver's exit status and what each block printed."""
        steps = []
        for block in blocks:
            code = block.code.replace(DOC_PROFILE, str(self.profile.root))
            step = {"kind": block.kind, "code": code, "line": block.line,
                    "filename": block.filename, "restart_after": block.restart_after}
            if block.kind == "session":
                step["statements"] = session_statements(code)
            steps.append(step)
        plan = self.root / "steps.json"
        plan.write_text(json.dumps(steps))
        try:
            done = subprocess.run(
                [sys.executable, "-c", DRIVER, str(plan), json.dumps(TASKFARM), str(self.profile.root)],
                env=self.env(), cwd=str(self.work), capture_output=True, text=True, timeout=300,
            )
        finally:
            self.remember_pids()
        parts = re.split(r"^=== guide block \d+ ===\n", done.stdout, flags=re.MULTILINE)[1:]
        self.stderr = done.stderr
        return done.returncode, [part.replace(str(self.profile.root), DOC_PROFILE) for part in parts]

    def stop(self) -> None:
        try:
            self.remember_pids()
            subprocess.run(TASKFARM + ["stop", "--profile-dir", str(self.profile.root)],
                           env=self.env(), capture_output=True, timeout=60)
        finally:
            for pid, started in self.pids.items():
                kill_if_alive(pid, started)
            shutil.rmtree(self.root, True)


def expected_output(lines: list[str], block: Block) -> str | None:
    if block.output is None:
        return None
    start, end = block.output
    if block.kind == "session":
        return session_output(lines[start:end])
    return "".join(line + "\n" for line in lines[start:end])


class MultiEngineGuideTests(unittest.TestCase):
    timeout = 300

    def test_the_guide_in_page_order(self):
        """Every block runs in page order without an error, and prints
        what its output block shows."""
        lines = GUIDE.read_text().splitlines()
        blocks = guide_blocks(lines)
        self.assertGreater(len(blocks), 15)
        guide = GuideRun()
        self.addCleanup(guide.stop)
        guide.start()
        status, printed = guide.run(blocks)
        self.assertEqual(
            status, 0, "the guide's blocks failed:\n%s\n%s" % ("".join(printed)[-6000:], guide.stderr[-3000:])
        )
        self.assertEqual(len(printed), len(blocks))
        wrong = []
        for block, out in zip(blocks, printed, strict=True):
            expected = expected_output(lines, block)
            out = out.replace(STATEMENT + "\n", "")
            if expected is not None and normalize(out) != normalize(expected):
                wrong.append(
                    "block at line %d printed:\n%s\n--- the guide shows:\n%s"
                    % (block.line, out.rstrip(), expected.rstrip())
                )
        self.assertEqual(wrong, [], "\n\n".join(wrong))

    def test_the_reader_of_the_markers(self):
        """The markers are read as documented (no cluster: the parser alone)."""
        text = [
            "```python", "a = 1", "```", "", "```", "out", "```",
            "<!-- guide-test: skip -->", "```python", "nope", "```",
            "<!-- guide-test: file f.py -->", "```python", "x = 1", "```",
            "<!-- guide-test: alone -->", "```python", "b", "```",
            "<!-- guide-test: restart -->",
            "```", ">>> 1 + 1", "2", "```",
        ]
        blocks = guide_blocks(text)
        self.assertEqual([b.kind for b in blocks], ["python", "file", "alone", "session"])
        self.assertEqual(blocks[0].output, (5, 6))
        self.assertEqual(blocks[1].filename, "f.py")
        self.assertTrue(blocks[2].restart_after)
        self.assertEqual(session_statements(blocks[3].code), ["1 + 1"])
        self.assertEqual(expected_output(text, blocks[3]), "2\n")


def update() -> int:
    """Write what each block prints into the guide's output blocks."""
    lines = GUIDE.read_text().splitlines()
    blocks = guide_blocks(lines)
    guide = GuideRun()
    try:
        guide.start()
        status, printed = guide.run(blocks)
    finally:
        guide.stop()
    if status != 0:
        print("".join(printed)[-6000:], guide.stderr[-3000:], file=sys.stderr)
        return 1
    # From the end, so that earlier line numbers stay right.
    for block, out in reversed(list(zip(blocks, printed, strict=True))):
        if block.output is None:
            continue
        start, end = block.output
        if block.kind == "session":
            # The transcript again: each statement as typed, then what it printed.
            parts = out.split(STATEMENT + "\n")[1:]
            new = []
            for statement, part in zip(session_statements(block.code), parts, strict=True):
                first, *rest = statement.split("\n")
                new += [">>> " + first] + ["... " + line for line in rest]
                new += part.rstrip("\n").split("\n") if part.strip() else []
            lines[start:end] = new
        else:
            lines[start:end] = out.rstrip("\n").split("\n")
    GUIDE.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        sys.exit(update())
    print("usage: python tests/test_multiengine_guide.py --update", file=sys.stderr)
    sys.exit(2)
