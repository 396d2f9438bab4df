"""Splitting a run of items into messages that each stay under a limit.

The same greedy rule serves every batched message: tasks a client submits,
commands the controller sends an engine, replies an engine sends back.
"""

from __future__ import annotations

from pickle import PickleBuffer

from taskfarm import serialization


def split_by_size(items: list, sizes: list[int], room: int) -> list[list]:
    """`items`, in order, in consecutive runs whose `sizes` sum to at most
    `room`; a run holds one item at least, so an item over `room` is alone
    (callers deal with such items first)."""
    runs: list[list] = []
    run: list = []
    used = 0
    for item, size in zip(items, sizes, strict=True):
        if run and used + size > room:
            runs.append(run)
            run, used = [], 0
        run.append(item)
        used += size
    if run:
        runs.append(run)
    return runs


def pickled_size_bound(value) -> int:
    """An upper bound of ``serialization.packed_size(value)`` for the plain
    data commands are made of, without pickling it (which would copy every
    payload once more on the hot path)."""
    size = _size_bound(value)
    # Protocol header and STOP, and a FRAME opcode for each 64 KiB frame.
    return size + 16 + 9 * (size // 65536 + 1)


def _size_bound(value) -> int:
    kind = type(value)
    if kind is tuple or kind is list:
        # Leaves inline: this runs for every command and reply sent.
        size = 8 + 2 * (len(value) // 1000)
        for item in value:
            item_kind = type(item)
            if item_kind is bytes:
                size += len(item) + 10  # opcode, 8-byte length, MEMOIZE
            elif item_kind is PickleBuffer:
                # Out of band: its bytes travel beside the pickle (an
                # opcode or two in it).
                size += item.raw().nbytes + 10
            elif item is None or item_kind is bool:
                size += 1
            elif item_kind is float or (item_kind is int and -(2**31) <= item < 2**31):
                size += 9
            else:
                size += _size_bound(item)
        return size
    if kind is bytes:
        return len(value) + 10
    if kind is PickleBuffer:
        return value.raw().nbytes + 10
    if kind is str:
        # isascii() is O(1) in CPython; others are encoded to be exact.
        return (len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))) + 10
    if value is None or kind is bool:
        return 1
    if kind is float or (kind is int and -(2**31) <= value < 2**31):
        return 9
    return serialization.packed_size(value)


def pickled_size(value, room: int) -> int:
    """The size `value` packs to, as far as fitting it in `room` goes: the
    cheap bound when that fits, else the exact size (a pickle of all but
    its out-of-band buffers, only for items near or over the limit)."""
    bound = pickled_size_bound(value)
    return bound if bound <= room else serialization.packed_size(value)
