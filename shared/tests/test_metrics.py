"""The runtime metrics every service exports besides its own."""

from __future__ import annotations

import gc

from stemflow_shared.metrics import REGISTRY


def pauses(generation: int) -> tuple[float, float]:
    labels = {"generation": str(generation)}
    count = REGISTRY.get_sample_value("stemflow_gc_pause_seconds_count", labels) or 0.0
    total = REGISTRY.get_sample_value("stemflow_gc_pause_seconds_sum", labels) or 0.0
    return count, total


def test_every_garbage_collection_is_timed_by_generation() -> None:
    gc.disable()  # only the collections asked for below: an automatic one would count too
    try:
        before_full, before_young = pauses(2), pauses(0)
        garbage = [[] for _ in range(10_000)]
        for item in garbage:
            item.append(item)  # cycles: only the collector frees them
        del garbage
        gc.collect()
        gc.collect(0)
        full, young = pauses(2), pauses(0)
    finally:
        gc.enable()
    assert full[0] == before_full[0] + 1 and full[1] > before_full[1]
    assert young[0] >= before_young[0] + 1
