"""The result index on a real Redis."""

from typing import Any

import pytest

from stemflow_shared.events import JobCompleted, JobOptions, StemInfo
from stemflow_shared.reuse import ResultIndex, SeparationSummary, result_key

# A value other than the default for every option that shapes results (a new shaping option needs one here).
SHAPING_CHANGES = {
    "stems": 2,
    "model": "htdemucs_ft",
    "quality": "best",
    "output_format": "flac",
    "analyze": False,
    "separate": False,
    "residual": True,
    "targets": "htdemucs:4,htdemucs_6s:6",
    "bit_depth": 16,
    "sample_rate": 48000,
}
NOT_SHAPING_CHANGES = {
    "priority": "high",
    "callback_url": "https://example.com/hook",
    "trim_start": 1.0,
    "trim_end": 9.0,
}


def test_every_option_is_classified_as_shaping_results_or_not() -> None:
    assert set(JobOptions.shaping_fields()) == set(SHAPING_CHANGES)
    assert set(JobOptions.model_fields) == set(SHAPING_CHANGES) | set(NOT_SHAPING_CHANGES)


@pytest.mark.parametrize(("option", "value"), SHAPING_CHANGES.items())
def test_each_shaping_option_changes_the_key(option: str, value: Any) -> None:
    assert result_key("fp", JobOptions(**{option: value})) != result_key("fp", JobOptions())


def test_the_key_ignores_what_does_not_shape_results() -> None:
    base = result_key("fp", JobOptions())
    assert base == result_key("fp", JobOptions(**NOT_SHAPING_CHANGES))
    assert base != result_key("fp2", JobOptions())


def test_an_option_without_a_marker_is_refused() -> None:
    from pydantic import create_model

    from stemflow_shared.events import _shaping_of

    extended = create_model("Extended", __base__=JobOptions, loudness_target=(float, -14.0))
    with pytest.raises(TypeError, match="Shaping marker"):
        [_shaping_of(field.metadata) for field in extended.model_fields.values()]


async def test_remember_and_lookup(redis_client: Any, isolation: Any) -> None:
    index = ResultIndex(redis_client, isolation.redis_prefix, ttl_s=60)
    stem = StemInfo(
        name="vocals", format="wav", media_type="audio/wav", blob_key="jobs/a/stems/vocals.wav", size=3, duration_s=1.0
    )
    done = JobCompleted(job_id="a", owner="o", stems=[stem])
    assert await index.lookup("fp", JobOptions()) is None
    how = SeparationSummary(model="htdemucs", device="cpu", precision="float32", untrained=True)
    await index.remember("fp", JobOptions(), done, how)
    found = await index.lookup("fp", JobOptions())
    assert found is not None and found.completed == done and found.separation == how and found.job_id == "a"
    assert await index.lookup("fp", JobOptions(stems=2)) is None
    await index.forget("fp", JobOptions())
    assert await index.lookup("fp", JobOptions()) is None


async def test_an_unreadable_entry_is_a_miss_and_is_dropped(redis_client: Any, isolation: Any) -> None:
    index = ResultIndex(redis_client, isolation.redis_prefix, ttl_s=60)
    key = f"{isolation.redis_prefix}result:{result_key('fp-bad', JobOptions())}"
    await redis_client.set(key, b'{"job_id": "old-format"}')
    assert await index.lookup("fp-bad", JobOptions()) is None
    assert await redis_client.exists(key) == 0
