"""``Trainer(profiler="simple")``: the driver's table of every rank's hook timings.

Each rank times its hooks (``rank.hooks``) into ``{action: [calls, seconds]}``; after each
Trainer call the driver gathers them and prints Lightning's SimpleProfiler table, with
the figures of every rank: the mean duration over all ranks' calls, the calls of one rank,
and the total of the slowest rank, which is the one the others wait for at each collective.
"""

from __future__ import annotations

import sys
from typing import Any

_HEADERS = (
    "Action",
    "Mean duration (s)",
    "Num calls",
    "Total time (s)",
    "Slowest rank",
    "Percentage %",
)


def report(stage: str, per_rank: list[dict[str, list[float]]], duration_s: float) -> str:
    """The table for one Trainer call that took ``duration_s`` on the driver."""
    actions = sorted({action for figures in per_rank for action in figures})
    rows = []
    for action in actions:
        calls = [figures.get(action, [0, 0.0]) for figures in per_rank]
        total_calls = sum(count for count, _ in calls)
        slowest = max(range(len(calls)), key=lambda rank: calls[rank][1])
        total = calls[slowest][1]
        mean = sum(seconds for _, seconds in calls) / total_calls if total_calls else 0.0
        share = 100.0 * total / duration_s if duration_s > 0 else 0.0
        rows.append((action, mean, int(calls[slowest][0]), total, slowest, share))
    rows.sort(key=lambda row: row[3], reverse=True)
    cells = [_HEADERS, ("Total", "-", "-", f"{duration_s:.5g}", "-", "100 %")]
    cells += [
        (action, f"{mean:.5g}", str(count), f"{total:.5g}", str(rank), f"{share:.3g} %")
        for action, mean, count, total, rank, share in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_HEADERS))]
    line = "-" * (sum(widths) + 5 * len(widths) + 1)

    def format_row(row: tuple[str, ...]) -> str:
        return (
            "|"
            + "|".join(f"  {cell:<{width}}  " for cell, width in zip(row, widths, strict=True))
            + "|"
        )

    body = [format_row(cells[0]), line, format_row(cells[1]), line]
    body += [format_row(row) for row in cells[2:]]
    return "\n".join(
        [f"{stage.upper()} Profiler Report ({len(per_rank)} ranks)", "", line, *body, line]
    )


def print_report(stage: str, per_rank: list[dict[str, Any]], duration_s: float) -> None:
    print(report(stage, per_rank, duration_s), file=sys.stderr, flush=True)
