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


def stage_samples(stage: str, model: str, outcome: str, code: str) -> tuple[float, float, float, float]:
    return (
        REGISTRY.get_sample_value(
            "stemflow_stage_duration_seconds_count", {"stage": stage, "model": model, "outcome": outcome}
        )
        or 0.0,
        REGISTRY.get_sample_value("stemflow_stage_failures_total", {"stage": stage, "code": code}) or 0.0,
        REGISTRY.get_sample_value("stemflow_audio_seconds_processed_total", {"stage": stage}) or 0.0,
        REGISTRY.get_sample_value("stemflow_realtime_factor_count", {"stage": stage}) or 0.0,
    )


def test_a_stage_run_records_its_outcome_one_way() -> None:
    from stemflow_shared.metrics import StageRun

    before_ok = stage_samples("unit", "m", "completed", "none")
    assert StageRun("unit", "m").completed(12.5) >= 0
    after_ok = stage_samples("unit", "m", "completed", "none")
    assert [a - b for a, b in zip(after_ok, before_ok, strict=True)] == [1, 0, 12.5, 1]

    before_failed = stage_samples("unit", "m", "failed", "broken")
    StageRun("unit", "m").failed("broken")
    after_failed = stage_samples("unit", "m", "failed", "broken")
    assert [a - b for a, b in zip(after_failed, before_failed, strict=True)] == [1, 1, 0, 0]
