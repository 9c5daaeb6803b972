"""The result index on a real Redis."""

from typing import Any

from stemflow_shared.events import JobCompleted, JobOptions, StemInfo
from stemflow_shared.reuse import ResultIndex, SeparationSummary, result_key


def test_the_key_depends_on_the_options_that_shape_results_only() -> None:
    base = result_key("fp", JobOptions())
    assert base == result_key("fp", JobOptions(priority="high", callback_url="https://x"))
    assert base != result_key("fp", JobOptions(stems=2))
    assert base != result_key("fp", JobOptions(quality="best"))
    assert base != result_key("fp2", JobOptions())


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
