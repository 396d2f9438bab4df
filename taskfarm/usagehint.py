"""Bad command-line options answered in two lines, not the whole help.

`twistd` and ``python -m twisted`` print a plugin's whole usage after a
usage error (35 lines and more for the controller); `BriefUsage` makes a
plugin's `Options` print one line pointing to ``--help`` instead, while
``--help`` itself still shows everything.
"""

from __future__ import annotations

from twisted.python import usage


def help_hint(command: str) -> str:
    """The line that follows a usage error of `command`."""
    return "Run '%s --help' for its options." % command


class BriefUsage:
    """A mixin for `usage.Options`: once parsing failed, `getUsage` is the
    one-line `help_hint` of `command` (what the runners print after the
    error)."""

    #: How a user runs these options, for the hint.
    command = "twistd PLUGIN"
    _usage_failed = False

    def parseOptions(self, options=None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError:
            self._usage_failed = True
            raise

    def getUsage(self, width=None) -> str:
        if self._usage_failed:
            return help_hint(self.command) + "\n"
        return super().getUsage(width)
