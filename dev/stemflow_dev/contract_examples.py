"""One realistic payload of every event, for the generated contract's examples and its tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from stemflow_shared.events import (
    ANALYSIS_COMPLETED,
    ANALYSIS_FAILED,
    ANALYSIS_REQUESTED,
    AUDIO_INGESTED,
    INGEST_FAILED,
    JOB_CANCELLED,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_MIX_COMPLETED,
    JOB_MIX_FAILED,
    JOB_MIX_PROGRESS,
    JOB_PROGRESS,
    JOB_SUBMITTED,
    MIX_COMPLETED,
    MIX_FAILED,
    MIX_PROGRESS,
    MIX_REQUESTED,
    SEPARATION_COMPLETED,
    SEPARATION_FAILED,
    SEPARATION_PROGRESS,
    AnalysisCompleted,
    AnalysisRequested,
    AnalysisResult,
    AudioInfo,
    AudioIngested,
    ErrorInfo,
    EventSpec,
    InputRef,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobMixChanged,
    JobOptions,
    JobProgressed,
    JobSubmitted,
    KeyAlternative,
    MixCompleted,
    MixFailed,
    MixFile,
    MixOptions,
    MixProgress,
    MixRequested,
    MixState,
    MixStem,
    Progress,
    SeparationCompleted,
    SeparationProgress,
    SourceInfo,
    StageFailed,
    StageProgress,
    StemInfo,
    TempoAlternative,
    event_id,
)

JOB = "019b7f3a2c10d2e4f6a8b0c1d2e3f4a5"
OWNER = "radio-team"
OPTIONS = JobOptions(stems=4, quality="fast", output_format="flac")


def example_id(spec: EventSpec[Any]) -> str:
    return event_id(JOB, spec.name)


def _stems() -> list[StemInfo]:
    return [
        StemInfo(
            name=name,
            format="flac",
            media_type="audio/flac",
            blob_key=f"jobs/{JOB}/stems/{name}.flac",
            size=size,
            duration_s=30.0,
        )
        for name, size in (("drums", 2_811_902), ("bass", 1_530_114), ("other", 3_020_447), ("vocals", 2_407_390))
    ]


def _analysis() -> AnalysisResult:
    return AnalysisResult(
        tempo_bpm=120.0,
        tempo_confidence=0.91,
        key="A minor",
        key_confidence=0.74,
        loudness_lufs=-9.8,
        true_peak_dbfs=-0.6,
        rms_dbfs=-12.4,
        duration_s=30.0,
        beat_count=60,
        beats=[0.25, 0.75, 1.25, 1.75],
        energy=[0.12, 0.4, 0.38],
        tempo_alternatives=[TempoAlternative(bpm=60.0, confidence=0.06)],
        key_alternatives=[KeyAlternative(key="C major", confidence=0.61)],
        downbeats=[0.25, 2.25],
        meter=4,
    )


def _progress(overall: float, separation: float) -> Progress:
    return Progress(
        overall=overall,
        ingest=StageProgress(status="completed", percent=100.0),
        separation=StageProgress(status="running", percent=separation),
        analysis=StageProgress(status="running", percent=0.0),
    )


def examples() -> Iterator[tuple[EventSpec[Any], Any, str]]:
    """(event, data, source) for every event of the contract, in the contract's order."""
    audio = AudioInfo(
        blob_key=f"jobs/{JOB}/audio.wav",
        duration_s=30.0,
        sample_rate=44100,
        channels=2,
        frames=1_323_000,
        fingerprint="b3a1c9e07f3d5e2a",
    )
    source = SourceInfo(format="FLAC", sample_rate=48000, channels=2, duration_s=30.0, bits_per_sample=24)
    url = InputRef(source_url="https://media.example.com/songs/demo.flac")
    yield JOB_SUBMITTED, JobSubmitted(job_id=JOB, owner=OWNER, options=OPTIONS, input=url), "/radio/catalogue"
    ingested = AudioIngested(job_id=JOB, owner=OWNER, options=OPTIONS, audio=audio, source=source)
    yield AUDIO_INGESTED, ingested, "/stemflow/ingest"
    not_audio = ErrorInfo(code="not_audio", message="the file is not in an audio format we recognise")
    yield INGEST_FAILED, StageFailed(job_id=JOB, error=not_audio), "/stemflow/ingest"
    yield SEPARATION_PROGRESS, SeparationProgress(job_id=JOB, percent=42.5), "/stemflow/separator"
    separated = SeparationCompleted(
        job_id=JOB,
        model="htdemucs",
        device="cuda",
        precision="float16",
        stems=_stems(),
        reconstruction_error_db=-38.2,
    )
    yield SEPARATION_COMPLETED, separated, "/stemflow/separator"
    oom = ErrorInfo(code="out_of_memory", message="the device ran out of memory")
    yield SEPARATION_FAILED, StageFailed(job_id=JOB, error=oom), "/stemflow/separator"
    yield ANALYSIS_COMPLETED, AnalysisCompleted(job_id=JOB, analysis=_analysis()), "/stemflow/analyzer"
    missing = ErrorInfo(code="audio_missing", message="the normalised audio is gone")
    yield ANALYSIS_FAILED, StageFailed(job_id=JOB, error=missing), "/stemflow/analyzer"
    yield ANALYSIS_REQUESTED, AnalysisRequested(job_id=JOB, audio=audio, stems=_stems()), "/stemflow/gateway"
    progressed = JobProgressed(job_id=JOB, owner=OWNER, status="processing", progress=_progress(38.5, 41.0))
    yield JOB_PROGRESS, progressed, "/stemflow/gateway"
    completed = JobCompleted(job_id=JOB, owner=OWNER, stems=_stems(), analysis=_analysis())
    yield JOB_COMPLETED, completed, "/stemflow/gateway"
    failed = ErrorInfo(code="fetch_failed", message="the source answered HTTP 404")
    yield JOB_FAILED, JobFailed(job_id=JOB, owner=OWNER, error=failed), "/stemflow/gateway"
    yield JOB_CANCELLED, JobCancelled(job_id=JOB, owner=OWNER), "/stemflow/gateway"
    yield from _mix_examples()


def _mix_examples() -> Iterator[tuple[EventSpec[Any], Any, str]]:
    mix_id = "5f2a9c0e7b1d4a6c8e3f0a2b"
    options = MixOptions(preset="karaoke", tempo=0.75, semitones=-2, click=True, format="flac")
    stems = [MixStem(name=s.name, blob_key=s.blob_key, gain=0.0 if s.name == "vocals" else 1.0) for s in _stems()]
    requested = MixRequested(
        job_id=JOB,
        mix_id=mix_id,
        owner=OWNER,
        options=options,
        stems=stems,
        audio_key=f"jobs/{JOB}/audio.wav",
        beats=[0.52, 1.02, 1.52, 2.02],
        downbeats=[0.52],
        output_key=f"jobs/{JOB}/mixes/{mix_id}/mix.flac",
    )
    yield MIX_REQUESTED, requested, "/stemflow/gateway"
    yield MIX_PROGRESS, MixProgress(job_id=JOB, mix_id=mix_id, percent=60.0), "/stemflow/analyzer"
    file = MixFile(
        blob_key=f"jobs/{JOB}/mixes/{mix_id}/mix.flac",
        format="flac",
        media_type="audio/flac",
        size=3_911_882,
        duration_s=40.0,
        sample_rate=44100,
        bit_depth=24,
        loudness_lufs=-9.4,
        gain_db=1.8,
        render_s=1.6,
    )
    yield MIX_COMPLETED, MixCompleted(job_id=JOB, mix_id=mix_id, file=file), "/stemflow/analyzer"
    bad = ErrorInfo(code="stem_missing", message="the stem vocals is gone")
    yield MIX_FAILED, MixFailed(job_id=JOB, mix_id=mix_id, error=bad), "/stemflow/analyzer"
    running = MixState(id=mix_id, status="running", percent=60.0)
    yield JOB_MIX_PROGRESS, JobMixChanged(job_id=JOB, owner=OWNER, mix=running), "/stemflow/gateway"
    done = MixState(
        id=mix_id,
        status="completed",
        percent=100.0,
        format="flac",
        size=3_911_882,
        duration_s=40.0,
        path=f"/v1/jobs/{JOB}/mixes/{mix_id}/file",
    )
    yield JOB_MIX_COMPLETED, JobMixChanged(job_id=JOB, owner=OWNER, mix=done), "/stemflow/gateway"
    failed_mix = MixState(id=mix_id, status="failed", percent=10.0, error=bad)
    yield JOB_MIX_FAILED, JobMixChanged(job_id=JOB, owner=OWNER, mix=failed_mix), "/stemflow/gateway"
