"""What the benchmark scripts share: best-of-N wall time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], Any], repeat: int = 2) -> float:
    """Best wall time of ``repeat`` runs, in seconds (the first run of a new file or mapping
    pays page-cache / page-table setup)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
