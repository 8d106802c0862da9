"""Lightning's ``utilities.imports`` flags that public code reads to choose optional paths
(``if _TORCHVISION_AVAILABLE: ...``): true when the package is installed, and for the
versioned names when its version is at least the one named."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys


def _installed(package: str, minimum: str | None = None) -> bool:
    if importlib.util.find_spec(package) is None:
        return False
    if minimum is None:
        return True
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return _release(version) >= _release(minimum)


def _release(version: str) -> tuple[int, ...]:
    """``2.14.1+cu130`` -> (2, 14, 1), ``1.0.0rc1`` -> (1, 0, 0): the release numbers."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


_PYTHON_GREATER_EQUAL_3_11_0 = sys.version_info >= (3, 11)
_TORCH_GREATER_EQUAL_2_6 = _installed("torch", "2.6.0")
_TORCH_GREATER_EQUAL_2_8 = _installed("torch", "2.8.0")
_TORCHMETRICS_GREATER_EQUAL_0_8_0 = _installed("torchmetrics", "0.8.0")
_TORCHMETRICS_GREATER_EQUAL_0_9_1 = _installed("torchmetrics", "0.9.1")
_TORCHMETRICS_GREATER_EQUAL_0_11 = _installed("torchmetrics", "0.11.0")
_TORCHMETRICS_GREATER_EQUAL_1_0_0 = _installed("torchmetrics", "1.0.0")
_OMEGACONF_AVAILABLE = _installed("omegaconf")
_TORCHVISION_AVAILABLE = _installed("torchvision")
_RICH_AVAILABLE = _installed("rich", "10.2.2")
