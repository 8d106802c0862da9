"""The rows a logger has sent to a backend that only appends (an MLflow run, a W&B run).

After a worker failure a fit resumes from a checkpoint at step S and logs the rows of S
and later again; raylight resumes exactly, so they carry the values already sent. CSVLogger
rewrites its file and simply forgets those rows (``drop_rows_from``); a remote run cannot
take a row back, so these loggers skip a row they have sent when it comes again.
"""

from __future__ import annotations

from collections.abc import Iterable


class SentRows:
    """Which metric names were sent at which step; ``is_new`` is False for a replayed row."""

    def __init__(self) -> None:
        self._sent: dict[int, list[frozenset[str]]] = {}
        self._again: dict[int, list[frozenset[str]]] = {}  # sent rows a resumed fit logs again
        self._names: dict[frozenset[str], frozenset[str]] = {}  # one object per distinct row

    def drop_from(self, step: int) -> None:
        """The fit resumes at ``step``: the rows sent at ``step`` and later will come again."""
        self._again = {at: list(names) for at, names in self._sent.items() if at >= step}

    def is_new(self, names: Iterable[str], step: int | None) -> bool:
        """Note a row about to be sent; False when it is one sent before the restart."""
        if step is None:
            return True
        row = frozenset(names)
        row = self._names.setdefault(row, row)
        # Rows arrive in step order: a sent row the resumed fit skipped past never comes.
        for stale in [at for at in self._again if at < step]:
            del self._again[stale]
        again = self._again.get(step)
        if again and row in again:
            again.remove(row)
            return False
        self._sent.setdefault(step, []).append(row)
        return True
