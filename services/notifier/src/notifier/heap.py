"""Garbage collection for a process that holds thousands of long-lived WebSockets.

Every connection is ~190 objects the collector tracks for as long as it is open,
so 10,000 clients make ~2 M, and a full collection walks all of them: seconds
during which no client gets anything (bench/notifier.py). Here a full collection
runs after every middle one, and whatever survives it is frozen (`gc.freeze`):
a survivor of a full collection is long-lived, and frozen objects are never
walked again. Each full collection therefore walks only what the last few
middle collections kept, so pauses stay short at any number of clients.

Frozen objects are still freed by reference counting; only a cycle of frozen
objects that becomes garbage is never collected. The notifier leaves no cycles
behind when a connection closes (tests/test_heap.py), which is what makes
freezing safe here; `gc.get_freeze_count()` is what to watch.
"""

from __future__ import annotations

import gc
from typing import Any

# A full collection is considered after every collection of the middle generation (CPython then still waits
# until what those promoted is at least a quarter of what the last full one kept, which it froze).
FULL_AFTER_MIDDLE = 0


def freeze_survivors() -> None:
    """From now on, collect the whole (unfrozen) heap often and freeze what survives each such collection."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_AFTER_MIDDLE)
    if _freeze_after_full not in gc.callbacks:
        gc.callbacks.append(_freeze_after_full)


def stop_freezing() -> None:
    """Undo `freeze_survivors`'s callback (the thresholds are left as they are)."""
    if _freeze_after_full in gc.callbacks:
        gc.callbacks.remove(_freeze_after_full)


def _freeze_after_full(phase: str, info: dict[str, Any]) -> None:
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()
