"""Progress bars (tqdm) for waits on many tasks: done/total, rate, ETA and
the failures so far as the bar's postfix.

``progress=`` of `barrier` and `map` is True, False, None (the default:
on when the environment variable ``TASKFARM_PROGRESS`` is 1) or a dict of
tqdm keyword arguments (``{"file": f, "desc": "fit"}``), which turns the
bar on.  In Jupyter the bar is tqdm's notebook widget when ipywidgets is
there (`tqdm.auto`); a bar given a `file` is always the text bar.
"""

from __future__ import annotations

import os

#: The environment variable that turns bars on by default.
ENVIRONMENT = "TASKFARM_PROGRESS"

_ON = {"1", "true", "yes", "on"}


def wanted(progress) -> bool:
    """Whether `progress` (a ``progress=`` argument) asks for a bar."""
    if progress is None:
        return os.environ.get(ENVIRONMENT, "").strip().lower() in _ON
    if isinstance(progress, dict):
        return True
    if isinstance(progress, bool):
        return progress
    raise TypeError("progress is True, False, None or a dict of tqdm options, not %r" % (progress,))


class TaskProgress:
    """A bar over `total` tasks; `finished(ok)` counts one more done."""

    def __init__(self, total: int, desc: str, progress=True) -> None:
        options = dict(progress) if isinstance(progress, dict) else {}
        if "file" in options:
            from tqdm.std import tqdm
        else:
            from tqdm.auto import tqdm
        options.setdefault("desc", desc)
        options.setdefault("unit", "task")
        self.total = total
        self.done = 0
        self.failed = 0
        self._bar = tqdm(total=total, **options)
        self._bar.set_postfix(failed=0, refresh=False)

    def finished(self, ok: bool = True, count: int = 1) -> None:
        """`count` more tasks are done (failed, unless `ok`)."""
        self.done += count
        if not ok:
            self.failed += count
            self._bar.set_postfix(failed=self.failed, refresh=False)
        self._bar.update(count)

    def close(self) -> None:
        """Draw the last state and end the bar (idempotent)."""
        self._bar.close()


def bar_for(progress, total: int, desc: str) -> TaskProgress | None:
    """A `TaskProgress` if `progress` asks for one (and there is work), else None."""
    if not wanted(progress) or total <= 0:
        return None
    return TaskProgress(total, desc, progress)
