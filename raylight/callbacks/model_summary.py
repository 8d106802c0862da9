"""ModelSummary: Lightning's table of layers, parameter counts and estimated size.

The driver prints it when ``fit`` starts, from the driver's copy of the module (the
workers hold copies of the same weights); layers that ``configure_model`` builds exist on
the workers only and are not listed. With ``example_input_array`` set on the module, the
driver runs it through the module once (no gradients, eval mode) for the in/out sizes and
FLOPs columns, as Lightning does on rank 0.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

import torch
from torch import nn

from raylight.callbacks.callback import Callback

_UNITS = [" ", "K", "M", "B", "T"]
_UNKNOWN_SIZE = "?"
# Weights stay float32 under raylight's precisions ("32-true", and the "-mixed" ones autocast
# only the forward), so the estimate uses 4 bytes per parameter.
_BYTES_PER_PARAMETER = 4


class ModelSummary(Callback):
    """``ModelSummary(max_depth=1)``: ``max_depth=-1`` lists every module, ``0`` turns the
    table off. ``Trainer(enable_model_summary=True)`` (the default) adds one when the
    callbacks hold none. Lightning's extra ``summarize_kwargs`` are accepted and unused."""

    def __init__(self, max_depth: int = 1, **summarize_kwargs: Any) -> None:
        if not isinstance(max_depth, int) or max_depth < -1:
            raise ValueError(f"`max_depth` can be -1, 0 or > 0, got {max_depth}.")
        self._max_depth = max_depth

    def _on_driver_fit_start(self, trainer: Any, model: nn.Module) -> None:
        if not self._max_depth:
            return
        print("\n" + summary_table(model, self._max_depth), file=sys.stderr, flush=True)


def summary_table(model: nn.Module, max_depth: int = 1) -> str:
    """The table Lightning's ``ModelSummary`` prints, for ``model`` as it is now."""
    from torch.utils.flop_counter import FlopCounterMode  # costly to import; needed here only

    layers = _layers(model, max_depth)
    flops = FlopCounterMode(display=False, depth=max_depth + 1)
    sizes = _example_sizes(model, layers, flops)
    counts = flops.get_flop_counts()
    root = type(model).__name__
    columns = [
        (" ", [str(i) for i in range(len(layers))]),
        ("Name", list(layers)),
        ("Type", [type(m).__name__ for m in layers.values()]),
        ("Params", [_readable(_num_parameters(m)) for m in layers.values()]),
        ("Mode", ["train" if m.training else "eval" for m in layers.values()]),
        ("FLOPs", [_readable(sum(counts.get(f"{root}.{n}", {}).values())) for n in layers]),
    ]
    if sizes is not None:
        columns.append(("In sizes", [str(sizes.get(n, (_UNKNOWN_SIZE,) * 2)[0]) for n in layers]))
        columns.append(("Out sizes", [str(sizes.get(n, (_UNKNOWN_SIZE,) * 2)[1]) for n in layers]))
    total = _num_parameters(model)
    leftover = total - sum(_num_parameters(m) for m in layers.values())
    if leftover > 0:  # parameters held by the module itself, outside any listed layer
        extra = {" ": " ", "Name": "other params", "Params": _readable(leftover)}
        for header, values in columns:
            values.append(extra.get(header, "n/a"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    modes = [m.training for m in model.modules()][1:]
    return _format(columns, total, trainable, modes, flops.get_total_flops())


def _layers(model: nn.Module, max_depth: int) -> dict[str, nn.Module]:
    if max_depth == 0:
        return {}
    if max_depth == 1:
        return dict(model.named_children())
    named = list(model.named_modules())[1:]  # the root module is not a row
    return {n: m for n, m in named if max_depth == -1 or n.count(".") < max_depth}


def _num_parameters(module: nn.Module) -> int:
    return sum(
        p.numel()
        for p in module.parameters()
        if not isinstance(p, nn.parameter.UninitializedParameter)
    )


def _example_sizes(
    model: nn.Module, layers: dict[str, nn.Module], flops: Any
) -> dict[str, tuple[Any, Any]] | None:
    """Each layer's (input, output) shapes from one forward of ``example_input_array``;
    None when the module has none."""
    example = getattr(model, "example_input_array", None)
    if example is None:
        return None
    sizes: dict[str, tuple[Any, Any]] = {}

    def recorder(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            inputs = (*args, *kwargs.values())
            sizes.setdefault(
                name, (_shape(inputs[0] if len(inputs) == 1 else inputs), _shape(output))
            )

        return hook

    handles = [m.register_forward_hook(recorder(n), with_kwargs=True) for n, m in layers.items()]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), flops:
            if isinstance(example, list | tuple):
                model(*example)
            elif isinstance(example, dict):
                model(**example)
            else:
                model(example)
    except Exception as error:  # the driver's copy may lack what the workers build
        warnings.warn(
            f"ModelSummary could not run example_input_array through the driver's copy of "
            f"{type(model).__name__} ({type(error).__name__}: {error}); sizes show as "
            f"{_UNKNOWN_SIZE!r} and FLOPs as 0.",
            UserWarning,
            stacklevel=2,
        )
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return sizes


def _shape(value: Any) -> Any:
    if hasattr(value, "shape"):
        return list(value.shape)
    if isinstance(value, list | tuple):
        return [_shape(v) for v in value]
    return _UNKNOWN_SIZE


def _format(
    columns: list[tuple[str, list[str]]],
    total: int,
    trainable: int,
    modes: list[bool],
    total_flops: int,
) -> str:
    """Lightning's layout, character for character."""
    rows = len(columns[0][1])
    widths = [max([len(header), *(len(v) for v in values)]) for header, values in columns]
    width = sum(widths) + 3 * (1 + len(columns))
    lines = [" | ".join(f"{h:<{w}}" for (h, _), w in zip(columns, widths, strict=True))]
    lines.append("-" * width)
    for i in range(rows):
        cells = [f"{values[i]:<{w}}" for (_, values), w in zip(columns, widths, strict=True)]
        lines.append(" | ".join(cells))
    lines.append("-" * width)
    size_mb = total * _BYTES_PER_PARAMETER * 1e-6
    for value, label in (
        (_readable(trainable), "Trainable params"),
        (_readable(total - trainable), "Non-trainable params"),
        (_readable(total), "Total params"),
        (f"{size_mb:,.3f}", "Total estimated model params size (MB)"),
        (modes.count(True), "Modules in train mode"),
        (modes.count(False), "Modules in eval mode"),
        (_readable(total_flops), "Total Flops"),
    ):
        lines.append(f"{value!s:<10}{label}")
    return "\n".join(lines)


def _readable(number: int | float) -> str:
    """``123  ``, ``1.2 K``, ``2.0 M``, ``400 T``: Lightning's abbreviation."""
    digits = int(math.floor(math.log10(number)) + 1 if number > 0 else 1)
    groups = min(int(math.ceil(digits / 3)), len(_UNITS))
    number = number * (10 ** (-3 * (groups - 1)))
    index = groups - 1
    if index < 1 or number >= 100:
        return f"{int(number):,d} {_UNITS[index]}"
    return f"{number:,.1f} {_UNITS[index]}"
