"""A job that separates is analysed from its stems: the state machine asks for the analysis once they exist."""

from datetime import UTC, datetime, timedelta

from gateway import lifecycle
from stemflow_shared.events import (
    ANALYSIS_COMPLETED,
    ANALYSIS_REQUESTED,
    AUDIO_INGESTED,
    SEPARATION_COMPLETED,
    SEPARATION_FAILED,
    AnalysisCompleted,
    AnalysisResult,
    AudioInfo,
    AudioIngested,
    ErrorInfo,
    JobOptions,
    SeparationCompleted,
    SourceInfo,
    StageFailed,
    StemInfo,
    Target,
    make_event,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
AUDIO = AudioInfo(blob_key="a", duration_s=10, sample_rate=44100, channels=2, frames=441000, fingerprint="f")
STEMS = [
    StemInfo(name=name, format="wav", media_type="audio/wav", blob_key=f"s/{name}", size=1, duration_s=10)
    for name in ("drums", "bass", "other", "vocals")
]


def job(**options: object) -> dict:
    return lifecycle.new_job("j1", "alice", JobOptions(**options), {"blob_key": "k"}, now=NOW, retention=timedelta(1))


def apply(doc: dict, spec, data) -> tuple[dict, list[str], lifecycle.Transition | None]:
    change = lifecycle.apply(doc, make_event(spec, data, source="/t"), NOW)
    if change is None:
        return doc, [], None
    return lifecycle._merged(doc, change.set), [e.spec.name for e in change.emit], change


def ingested(reused: bool = False, **options: object) -> AudioIngested:
    source = SourceInfo(format="WAV", sample_rate=48000, channels=1, duration_s=10)
    return AudioIngested(job_id="j1", owner="alice", options=JobOptions(**options), audio=AUDIO, source=source,
                         reused=reused)  # fmt: skip


def separated(target: str | None = None) -> SeparationCompleted:
    return SeparationCompleted(job_id="j1", target=target, model="htdemucs", device="cpu", precision="float32",
                               stems=STEMS)  # fmt: skip


def analysed() -> AnalysisCompleted:
    result = AnalysisResult(tempo_bpm=120, tempo_confidence=0.9, key="A minor", key_confidence=0.8, loudness_lufs=-14,
                            true_peak_dbfs=-1, rms_dbfs=-16, duration_s=10, beat_count=20, source="stems")  # fmt: skip
    return AnalysisCompleted(job_id="j1", analysis=result)


def test_the_stems_bring_the_analysis_request_and_the_job_waits_for_it() -> None:
    doc, _, _ = apply(job(), AUDIO_INGESTED, ingested())
    doc, names, change = apply(doc, SEPARATION_COMPLETED, separated())

    assert names == ["job.progress", "analysis.requested"]
    request = change.emit[-1]
    assert request.spec is ANALYSIS_REQUESTED
    assert request.data.audio == AUDIO and request.data.stems == STEMS
    # Not done on the mix's reading: the analysis stage still runs, and the job with it.
    assert doc["stages"]["analysis"]["status"] == "running" and doc["status"] == "processing"
    doc, names, _ = apply(doc, ANALYSIS_COMPLETED, analysed())
    assert doc["status"] == "completed" and names == ["job.progress", "job.completed"]
    assert doc["result"]["analysis"]["source"] == "stems"


def test_a_repeated_separation_event_asks_once() -> None:
    doc, _, _ = apply(job(), AUDIO_INGESTED, ingested())
    doc, _, _ = apply(doc, SEPARATION_COMPLETED, separated())
    assert apply(doc, SEPARATION_COMPLETED, separated())[2] is None


def test_no_request_without_an_analysis_or_for_a_reused_job() -> None:
    doc, _, _ = apply(job(analyze=False), AUDIO_INGESTED, ingested(analyze=False))
    assert "analysis.requested" not in apply(doc, SEPARATION_COMPLETED, separated())[1]
    # Ingest publishes a reused job's earlier (stems-informed) analysis itself.
    doc, _, _ = apply(job(), AUDIO_INGESTED, ingested(reused=True))
    doc, names, _ = apply(doc, SEPARATION_COMPLETED, separated())
    assert "analysis.requested" not in names


def test_a_failed_separation_asks_for_nothing() -> None:
    doc, _, _ = apply(job(), AUDIO_INGESTED, ingested())
    failed = StageFailed(job_id="j1", error=ErrorInfo(code="out_of_memory", message="m"))
    doc, names, _ = apply(doc, SEPARATION_FAILED, failed)
    assert doc["status"] == "failed" and "analysis.requested" not in names


def test_a_job_with_several_targets_asks_once_all_have_ended() -> None:
    targets = [Target(model="htdemucs", stems=4), Target(model="htdemucs_6s", stems=6)]
    doc, _, _ = apply(job(targets=targets), AUDIO_INGESTED, ingested())
    first, second = doc["targets"]
    doc, names, _ = apply(doc, SEPARATION_COMPLETED, separated(first))
    assert "analysis.requested" not in names
    doc, names, change = apply(doc, SEPARATION_FAILED, StageFailed(job_id="j1", target=second,
                                                                    error=ErrorInfo(code="x", message="m")))  # fmt: skip
    assert names[-1] == "analysis.requested" and change.emit[-1].data.stems == STEMS
