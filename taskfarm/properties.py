"""Engine properties: a dict of plain data that `depend` functions read.

Values must be plain data (numbers, strings, bytes, bools, None, and lists,
tuples, dicts and sets of those) so the controller can keep and compare
them without running anyone's code.  The machine facts an engine reports
at registration are kept by `clear_properties`.
"""

from __future__ import annotations

from taskfarm import serialization
from taskfarm.errors import BadRequest, InvalidProperty

#: Keys every engine reports about itself.
FACT_KEYS = frozenset({"hostname", "pid", "ncpus", "ram", "python"})


def checked_properties(values: object) -> dict:
    """`values` as a fresh dict of plain data, or `InvalidProperty`."""
    if not isinstance(values, dict):
        raise InvalidProperty("properties must be a dict, not %s" % type(values).__name__)
    for key in values:
        if not isinstance(key, str):
            raise InvalidProperty("property names must be str, not %r" % (key,))
    try:
        return serialization.unpack(serialization.pack(values))
    except BadRequest:
        bad = [k for k, v in values.items() if not _is_plain(v)]
        raise InvalidProperty(
            "property %r must be plain data (numbers, strings, lists, dicts ...)"
            % (bad[0] if bad else "?",)
        ) from None
    except Exception as e:
        raise InvalidProperty("properties cannot be stored: %s" % e) from None


def _is_plain(value: object) -> bool:
    try:
        serialization.unpack(serialization.pack(value))
    except Exception:
        return False
    return True
