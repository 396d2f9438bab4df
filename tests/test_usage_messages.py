"""A bad command-line option is answered with the error and one line
pointing to ``--help``, not the whole help: the ``taskfarm`` command (each
subcommand) and the two twistd plugins, under ``twistd`` and ``python -m
twisted`` alike.  In-process: the parsers and the runners' own option
handling, no processes."""

from __future__ import annotations

import contextlib
import io

from twisted.application.twist._options import TwistOptions
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions
from twisted.trial import unittest

from taskfarm import cli


def _run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(list(argv))
        except SystemExit as e:
            return e.code, out.getvalue(), err.getvalue()
    raise AssertionError("taskfarm %s did not exit" % " ".join(argv))


class CliTests(unittest.SynchronousTestCase):
    def test_bad_options_give_two_lines(self):
        """Each subcommand, an unknown option, a bad value, no command."""
        cases = [
            (("cluster", "--bogus"), "taskfarm cluster", "option --bogus not recognized"),
            (("cluster", "-n", "x"), "taskfarm cluster", "-n takes a number of engines, not 'x'"),
            (("engines", "-n", "0"), "taskfarm engines", "-n must be >= 1"),
            (("stop", "--timeout", "0"), "taskfarm stop", "--timeout must be > 0"),
            (("status", "--nope"), "taskfarm status", "option --nope not recognized"),
            (("demo", "extra"), "taskfarm demo", "Wrong number of arguments."),
            (("--bogus",), "taskfarm", "option --bogus not recognized"),
            ((), "taskfarm", "name a command: cluster, engines, status, stop or demo"),
        ]
        for argv, command, error in cases:
            with self.subTest(argv=argv):
                code, out, err = _run_cli(*argv)
                self.assertEqual(code, 2)
                self.assertEqual(out, "")
                self.assertEqual(
                    err, "%s: %s\nRun '%s --help' for its options.\n" % (command, error, command)
                )

    def test_help_still_shows_everything(self):
        code, out, _ = _run_cli("cluster", "--help")
        self.assertEqual(code, 0)
        self.assertIn("--max-message-size", out)
        self.assertGreater(len(out.splitlines()), 30)


class PluginTests(unittest.SynchronousTestCase):
    def test_twistd(self):
        """``twistd taskcontroller --task-slots 0``: what twistd prints of
        its options after the error is the synopsis and the hint."""
        for plugin, argv, error in (
            ("taskcontroller", ["--task-slots", "0"], "--task-slots must be at least 1"),
            ("taskengine", ["--bogus"], "option --bogus not recognized"),
        ):
            with self.subTest(plugin=plugin):
                config = ServerOptions()
                with self.assertRaises(usage.UsageError) as caught:
                    config.parseOptions([plugin, *argv])
                self.assertEqual(str(caught.exception), error)
                shown = str(config).strip().splitlines()
                self.assertEqual(shown[-1], "Run 'twistd %s --help' for its options." % plugin)
                self.assertLessEqual(len(shown), 2, shown)

    def test_python_m_twisted(self):
        """``python -m twisted taskengine --bogus`` (`Twist`, which prints
        ``Error: ...``, a blank line and its options): those options are
        the synopsis and the hint."""
        options = TwistOptions()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["taskengine", "--bogus"])
        self.assertEqual(str(caught.exception), "option --bogus not recognized")
        shown = str(options).strip().splitlines()
        self.assertEqual(shown[-1], "Run 'twistd taskengine --help' for its options.")
        self.assertLessEqual(len(shown), 2, shown)

    def test_plugin_help_is_whole(self):
        config = ServerOptions()
        config.parseOptions(["taskcontroller"])
        self.assertIn("--max-message-size", config.subOptions.getUsage())
