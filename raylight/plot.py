"""Draw a run's train and val curves from its CSVLogger ``metrics.csv`` to a PNG.

    python -m raylight.plot lightning_logs/version_0 -o curves.png
    python -m raylight.plot lightning_logs        # the newest version_N in it
    python -m raylight.plot .                     # a default_root_dir: ./lightning_logs/version_N

One panel per metric: ``train_loss``, ``train_loss_step``, ``train_loss_epoch`` and
``val_loss`` share the "loss" panel, against the optimizer step. RUN_DIR and the output may
be local paths or storage URIs. Without ``-o`` the PNG is written next to ``metrics.csv``
as ``metrics.png``. Needs matplotlib (``pip install "raylight[plot]"``).
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys

from raylight.shared import storage

_METRICS_FILE = "metrics.csv"
_SPLIT_PREFIX = re.compile(r"^(train|val)([_/-]|$)")
_FORK_SUFFIX = re.compile(r"_(step|epoch)$")


def find_run(run_dir: str) -> str:
    """The folder whose metrics.csv to draw: ``run_dir`` itself, else the newest
    ``version_N`` in ``run_dir`` or in one of its folders (``lightning_logs``)."""
    if storage.exists(storage.join(run_dir, _METRICS_FILE)):
        return run_dir
    candidates: list[tuple[int, str]] = []
    parents = [run_dir] + [
        storage.join(run_dir, name) for name in storage.list_names(run_dir, directories=True)
    ]
    for parent in parents:
        for name in storage.list_names(parent, directories=True):
            number, folder = name[len("version_") :], storage.join(parent, name)
            if not (name.startswith("version_") and number.isdigit()):
                continue
            if storage.exists(storage.join(folder, _METRICS_FILE)):
                candidates.append((int(number), folder))
    if not candidates:
        raise FileNotFoundError(
            f"No {_METRICS_FILE} in {storage.redact(run_dir)} or in a version_N folder under it. "
            "raylight.plot reads what a CSVLogger writes: train with "
            "Trainer(logger=CSVLogger(save_dir)) (or add one to the list of loggers), then "
            "point this at save_dir, save_dir/lightning_logs or one version_N folder."
        )
    return max(candidates)[1]


def read_curves(location: str) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{panel: {column: [(step, value), ...]}} for the train and val columns of a metrics.csv."""
    text = storage.read_bytes(location).decode()
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        step = row.get("step")
        if not step:
            continue
        for column, value in row.items():
            if not value or not _SPLIT_PREFIX.match(column or ""):
                continue
            panel = _FORK_SUFFIX.sub("", _SPLIT_PREFIX.sub("", column)) or column
            panels.setdefault(panel, {}).setdefault(column, []).append((float(step), float(value)))
    return panels


def plot(location: str, output: str) -> str:
    """Draw the curves of the metrics.csv at ``location`` into the PNG ``output``."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            'raylight.plot needs matplotlib: pip install matplotlib (or "raylight[plot]").'
        ) from error
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    panels = read_curves(location)
    if not panels:
        raise ValueError(
            f"{storage.redact(location)} has no train or val columns to draw (columns whose "
            "names start with 'train' or 'val')."
        )
    figure, axes = plt.subplots(
        len(panels), 1, figsize=(8, 3 * len(panels)), sharex=True, squeeze=False
    )
    for ax, (panel, series) in zip(axes[:, 0], sorted(panels.items()), strict=True):
        for column, points in sorted(series.items()):
            steps, values = zip(*points, strict=True)
            # Step rows are dense: a line; epoch and validation rows are sparse: markers too.
            sparse = not column.startswith("train") or column.endswith("_epoch")
            ax.plot(steps, values, marker="o" if sparse else None, label=column)
        ax.set_ylabel(panel)
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    figure.suptitle(storage.redact(location), fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    storage.write_bytes(output, buffer.getvalue())
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raylight.plot",
        description="Draw the train and val curves of a run's metrics.csv to a PNG.",
    )
    parser.add_argument("run_dir", help="a version_N folder, lightning_logs, or default_root_dir")
    parser.add_argument("-o", "--output", help="the PNG to write (default: next to metrics.csv)")
    args = parser.parse_args(argv)
    try:
        folder = find_run(storage.absolute(args.run_dir))
        output = args.output or storage.join(folder, "metrics.png")
        print(plot(storage.join(folder, _METRICS_FILE), storage.absolute(output)))
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"raylight.plot: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
