"""The split between the unit layer and the real-process layer.

A test that needs real processes or real sockets (127.0.0.1) is marked
``process``; ``pytest -m "not process"`` (``make unit``) runs the unit layer
alone, on `task.Clock`s and in-process fakes, in seconds.

A test is marked when its module is listed in `PROCESS_MODULES`, or when its
class, or a class it derives from, is named in `PROCESS_CLASSES` or derives
from `ProcessTestCase` or `ClusterTestCase`.  The split is checked, not trusted: while an
unmarked test runs, starting a process or binding or connecting an internet
socket fails the test with `UnmarkedProcessTest`, which names the test to
mark.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from taskfarm.testing.cluster import ClusterTestCase
from taskfarm.testing.processes import ProcessTestCase

#: Modules whose every test drives real processes (cluster, launcher, chaos ...).
PROCESS_MODULES = {
    "test_batch",
    "test_blocking_example",
    "test_chaos",
    "test_client_connections",
    "test_examples",
    "test_install",
    "test_futures",
    "test_aio",
    "test_cluster",
    "test_launcher",
    "test_magics",
    "test_manage",
    "test_mpi",
    "test_multiengine",
    "test_multiengine_guide",
    "test_quickstart",
    "test_ssh",
    "test_ssh_cli",
}

#: (module, class) pairs, bases included, of tests with real processes or sockets.
PROCESS_CLASSES = {
    ("test_bulk_channel", "BulkSocketTests"),
    ("test_channels", "FoolscapChannelTests"),
    ("test_depend", "DependTestCase"),
    ("test_dashboard", "DashboardServiceTests"),
    ("test_journal", "CorruptJournalTests"),
    ("test_journal", "_RestartTestCase"),
    ("test_journal_files", "ControllerBigResultTests"),
    ("test_journal_files", "FullDiskFileTests"),
    ("test_journal_files", "KillMidWriteTests"),
    ("test_limits", "_LimitClusterTestCase"),
    ("test_predicates", "OrphanTests"),
    ("test_predicates", "PoolTestCase"),
    ("test_schemas", "PerTubLimitTests"),
    ("test_security", "SecurityTestCase"),
    ("test_services", "ControllerStopTests"),
    ("test_sweeper", "ControllerMemoryTests"),
    ("test_tasks_integration", "_ClusterTestCase"),
    ("test_wait_bound", "ClientLeavesTests"),
    ("test_wire", "RealControllerTests"),
    ("test_task_output", "OutputRestartTests"),
}


class UnmarkedProcessTest(AssertionError):
    """A test outside the ``process`` layer started a process or used a socket."""


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "process: needs real processes or real sockets; deselect with -m 'not process'",
    )
    _install_guards()


def _is_process_test(item) -> bool:
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    if module in PROCESS_MODULES:
        return True
    cls = getattr(item, "cls", None)
    if cls is None:
        return False
    if issubclass(cls, (ProcessTestCase, ClusterTestCase)):
        return True
    return any((module, base.__name__) in PROCESS_CLASSES for base in cls.__mro__)


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if _is_process_test(item):
            item.add_marker(pytest.mark.process)


# -- the guard ---------------------------------------------------------------------------

#: The node id of the unmarked test now running, or None.
_guarded: list[str | None] = [None]


def _refuse(what: str) -> None:
    if _guarded[0] is not None:
        raise UnmarkedProcessTest(
            "%s %s but is not marked `process` (tests/conftest.py): mark it, or "
            "use the in-process fakes of taskfarm.testing" % (_guarded[0], what)
        )


def _guard(owner, name: str, what: str, applies=None) -> None:
    original = getattr(owner, name)

    def guarded(*args, **kwargs):
        if applies is None or applies(*args, **kwargs):
            _refuse(what)
        return original(*args, **kwargs)

    guarded.__wrapped__ = original
    setattr(owner, name, guarded)


def _internet(sock, *args, **kwargs) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)


def _install_guards() -> None:
    if getattr(os.fork, "__wrapped__", None) is not None:
        return  # installed already
    for name in ("fork", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            _guard(os, name, "started a process")
    _guard(subprocess.Popen, "__init__", "started a process")
    for name in ("bind", "connect", "connect_ex"):
        _guard(socket.socket, name, "used an internet socket", _internet)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _guarded[0] = None if item.get_closest_marker("process") else item.nodeid
    try:
        yield
    finally:
        _guarded[0] = None
