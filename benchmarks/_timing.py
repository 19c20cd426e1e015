"""What the benchmark scripts share: best-of-N wall time, and the end of a run."""

from __future__ import annotations

import json
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


def finish(results: dict[str, Any], json_path: str | None) -> None:
    """End a run: write every number to ``json_path`` (when given), then fail the script if
    the run recorded an ``error`` (what was measured before it is reported first)."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
        print(f"numbers written to {json_path}")
    if "error" in results:
        raise SystemExit(f"the run failed: {results['error']}")
