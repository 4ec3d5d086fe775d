"""Encoded answers kept while the state they were computed from is unchanged.

A list such as ``/cluster/resources`` depends on the read model and on the caller's rights;
keyed by caller and arguments, and stamped with the read model's version and the IAM view's
generation, the encoded answer is reused until either moves.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

Stamp = tuple[int, int]


class AnswerCache:
    """A bounded map of ``key -> (stamp, encoded answer)``."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._answers: dict[Hashable, tuple[Stamp, bytes]] = {}

    def get_or_build(self, key: Hashable, stamp: Stamp, build: Callable[[], bytes]) -> bytes:
        """The answer for ``key`` at ``stamp``, built (and kept) when missing or stale."""
        found = self._answers.get(key)
        if found is not None and found[0] == stamp:
            return found[1]
        answer = build()
        if len(self._answers) >= self.limit:
            self._answers.clear()
        self._answers[key] = (stamp, answer)
        return answer
