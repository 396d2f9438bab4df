"""The programs of docs/examples, each run as a user runs it.

One cluster (``taskfarm cluster -n 3 --daemon`` in a temporary profile) is
started for the whole class and stopped at its end; each test runs one
example as a child process, ``python docs/examples/X.py --small
--profile-dir P``, and checks its exit status and what it printed against
an answer the test knows or computes itself.
"""

from __future__ import annotations

import collections
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial import unittest

from taskfarm.cluster.manage import read_state
from taskfarm.profile import Profile
from taskfarm.testing.helpers import proc_stat
from taskfarm.testing.processes import TASKFARM, kill_if_alive

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "docs" / "examples"
#: Seconds one example may take before it is killed and its test fails.
EXAMPLE_TIMEOUT = 60


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), PYTHONUNBUFFERED="1")


def _load(name: str) -> dict:
    """The names an example defines, without running its main()."""
    namespace = {"__name__": "example_" + name}
    source = (EXAMPLES / (name + ".py")).read_text()
    exec(compile(source, str(EXAMPLES / (name + ".py")), "exec"), namespace)
    return namespace


class ExamplesTests(unittest.TestCase):
    timeout = 120

    @classmethod
    def setUpClass(cls):
        cls.root = Path(tempfile.mkdtemp(prefix="taskfarm-examples-"))
        cls.profile = Profile(cls.root / "profile")
        cls.pids: dict[int, str] = {}
        try:
            started = subprocess.run(
                TASKFARM
                + ["cluster", "-n", "3", "--daemon", "--profile-dir", str(cls.profile.root)],
                env=_env(),
                capture_output=True,
                text=True,
                timeout=90,
            )
            cls._remember_pids()
            if started.returncode != 0:
                raise AssertionError(
                    "the cluster did not start:\n%s%s" % (started.stdout, started.stderr)
                )
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _remember_pids(cls) -> None:
        state = read_state(cls.profile) or {}
        pids = []
        if state:
            pids = [state["launcher"]["pid"], state["controller"]["pid"]]
            pids += [entry["pid"] for entry in state.get("engines", []) if entry.get("pid")]
        for pid in pids:
            fields = proc_stat(pid)
            if fields is not None:
                cls.pids[pid] = fields[19]

    @classmethod
    def tearDownClass(cls):
        try:
            subprocess.run(
                TASKFARM + ["stop", "--profile-dir", str(cls.profile.root)],
                env=_env(),
                capture_output=True,
                timeout=30,
            )
        finally:
            # Whatever `taskfarm stop` did, no process of ours outlives the class.
            for pid, started in cls.pids.items():
                kill_if_alive(pid, started)
            shutil.rmtree(cls.root, True)

    def run_example(self, name: str, *args: str) -> str:
        """Run docs/examples/NAME.py --small against the cluster; its output."""
        argv = [
            sys.executable,
            str(EXAMPLES / (name + ".py")),
            "--small",
            "--profile-dir",
            str(self.profile.root),
            *args,
        ]
        done = subprocess.run(
            argv,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=EXAMPLE_TIMEOUT,
            cwd=str(self.root),
        )
        self.assertEqual(
            done.returncode,
            0,
            "%s exited %d:\n%s\n%s" % (name, done.returncode, done.stdout, done.stderr[-4000:]),
        )
        return done.stdout

    def find(self, pattern: str, output: str) -> re.Match:
        match = re.search(pattern, output, re.MULTILINE)
        self.assertIsNotNone(match, "no line matches %r in:\n%s" % (pattern, output))
        return match

    def test_option_pricing(self):
        """Every option of the 3 x 3 grid is priced; the Monte Carlo calls are
        within 5 standard errors of Black-Scholes, and the at-the-money call
        is the textbook 10.4506."""
        out = self.run_example("option_pricing")
        rows = re.findall(
            r"^\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$",
            out,
            re.MULTILINE,
        )
        self.assertEqual(len(rows), 9, out)
        worst = float(
            self.find(r"^priced 9 options; worst call error ([\d.]+) standard errors$", out)[1]
        )
        self.assertLess(worst, 5.0)
        at_the_money = [r for r in rows if (r[0], r[1]) == ("100.0", "0.20")][0]
        self.assertEqual(at_the_money[4], "10.4506")
        self.assertLess(abs(float(at_the_money[2]) - 10.4506), 0.3)

    def test_word_frequency(self):
        """The counts reduced from the engines equal a count of the same file
        made here: the total and the ten most common words."""
        text = self.root / "words.txt"
        out = self.run_example("word_frequency", "--text", str(text))
        words = collections.Counter(text.read_text().split())
        total = self.find(r"2000 lines over 3 engines, (\d+) words, (\d+) distinct$", out)
        self.assertEqual((int(total[1]), int(total[2])), (sum(words.values()), len(words)))
        top = re.findall(r"^\s+(\w+)\s+(\d+)$", out, re.MULTILINE)
        self.assertEqual({w: int(c) for w, c in top}, {w: words[w] for w, _ in top})
        self.assertEqual([int(c) for _, c in top], [c for _, c in words.most_common(10)])
        self.find(r"^equal to a serial count: True$", out)

    def test_pi(self):
        """800,000 samples in 8 tasks give pi within 0.1 (here within 0.01)."""
        out = self.run_example("pi")
        self.find(r"^800000 points in 8 tasks", out)
        estimate = float(self.find(r"^pi is about ([\d.]+)", out)[1])
        self.assertLess(abs(estimate - math.pi), 0.01)

    def test_eigenvalues(self):
        """8 matrices of 60 x 60 give 480 eigenvalues, close to the semicircle's
        [-2, 2], whose histogram shares add up to 1."""
        out = self.run_example("eigenvalues")
        self.find(r"^480 eigenvalues of 8 random 60 x 60 matrices$", out)
        low, high = map(float, self.find(r"^scaled range \[([-\d.]+), ([-\d.]+)\]", out).groups())
        self.assertTrue(-2.5 < low < -1.5 and 1.5 < high < 2.5, (low, high))
        shares = [
            float(s)
            for s in re.findall(r"^\s*[-\d.]+ \.\.\s+[-\d.]+\s+([\d.]+)", out, re.MULTILINE)
        ]
        self.assertEqual(len(shares), 8)
        self.assertLess(abs(sum(shares) - 1.0), 0.01)

    def test_retry_until_ready(self):
        """All 10 tasks that raise until the engines are ready succeed through
        their retries, with more attempts than tasks; the depend task waits
        (still scheduled) and runs on the one engine given the property."""
        out = self.run_example("retry_until_ready")
        done = self.find(
            r"^retries: (\d+) of 10 tasks succeeded, (\d+) attempts in all, values (.*)$", out
        )
        self.assertEqual(int(done[1]), 10)
        self.assertGreater(int(done[2]), 10)
        self.assertEqual(done[3], str([10 * x for x in range(10)]))
        self.find(r"^depend: after 0.5 s the task is still scheduled$", out)
        self.find(
            r"^depend: the task ran on engine \d \(the one calibrated: True\) after [\d.]+ s, value 20$",
            out,
        )

    def test_task_profile(self):
        """The queue samples end with all 12 tasks succeeded; every task has a
        timing row whose run time on the engine is at least its sleep."""
        out = self.run_example("task_profile")
        samples = re.findall(
            r"^\s*[\d.]+s\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", out, re.MULTILINE
        )
        self.assertGreaterEqual(len(samples), 2)
        self.assertTrue(all(sum(map(int, s)) == 12 for s in samples), samples)
        self.assertEqual(samples[-1], ("0", "0", "12", "0", "0"))
        rows = re.findall(r"^\s*\d+\s+(\d)\s+([\d.]+)s\s+([\d.]+)s\s+([\d.]+)s$", out, re.MULTILINE)
        self.assertEqual(len(rows), 12)
        for _engine, asked, _waited, ran in rows:
            self.assertGreaterEqual(float(ran), float(asked) - 0.01)
        self.find(r"^12 tasks, [\d.]+ s of work in [\d.]+ s on \d engines$", out)

    def test_scatter_gather(self):
        """10,000 numbers scatter in 3 blocks, the gathered result equals the
        local one, and the engines' partial sums give the mean 0.5."""
        out = self.run_example("scatter_gather")
        self.find(r"^engines \[0, 1, 2\] hold blocks of \[3334, 3333, 3333\] numbers$", out)
        self.find(r"^gathered 10000 values; equal to a local computation: True$", out)
        mean = float(self.find(r"^mean of sin\(pi x\)\^2 over \[0, 1\]: ([\d.]+)", out)[1])
        self.assertLess(abs(mean - 0.5), 0.001)

    def test_twisted_client(self):
        """The Deferred clients under `react`: 8 callbacks fire, the MultiEngine
        call on the same reactor answers with 3 pids, and the longest chain
        equals one computed here."""
        out = self.run_example("twisted_client")
        self.assertEqual(len(re.findall(r"^task +\d of 8 done", out, re.MULTILINE)), 8, out)
        self.find(r"^engines' process ids: \[\d+, \d+, \d+\]$", out)
        length, start = _load("twisted_client")["longest_chain"](1, 20_000)
        self.find(
            r"^longest Collatz chain below 20000 starts at %d: %d numbers$" % (start, length), out
        )

    def test_every_example_is_listed_and_tested(self):
        """Each program in docs/examples is in its README and has a test here."""
        readme = (EXAMPLES / "README.md").read_text()
        for path in sorted(EXAMPLES.glob("*.py")):
            self.assertIn("(%s)" % path.name, readme)
            self.assertTrue(hasattr(self, "test_" + path.stem), path.name)
