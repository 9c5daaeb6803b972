"""Garbage-collector settings of the long-running services: full collections kept rare."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from stemflow_shared.runtime import GC_FULL_AFTER, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_full_collections_wait_for_many_more_young_ones(restored_gc: None) -> None:
    young, middle, _ = gc.get_threshold()
    tune_gc()
    assert gc.get_threshold() == (young, middle, GC_FULL_AFTER)
    assert GC_FULL_AFTER >= 100 * 10  # CPython's default is 10


def test_start_up_objects_are_left_out_of_later_collections(restored_gc: None) -> None:
    tune_gc()
    assert gc.get_freeze_count() > 10_000  # the imported modules, classes and functions
    # A full collection now walks only what was made after start-up.
    assert len(gc.get_objects(generation=2)) < 1_000
