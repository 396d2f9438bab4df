"""Public test helpers: fakes for logic tests, fixtures for real clusters.

* `ScriptedChannel` is an `IEngineChannel` that records what the controller
  sends and lets a test answer each command by hand (with a `task.Clock`).
* `InProcessChannel` runs commands at once on an in-process `Namespace`.
* `InProcessEvaluator` runs `depend` predicates in this process (tests only).
* `RecordingWorker` stands in for an engine's `CommandWorker` (no thread).
* `local.LocalConnection` / `LocalReference` / `LocalTub` are an in-process
  Foolscap transport on a clock, with switches to break or hang it, and
  `grid.LocalGrid` serves a whole controller through them.
* `RealCluster` runs a real controller (real Tub on 127.0.0.1) in the test's
  reactor and real engine processes, and stops every one of them.
"""

from taskfarm.testing.fakes import (  # noqa: F401
    InProcessChannel,
    InProcessEvaluator,
    RecordingWorker,
    ScriptedChannel,
)
