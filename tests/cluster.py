"""The tests' multi-node clusters come from the launch script users run by hand."""

import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
)

from local_cluster import LocalCluster, can_hide_paths  # noqa: E402

__all__ = ["LocalCluster", "can_hide_paths"]
