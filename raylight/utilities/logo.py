"""``cli_lightning_logo()``: Lightning's examples print it when they start."""

from __future__ import annotations

_LOGO = "  raylight: the Lightning programming model on Ray"


def cli_lightning_logo() -> None:
    print()
    print("\033[0;35m" + _LOGO + "\033[0m")
    print()
