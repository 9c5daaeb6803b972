"""Reusing a finished job's results (ingest's `_reuse`) on a real Redis and a blob store on disk."""

from pathlib import Path
from typing import Any

from ingest.handlers import Ingest
from ingest.settings import Settings
from stemflow_shared.events import (
    AudioInfo,
    AudioIngested,
    InputRef,
    JobCompleted,
    JobOptions,
    JobSubmitted,
    SourceInfo,
    StemInfo,
)
from stemflow_shared.reuse import ResultIndex, SeparationSummary
from stemflow_shared.storage import FilesystemBlobStore, stem_key

OPTIONS = JobOptions(stems=2, output_format="wav", analyze=False)


def stem(job_id: str, name: str) -> StemInfo:
    return StemInfo(
        name=name, format="wav", media_type="audio/wav", blob_key=stem_key(job_id, name, "wav"), size=4, duration_s=1.0
    )


def ingested(job_id: str) -> AudioIngested:
    return AudioIngested(
        job_id=job_id,
        owner="o",
        options=OPTIONS,
        audio=AudioInfo(
            blob_key=f"jobs/{job_id}/audio.wav",
            duration_s=1.0,
            sample_rate=44100,
            channels=2,
            frames=44100,
            fingerprint="fp",
        ),
        source=SourceInfo(format="WAV", sample_rate=44100, channels=2, duration_s=1.0),
    )


async def test_a_stale_entry_removes_only_the_copies_it_made(
    tmp_path: Path, stack: Any, redis_client: Any, isolation: Any
) -> None:
    # The earlier job lost its second stem under the index entry (deleted meanwhile). This job's delivery is a
    # redelivery: its own separation already published a stem, which the abandoned reuse must leave in place.
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    index = ResultIndex(redis_client, isolation.redis_prefix, ttl_s=60)
    source = tmp_path / "stem.wav"
    source.write_bytes(b"RIFF")
    await blobs.put_file(stem_key("old", "vocals", "wav"), source)
    await index.remember(
        "fp",
        OPTIONS,
        JobCompleted(job_id="old", owner="o", stems=[stem("old", "vocals"), stem("old", "no_vocals")]),
        SeparationSummary(model="htdemucs", device="cpu", precision="float32", untrained=True),
    )
    own = stem_key("new", "no_vocals", "wav")
    await blobs.put_file(own, source)
    settings = Settings(redis_url=stack.redis_url, amqp_url=stack.amqp_url, blob_dir=str(tmp_path / "blobs"))
    ingest = Ingest(blobs, redis_client, None, settings, results=index)
    job = JobSubmitted(job_id="new", owner="o", options=OPTIONS, input=InputRef(blob_key="uploads/new"))

    assert await ingest._reuse(job, ingested("new")) is None
    assert await blobs.exists(own)
    assert not await blobs.exists(stem_key("new", "vocals", "wav"))
