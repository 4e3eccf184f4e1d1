"""Timing shared by the benchmarks."""

from __future__ import annotations

import time
from typing import Callable


def best_of_rounds(repeat: int, contenders: dict[str, Callable[[], object]]) -> dict[str, float]:
    """``{name: best time in seconds}`` over ``repeat`` rounds, each round timing every
    contender once, in turn: a machine whose speed drifts (a shared VM) then slows all
    rows alike rather than the one that happened to run in a slow patch."""
    best = {name: float("inf") for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best
