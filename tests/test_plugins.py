"""Unit tests of the twistd plugins and their command-line options (parsed
from argv; no service is started)."""

import os

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial import unittest

from taskfarm.controller import tap as controller_tap
from taskfarm.controller.scheduler import FIFOScheduler, PriorityScheduler
from taskfarm.engine import tap as engine_tap
from taskfarm.testing.helpers import temp_dir


class PluginDiscoveryTests(unittest.TestCase):
    """``twistd`` finds both of taskfarm's plugins."""

    def plugins(self):
        return {p.tapname: p for p in getPlugins(IServiceMaker)}

    def test_both_found(self):
        """getPlugins(IServiceMaker) finds the taskcontroller and taskengine tapnames."""
        plugins = self.plugins()
        self.assertIn("taskcontroller", plugins)
        self.assertIn("taskengine", plugins)

    def test_plugins_name_their_tap_modules(self):
        """Each plugin's options and makeService come from its tap module."""
        plugins = self.plugins()
        self.assertIs(plugins["taskcontroller"].options, controller_tap.Options)
        self.assertIs(plugins["taskengine"].options, engine_tap.Options)
        self.assertTrue(plugins["taskcontroller"].description)
        self.assertTrue(plugins["taskengine"].description)


class ControllerOptionsTests(unittest.TestCase):
    """``twistd taskcontroller`` options."""

    def parse(self, *argv):
        options = controller_tap.Options()
        options.parseOptions(list(argv))
        return options

    def refused(self, *argv):
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(*argv)
        return str(caught.exception)

    def test_defaults(self):
        """With no arguments: FIFO scheduler, two task slots, loopback listening later."""
        options = self.parse()
        self.assertIs(options["scheduler_class"], FIFOScheduler)
        self.assertEqual(options["task-slots"], 2)
        self.assertIsNone(options["listen"])
        self.assertIsNone(options["location"])

    def test_scheduler_by_dotted_name(self):
        """--scheduler loads a class that implements IScheduler."""
        options = self.parse("--scheduler", "taskfarm.controller.scheduler.PriorityScheduler")
        self.assertIs(options["scheduler_class"], PriorityScheduler)

    def test_scheduler_not_importable(self):
        """A --scheduler that cannot be imported is a UsageError naming it."""
        message = self.refused("--scheduler", "no.such.module.Scheduler")
        self.assertIn("--scheduler no.such.module.Scheduler cannot be imported", message)

    def test_scheduler_missing_attribute(self):
        """A --scheduler naming a missing class of a real module is refused."""
        message = self.refused("--scheduler", "taskfarm.controller.scheduler.NoSuchScheduler")
        self.assertIn("cannot be imported", message)

    def test_scheduler_not_a_scheduler(self):
        """A --scheduler that is not an IScheduler class says what it must be."""
        for dotted in ("taskfarm.task.Task", "taskfarm.controller.tap.load_scheduler", "os.path"):
            message = self.refused("--scheduler", dotted)
            self.assertIn(
                "--scheduler %s is not a class implementing taskfarm.interfaces.IScheduler" % dotted,
                message,
            )

    def test_scheduler_empty(self):
        """An empty --scheduler is refused with a UsageError, not a traceback."""
        self.refused("--scheduler", "")

    def test_listen_loopback(self):
        """--listen on a named interface needs no --location."""
        options = self.parse("--listen", "tcp:10105:interface=127.0.0.1")
        self.assertEqual(options["listen"], "tcp:10105:interface=127.0.0.1")

    def test_listen_all_interfaces_needs_location(self):
        """--listen on all interfaces without --location is refused with a clear sentence."""
        for listen in ("tcp:10105:interface=0.0.0.0", "tcp:0", "tcp:0:interface=\\:\\:"):
            message = self.refused("--listen", listen)
            self.assertIn("--listen on all interfaces needs --location HOST:PORT", message)

    def test_listen_all_interfaces_with_location(self):
        """--listen on all interfaces is fine once --location says where to dial."""
        options = self.parse("--listen", "tcp:10105:interface=0.0.0.0", "--location", "10.0.0.5:10105")
        self.assertEqual(options["location"], "10.0.0.5:10105")

    def test_listen_not_tcp(self):
        """A --listen that is no tcp endpoint is refused, showing the expected form."""
        message = self.refused("--listen", "unix:/tmp/sock")
        self.assertIn("tcp:10105:interface=127.0.0.1", message)

    def test_listen_bad_port(self):
        """A --listen whose port is not a number is refused saying so."""
        message = self.refused("--listen", "tcp:http:interface=127.0.0.1")
        self.assertIn("not a number", message)

    def test_numbers_checked(self):
        """Numeric options are range-checked with a sentence naming the option."""
        self.assertIn("--task-slots", self.refused("--task-slots", "0"))
        self.assertIn("--unmet-timeout", self.refused("--unmet-timeout", "-1"))
        self.assertIn("--max-message-size", self.refused("--max-message-size", "10"))
        self.assertIn("--depend-timeout", self.refused("--depend-timeout", "0"))
        self.assertIn("--depend-timeout", self.refused("--depend-timeout", "inf"))
        self.assertEqual(self.parse()["depend-timeout"], 5.0)
        self.assertEqual(self.parse("--depend-timeout", "0.5")["depend-timeout"], 0.5)

    def test_numbers_parsed(self):
        """Numeric options are converted from their text."""
        options = self.parse("--task-slots", "4", "--unmet-timeout", "2.5")
        self.assertEqual((options["task-slots"], options["unmet-timeout"]), (4, 2.5))

    def test_not_a_number(self):
        """A numeric option given text is a UsageError."""
        self.refused("--task-slots", "many")


class EngineOptionsTests(unittest.TestCase):
    """``twistd taskengine`` options."""

    def parse(self, *argv):
        options = engine_tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_properties_parsed(self):
        """--property KEY=VALUE reads VALUE as a Python literal where it is one."""
        options = self.parse(
            "--furl-file", "/tmp/engine.furl",
            "--property", "ram=16",
            "--property", "gpu=True",
            "--property", "tags=['a', 'b']",
            "--property", "ratio=0.5",
            "--property", "site=cern",
            "--property", "quoted='x y'",
            "--property", "nothing=None",
        )
        self.assertEqual(
            options["properties"],
            {
                "ram": 16,
                "gpu": True,
                "tags": ["a", "b"],
                "ratio": 0.5,
                "site": "cern",
                "quoted": "x y",
                "nothing": None,
            },
        )

    def test_property_not_literal_stays_text(self):
        """A VALUE that is no literal (even one with '=' in it) is kept as text."""
        key, value = engine_tap.parse_property("expr=1=2")
        self.assertEqual((key, value), ("expr", "1=2"))
        self.assertEqual(engine_tap.parse_property("call=__import__('os')"), ("call", "__import__('os')"))

    def test_property_empty_value(self):
        """KEY= gives the empty string."""
        self.assertEqual(engine_tap.parse_property("k="), ("k", ""))

    def test_property_repeated(self):
        """A repeated KEY keeps the last VALUE."""
        options = self.parse("--furl-file", "f", "--property", "n=1", "--property", "n=2")
        self.assertEqual(options["properties"], {"n": 2})

    def test_bad_property_refused(self):
        """A --property without '=' or with a KEY that is no identifier is refused with a sentence."""
        for bad in ("ram", "=3", "1st=3", "my key=3", "a.b=1"):
            with self.assertRaises(usage.UsageError) as caught:
                self.parse("--furl-file", "f", "--property", bad)
            self.assertIn("--property takes KEY=VALUE with KEY an identifier", str(caught.exception))
            self.assertIn(repr(bad), str(caught.exception))

    def test_properties_not_shared(self):
        """Two Options objects do not share one properties dict."""
        first = self.parse("--furl-file", "f", "--property", "a=1")
        second = self.parse("--furl-file", "f")
        self.assertEqual(first["properties"], {"a": 1})
        self.assertEqual(second["properties"], {})

    def test_furl_file_from_profile(self):
        """Without --furl-file the engine furl of the profile is used."""
        profile = os.path.join(temp_dir(self), "profile")
        options = self.parse("--profile-dir", profile)
        self.assertEqual(
            os.path.abspath(options["furl-file"]),
            os.path.abspath(os.path.join(profile, "security", "engine.furl")),
        )
        self.assertFalse(os.path.exists(profile), "parsing options must do no I/O")

    def test_furl_file_given(self):
        """--furl-file is used as given."""
        self.assertEqual(self.parse("--furl-file", "/x/y.furl")["furl-file"], "/x/y.furl")
