"""The launcher table: every engine launcher by name, and its options.

A launcher is a class implementing `taskfarm.interfaces.IEngineLauncher`,
registered by one line in `LAUNCHERS`.  The class declares::

    name = "ssh"              # the name in LAUNCHERS and in --launcher NAME
    remote = True             # engines on other machines (see check_reachable)
    optParameters = [         # its own options, twisted.python.usage style:
        ["hosts", None, None, "HOST[:N],... to start engines on."],
    ]                         # [long name, short name or None, default, help(, coerce)]
    optFlags = [["ssh-verbose", None, "..."]]   # [long name, short or None, help]
    optRepeated = [["slurm-option", None, "..."]]  # repeatable: a list of values

    def __init__(self, reactor, profile, options, engine_timeout=None): ...

`options` is a dict holding exactly its own options' values, keyed by long
name as `usage.Options` keeps them (``options["hosts"]``; a flag is 0 or
1; a repeatable option is the list of its values in order, [] if none).
The constructor does no I/O and raises `usage.UsageError` for a bad
value.  `engine_timeout` is the controller's heartbeat timeout (None: no
heartbeat), for a launcher that watches its engines' liveness.

Two optional class methods:

- ``check_options(options)`` checks the values at parse time, before
  anything starts (raise `usage.UsageError`);
- ``clean_up(reactor, profile, described, options)`` is what `taskfarm
  stop` calls when the launcher's process is gone: `described` is the last
  ``describe()`` it saved; a Deferred.  Without it, `taskfarm stop` kills
  the described processes of this machine by pid.

``taskfarm cluster`` and ``taskfarm engines`` take every launcher's options
(`option_table`, and `repeated_handlers` for the repeatable ones); an
option of a launcher other than the chosen one is a usage error.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.python import usage

from taskfarm.cluster.batch import PbsLauncher, SlurmLauncher
from taskfarm.cluster.local import LocalLauncher
from taskfarm.cluster.mpi import MPIExecLauncher
from taskfarm.cluster.ssh import SSHLauncher
from taskfarm.interfaces import IEngineLauncher
from taskfarm.profile import Profile

#: Every launcher, by the name that --launcher takes.
LAUNCHERS: dict[str, type] = {
    "local": LocalLauncher,
    "mpiexec": MPIExecLauncher,
    "ssh": SSHLauncher,
    "slurm": SlurmLauncher,
    "pbs": PbsLauncher,
}

#: The launcher used when none is named.
DEFAULT_LAUNCHER = "local"


def launcher_class(name: str, table: Mapping[str, type] | None = None) -> type:
    """The launcher class called `name`; `usage.UsageError` listing the
    known ones when there is none."""
    table = LAUNCHERS if table is None else table
    try:
        return table[name]
    except KeyError:
        raise usage.UsageError(
            "unknown launcher %r: --launcher takes one of %s" % (name, ", ".join(sorted(table)))
        ) from None


def _declared(table: Mapping[str, type] | None) -> dict[str, list]:
    """{kind: rows} of every launcher's options ("parameter", "flag",
    "repeated"), each once.  Two launchers may share an option only if they
    declare it alike (else `ValueError`: a bug of the table)."""
    table = LAUNCHERS if table is None else table
    seen: dict[str, tuple] = {}
    rows: dict[str, list] = {"parameter": [], "flag": [], "repeated": []}
    for name in sorted(table):
        cls = table[name]
        for kind, attribute in (
            ("parameter", "optParameters"),
            ("flag", "optFlags"),
            ("repeated", "optRepeated"),
        ):
            for row in getattr(cls, attribute, []):
                key = row[0]
                if key in seen:
                    if seen[key][1:] != (kind, list(row)):
                        raise ValueError(
                            "launchers %s and %s declare --%s differently" % (seen[key][0], name, key)
                        )
                    continue
                seen[key] = (name, kind, list(row))
                rows[kind].append(list(row))
    return rows


def option_table(table: Mapping[str, type] | None = None) -> tuple[list, list]:
    """(optParameters, optFlags): every launcher's options, each once, for a
    `usage.Options` that takes them all (`ValueError` for two launchers
    declaring one option differently)."""
    rows = _declared(table)
    return rows["parameter"], rows["flag"]


def repeated_handlers(table: Mapping[str, type] | None = None) -> dict:
    """{``opt_NAME``: handler} for a `usage.Options` that takes every
    launcher's repeatable options: each use appends its value to the list
    ``options[NAME]``."""
    handlers = {}
    for key, _short, doc in _declared(table)["repeated"]:
        handlers["opt_" + key.replace("-", "_")] = _appender(key, doc)
    return handlers


def _appender(key: str, doc: str):
    # One parameter besides self: usage.Options reads it as taking a value.
    def handler(self, value: str) -> None:
        self[key] = [*self.get(key, []), value]

    handler.__doc__ = doc
    return handler


def _own_names(cls) -> list[tuple[str, object]]:
    """(long name, default) of each option of launcher class `cls`."""
    names = [(row[0], row[2]) for row in getattr(cls, "optParameters", [])]
    names += [(row[0], 0) for row in getattr(cls, "optFlags", [])]
    names += [(row[0], []) for row in getattr(cls, "optRepeated", [])]
    return names


def launcher_options(
    name: str, values: Mapping, table: Mapping[str, type] | None = None
) -> dict:
    """The values of launcher `name`'s own options, taken from `values` (a
    parsed `usage.Options` holding every launcher's options); a usage error
    when an option of another launcher was given."""
    table = LAUNCHERS if table is None else table
    cls = launcher_class(name, table)
    own = dict(_own_names(cls))
    for other in sorted(table):
        if other == name:
            continue
        for key, default in _own_names(table[other]):
            if key not in own and key in values and values[key] != default:
                raise usage.UsageError(
                    "--%s is an option of the %s launcher, not of --launcher %s"
                    % (key, other, name)
                )
    return {key: values.get(key, default) for key, default in own.items()}


def check_launcher_options(name: str, values: Mapping, table: Mapping[str, type] | None = None) -> dict:
    """`launcher_options`, then the class's own ``check_options`` if any."""
    options = launcher_options(name, values, table)
    cls = launcher_class(name, table)
    check = getattr(cls, "check_options", None)
    if check is not None:
        check(options)
    return options


def make_launcher(
    name: str,
    reactor,
    profile: Profile,
    values: Mapping | None = None,
    engine_timeout: float | None = None,
    table: Mapping[str, type] | None = None,
):
    """The launcher `name`, built with its own options out of `values`
    (`usage.UsageError` for an unknown name or a bad option)."""
    options = check_launcher_options(name, values or {}, table)
    launcher = launcher_class(name, table)(
        reactor, profile, options, engine_timeout=engine_timeout
    )
    if not IEngineLauncher.providedBy(launcher):
        raise TypeError("launcher %r does not provide IEngineLauncher" % (name,))
    return launcher
