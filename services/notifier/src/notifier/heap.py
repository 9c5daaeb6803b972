"""Garbage collection for a process that holds thousands of long-lived WebSockets.

Every connection is ~190 objects the collector tracks for as long as it is open,
so 10,000 clients make ~2 M, and a full collection walks all of them: seconds
during which no client gets anything (bench/notifier.py). Here whatever
survives a collection of the middle generation is frozen (`gc.freeze`): it has
outlived two collections, so it is long-lived (a connection, a subscription, a
cache entry), and frozen objects are never walked again. The oldest generation
therefore stays empty and no collection walks more than the two young ones
hold, at any number of clients.

Frozen objects are still freed by reference counting; only a cycle of frozen
objects that becomes garbage is never collected. A closed connection leaves no
cycle among the notifier's objects (tests/test_heap.py, tests/test_intake.py),
which is what makes freezing safe here, and neither does an answer of the
gateway or a webhook delivery (gateway_client.let_go_of_stream breaks httpx's
response-stream cycle; before, 26-30
requests caught in flight, 762-890 objects, stayed for ever after 10,000
clients had come and gone: bench/notifier.py counts and classifies them).
`gc.get_freeze_count()` is what to watch.
"""

from __future__ import annotations

import gc
from typing import Any


def freeze_survivors() -> None:
    """From now on, freeze whatever survives a collection of the middle (or oldest) generation."""
    if _freeze_survivors not in gc.callbacks:
        gc.callbacks.append(_freeze_survivors)


def stop_freezing() -> None:
    """Undo `freeze_survivors`."""
    if _freeze_survivors in gc.callbacks:
        gc.callbacks.remove(_freeze_survivors)


def _freeze_survivors(phase: str, info: dict[str, Any]) -> None:
    if phase == "stop" and info["generation"] >= 1:
        gc.freeze()
