"""Dense indexes for names (storages, CPU flags, mdev types...) and bitsets over them."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

import numpy as np
from numpy.typing import NDArray

K = TypeVar("K", bound=Hashable)

WORD_BITS = 64


class Interner(Generic[K]):
    """Names to dense indexes, in order of first sight; an index never changes."""

    def __init__(self) -> None:
        self.index: dict[K, int] = {}
        self.names: list[K] = []

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.index

    def get(self, name: K) -> int | None:
        """The index of ``name``, or None if it was never seen."""
        return self.index.get(name)

    def intern(self, name: K) -> int:
        """The index of ``name``, assigning the next one on first sight."""
        found = self.index.get(name)
        if found is None:
            found = self.index[name] = len(self.names)
            self.names.append(name)
        return found


def words_for(bits: int) -> int:
    """How many 64-bit words hold ``bits`` bits (at least one)."""
    return max(1, (bits + WORD_BITS - 1) // WORD_BITS)


def bitset(indexes: Iterable[int], words: int) -> NDArray[np.uint64]:
    """A bitset of ``words`` words with the given bit indexes set."""
    out = np.zeros(words, dtype=np.uint64)
    for bit in indexes:
        out[bit // WORD_BITS] |= np.uint64(1 << (bit % WORD_BITS))
    return out


def has_all(rows: NDArray[np.uint64], wanted: NDArray[np.uint64]) -> NDArray[np.bool_]:
    """For each row of a 2-D bitset, whether it holds every bit of ``wanted``."""
    # Only the words that hold a wanted bit matter: usually one, so test it alone.
    nonzero = np.flatnonzero(wanted)
    if nonzero.size == 1:
        word = int(nonzero[0])
        single: NDArray[np.bool_] = (rows[:, word] & wanted[word]) == wanted[word]
        return single
    every: NDArray[np.bool_] = np.all((rows & wanted) == wanted, axis=1)
    return every
