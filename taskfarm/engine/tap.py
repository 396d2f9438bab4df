"""``twistd -n taskengine``: options and service for one engine."""

from __future__ import annotations

import ast
import os

from twisted.python import usage

from taskfarm import exitcodes, logfiles
from taskfarm.engine import mpi
from taskfarm.engine.namespace import DEFAULT_MAX_TASK_OUTPUT
from taskfarm.lifeline import follow_launcher
from taskfarm.profile import ENGINE, Profile
from taskfarm.usagehint import BriefUsage


def parse_property(text: str) -> tuple[str, object]:
    """``KEY=VALUE``; VALUE is read as a Python literal when it is one."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise usage.UsageError(
            "--property takes KEY=VALUE with KEY an identifier, not %r" % (text,)
        )
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


class Options(BriefUsage, usage.Options):
    """Options of ``twistd taskengine``."""

    command = "twistd taskengine"

    synopsis = "[--furl-file FILE] [--property KEY=VALUE ...] [--mpi] [--log-file PATH]"
    optFlags = [
        [
            "mpi",
            None,
            "This engine is an MPI rank (started by mpiexec): ask for the engine id "
            "equal to the rank, and bind mpi4py.MPI as `mpi` when it is importable.",
        ],
    ]
    optParameters = [
        ["furl-file", "f", None, "The engine furl file (default: the profile's)."],
        ["profile-dir", "p", None, "The profile folder (default ~/.taskfarm)."],
        [
            "max-task-output",
            None,
            DEFAULT_MAX_TASK_OUTPUT,
            "Bytes of stdout, and as many of stderr, kept of each task (the rest "
            "is cut, and the result says how much).",
            int,
        ],
        [
            "log-file",
            None,
            None,
            "Write this engine's log (and what it prints outside tasks) to PATH, "
            "rotated by size, instead of to stdout.  {rank} (the MPI rank), {job} "
            "(the SLURM/PBS job id), {host} and {pid} in PATH are filled in, so "
            "that each engine has a file of its own.",
        ],
        [
            "log-rotate-bytes",
            None,
            logfiles.ROTATE_LENGTH,
            "With --log-file: bytes after which the file is renamed PATH.1 (older "
            "ones shift) and a fresh one started.",
            int,
        ],
        [
            "log-keep",
            None,
            logfiles.MAX_ROTATED,
            "With --log-file: rotated files kept (PATH.1 .. PATH.N).",
            int,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["properties"] = {}

    def opt_property(self, text: str) -> None:
        """Set an engine property KEY=VALUE (repeatable)."""
        key, value = parse_property(text)
        self["properties"][key] = value

    def postOptions(self) -> None:
        if self["max-task-output"] < 0:
            raise usage.UsageError(
                "--max-task-output is a number of bytes (0 or more), not %d"
                % self["max-task-output"]
            )
        if self["mpi"] and mpi.rank_from_environment(os.environ) is None:
            raise usage.UsageError(
                "--mpi: this engine is no MPI rank (none of %s is set); start it with "
                "mpiexec, or leave out --mpi" % ", ".join(mpi.RANK_VARIABLES)
            )
        if self["furl-file"] is None:
            self["furl-file"] = str(
                Profile.from_option(self["profile-dir"]).furl_file(ENGINE)
            )
        self["log-observer"] = None
        if self["log-file"] is not None:
            self._log_to_file()

    def _log_to_file(self) -> None:
        """Open the rotating ``--log-file`` now (an error is a usage error,
        before anything starts) and make it where the runner logs: the log
        file of ``python -m twisted`` (twist), or twistd's log observer
        through its own ``--logger`` hook."""
        if self["log-rotate-bytes"] < 1024:
            raise usage.UsageError("--log-rotate-bytes must be at least 1024")
        if self["log-keep"] < 1:
            raise usage.UsageError("--log-keep must be at least 1")
        parent = getattr(self, "parent", None)
        if parent is not None and "logFile" not in parent and parent.get("logger"):
            raise usage.UsageError("--log-file and twistd's --logger both name the log")
        rank = mpi.rank_from_environment(os.environ) if self["mpi"] else None
        try:
            path = logfiles.engine_log_path(self["log-file"], rank=rank)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        try:
            factory = logfiles.rotating_observer_factory(
                path.absolute(), self["log-rotate-bytes"], self["log-keep"]
            )
        except OSError as e:
            raise usage.UsageError(
                "--log-file %s cannot be written: %s" % (path, e.strerror or e)
            ) from None
        self["log-file"] = str(path.absolute())
        self["log-observer"] = factory
        if parent is not None and "logFile" in parent:
            # ``python -m twisted`` (twist): its log observer writes to
            # parent["logFile"] (in the format of its --log-format).
            parent["logFile"] = factory.args[0]
        elif parent is not None:
            # twistd: its --logger takes precedence over its --logfile.
            parent["logger"] = logfiles.use_for_twistd(factory)
        # Launchers that watch the engine's stderr (mpiexec's) still see
        # why it exits.
        exitcodes.say_exit_on_stderr()


def makeService(options: Options):
    """The engine service for parsed `options`."""
    from pathlib import Path

    from twisted.internet import reactor

    from taskfarm.engine.service import create_engine

    follow_launcher(reactor)
    properties = dict(options["properties"])
    requested_id, names = None, {}
    if options["mpi"]:
        mpi.follow_mpi_launcher(reactor)
        requested_id, names = mpi.mpi_engine_setup()
        properties.setdefault("mpi_rank", requested_id)
    return create_engine(
        Path(options["furl-file"]), properties, reactor,
        requested_id=requested_id, names=names,
        max_task_output=options["max-task-output"],
    )
