"""One back-off for everything that tries again: a delay per attempt.

Built on `twisted.application.internet.backoffPolicy`; attempt 0 waits
`initial` seconds and each further attempt `factor` times longer, up to
`maximum`.  Jitter is off by default, so delays are exact on a
`task.Clock` in tests.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from twisted.application.internet import backoffPolicy


def policy(
    initial: float, maximum: float, factor: float = 2.0, jitter: bool = False
) -> Callable[[int], float]:
    """The delay, in seconds, before attempt `n` (0, 1, ...): ``initial *
    factor ** n``, at most `maximum`; with `jitter`, up to a second more."""
    if not 0 <= initial <= maximum:
        raise ValueError(
            "a back-off needs 0 <= initial <= maximum, not %r and %r" % (initial, maximum)
        )
    return backoffPolicy(
        initialDelay=initial,
        maxDelay=maximum,
        factor=factor,
        jitter=random.random if jitter else (lambda: 0.0),
    )
