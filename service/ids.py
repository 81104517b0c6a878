"""A bundle's item or user ids (``item_ids.json``, ``user_ids.json``) held compactly: the file's bytes, where each id
starts and ends, and a sorted array of 64-bit hashes for id -> row lookups.

A million ids as Python strings plus a dict cost ~150 MB and ~1 s to build; here they cost the file (11 MB for 1M
short ids), 16 MB of offsets and 16 MB of hashes and order, built with numpy in ~0.1 s. An id becomes a ``str``
only when asked for (a response's few ids).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import overload

import numpy as np

FNV_OFFSET = 0xCBF29CE484222325  # 64-bit FNV-1a: simple enough to compute alike in numpy (all ids) and Python (one)
FNV_PRIME = 0x100000001B3
MASK = (1 << 64) - 1
WHITESPACE = b" \t\n\r"


class IdsError(ValueError):
    """The ids file is not a JSON list of unique ids; the message says why."""


def fnv1a(data: bytes) -> int:
    value = FNV_OFFSET
    for byte in data:
        value = ((value ^ byte) * FNV_PRIME) & MASK
    return value


def _fnv1a_all(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """FNV-1a of every ``data[starts[i]:ends[i]]``, column by column over the ids still that long (work ~ bytes)."""
    lengths = ends - starts
    hashes = np.full(len(starts), FNV_OFFSET, dtype=np.uint64)
    by_length = np.argsort(-lengths, kind="stable")
    longest_first = lengths[by_length]
    prime = np.uint64(FNV_PRIME)
    for column in range(int(longest_first[0]) if len(longest_first) else 0):
        active = by_length[: int(np.searchsorted(-longest_first, -column, side="left"))]  # ids longer than column
        hashes[active] = (hashes[active] ^ data[starts[active] + column]) * prime  # uint64 arithmetic wraps mod 2**64
    return hashes


class IdTable(Sequence[str]):
    """Ids by row (``table[row]``) and rows by id (``table.get(id)``, ``id in table``)."""

    def __init__(self, data: bytes, starts: np.ndarray, ends: np.ndarray) -> None:
        self._data = data
        self._starts = starts  # (n,) int64: id r is data[starts[r]:ends[r]], UTF-8
        self._ends = ends
        array = np.frombuffer(data, dtype=np.uint8)
        hashes = _fnv1a_all(array, starts, ends)
        self._order = np.argsort(hashes, kind="stable")  # rows by hash
        self._hashes = hashes[self._order]
        # Equal hashes: a repeated id, or (rarely) a collision. Each run of equal hashes is checked id by id.
        seen: dict[bytes, int] = {}
        for i in np.flatnonzero(self._hashes[1:] == self._hashes[:-1]).tolist():
            if i == 0 or self._hashes[i - 1] != self._hashes[i]:
                seen = {}  # a new run starts at i
            for row in (int(self._order[i]), int(self._order[i + 1])):
                first = seen.setdefault(self._bytes(row), row)
                if first != row:
                    raise IdsError(f"id {self[row]!r} appears more than once (rows {min(first, row)} and {max(first, row)})")

    @classmethod
    def from_strings(cls, ids: Sequence[str]) -> IdTable:
        encoded = [i.encode("utf-8") for i in ids]
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
        ends = np.cumsum(lengths)
        return cls(b"".join(encoded), ends - lengths, ends)

    @classmethod
    def from_json(cls, data: bytes) -> IdTable:
        """Parse a JSON list of ids. Strings without escapes (what exporters write) are located with numpy and never
        become Python objects; any other list (escapes, numbers) goes through ``json.loads``, each value as ``str``."""
        located = _locate_plain_strings(data)
        if located is not None:
            return cls(data, *located)
        try:
            value = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IdsError(f"not valid JSON ({exc})") from exc
        if not isinstance(value, list):
            raise IdsError("expected a JSON list")
        return cls.from_strings([str(v) for v in value])

    def __len__(self) -> int:
        return len(self._starts)

    @overload
    def __getitem__(self, row: int) -> str: ...

    @overload
    def __getitem__(self, row: slice) -> list[str]: ...

    def __getitem__(self, row: int | slice) -> str | list[str]:
        if isinstance(row, slice):
            return [self[r] for r in range(*row.indices(len(self)))]
        return self._bytes(row).decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return (self[r] for r in range(len(self)))

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and self.get(item_id) is not None

    def get(self, item_id: str) -> int | None:
        """The row of ``item_id``, or None."""
        key = item_id.encode("utf-8", "surrogatepass")
        target = fnv1a(key)
        hashes = self._hashes
        i = int(hashes.searchsorted(np.uint64(target)))
        while i < len(hashes) and int(hashes[i]) == target:
            row = int(self._order[i])
            if self._bytes(row) == key:
                return row
            i += 1
        return None

    def _bytes(self, row: int) -> bytes:
        if row < 0:
            row += len(self)
        return self._data[int(self._starts[row]) : int(self._ends[row])]


def _locate_plain_strings(data: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """Where each string of a JSON list of plain strings (no escapes, no control characters) starts and ends in
    ``data``; None for any other content (then ``json.loads`` decides). Works on quote positions and the bytes
    between strings only (a few per id), never a pass of Python over the ids."""
    if b"\\" in data:
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    array = np.frombuffer(data, dtype=np.uint8)
    quotes = np.flatnonzero(array == ord('"'))
    if len(quotes) % 2:
        return None
    opens, closes = quotes[0::2], quotes[1::2]
    if len(opens) == 0:  # an empty list, or numbers: json.loads
        return None
    if data[: opens[0]].strip(WHITESPACE) != b"[" or data[closes[-1] + 1 :].strip(WHITESPACE) != b"]":
        return None
    control = np.flatnonzero(array < 0x20)  # must be escaped inside strings; whitespace between them is fine
    if len(control):
        string = np.searchsorted(opens, control, side="right") - 1
        if np.any((string >= 0) & (control < closes[np.maximum(string, 0)])):
            return None
    gap_starts, gap_lengths = closes[:-1] + 1, opens[1:] - closes[:-1] - 1  # between string i and string i + 1
    if np.any(gap_lengths < 1):
        return None
    if len(gap_starts):
        offsets = np.concatenate([[0], np.cumsum(gap_lengths)[:-1]])
        positions = np.repeat(gap_starts - offsets, gap_lengths) + np.arange(int(gap_lengths.sum()))
        gaps = array[positions]
        blank = np.zeros(256, dtype=bool)
        blank[list(WHITESPACE)] = True
        comma = gaps == ord(",")
        if np.any(~comma & ~blank[gaps]) or np.any(np.add.reduceat(comma, offsets) != 1):
            return None
    return (opens + 1).astype(np.int64), closes.astype(np.int64)
