"""Explicit lifecycles: one state table each, one way to move along it.

A table maps ``(state, event)`` to the next state.  Any pair it does not
have is a bug in the caller, not a condition to handle, so `move` raises
`InvalidTransition` naming what moved, the event and the state.
"""

from __future__ import annotations

from collections.abc import Mapping


class InvalidTransition(Exception):
    """A bug: something moved along an edge its state table does not have."""


def move(table: Mapping, state, event: str, who: str):
    """The state after `event` in `state`, by `table`; `who` names what moves."""
    try:
        return table[(state, event)]
    except KeyError:
        raise InvalidTransition(
            "%s: %r in state %s" % (who, event, getattr(state, "name", state))
        ) from None
