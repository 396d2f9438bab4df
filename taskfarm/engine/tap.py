"""``twistd -n taskengine``: options and service for one engine."""

from __future__ import annotations

import ast
import os

from twisted.python import usage

from taskfarm import logoptions
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
        *logoptions.parameters(
            "{rank} (the MPI rank), {job} (the SLURM/PBS job id), {host} and {pid} in "
            "PATH are filled in, so that each engine has a file of its own."
        ),
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
        rank = mpi.rank_from_environment(os.environ) if self["mpi"] else None
        logoptions.apply(self, rank=rank)


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
