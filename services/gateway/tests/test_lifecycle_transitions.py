"""The job state machine, as pure functions."""

from datetime import UTC, datetime, timedelta

from gateway import lifecycle
from stemflow_shared.events import (
    ANALYSIS_COMPLETED,
    AUDIO_INGESTED,
    INGEST_FAILED,
    SEPARATION_COMPLETED,
    SEPARATION_FAILED,
    SEPARATION_PROGRESS,
    AnalysisCompleted,
    AnalysisResult,
    AudioInfo,
    AudioIngested,
    ErrorInfo,
    JobOptions,
    SeparationCompleted,
    SeparationProgress,
    SourceInfo,
    StageFailed,
    StemInfo,
    make_event,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def job(**options: object) -> dict:
    opts = JobOptions(**options)
    return lifecycle.new_job("j1", "alice", opts, {"blob_key": "k"}, now=NOW, retention=timedelta(days=1))


def apply(doc: dict, spec, data) -> tuple[dict, lifecycle.Transition | None]:
    change = lifecycle.apply(doc, make_event(spec, data, source="/t"), NOW)
    if change is None:
        return doc, None
    merged = lifecycle._merged(doc, change.set)
    return merged, change


def ingested() -> AudioIngested:
    return AudioIngested(
        job_id="j1",
        owner="alice",
        options=JobOptions(),
        audio=AudioInfo(blob_key="a", duration_s=10, sample_rate=44100, channels=2, frames=441000, fingerprint="f"),
        source=SourceInfo(format="WAV", sample_rate=48000, channels=1, duration_s=10),
    )


def separated() -> SeparationCompleted:
    stem = StemInfo(name="vocals", format="wav", media_type="audio/wav", blob_key="s", size=1, duration_s=10)
    return SeparationCompleted(job_id="j1", model="htdemucs", device="cpu", precision="float32", stems=[stem])


def analysed() -> AnalysisCompleted:
    result = AnalysisResult(
        tempo_bpm=120,
        tempo_confidence=0.9,
        key="A minor",
        key_confidence=0.8,
        loudness_lufs=-14,
        true_peak_dbfs=-1,
        rms_dbfs=-16,
        duration_s=10,
        beat_count=20,
    )
    return AnalysisCompleted(job_id="j1", analysis=result)


def test_a_job_completes_when_every_stage_it_runs_has_completed() -> None:
    doc, change = apply(job(), AUDIO_INGESTED, ingested())
    assert doc["status"] == "processing" and doc["progress"] == 10.0
    assert [e.spec.name for e in change.emit] == ["job.progress"]
    doc, _ = apply(doc, SEPARATION_PROGRESS, SeparationProgress(job_id="j1", percent=50))
    assert doc["progress"] == 45.0
    doc, change = apply(doc, SEPARATION_COMPLETED, separated())
    assert doc["status"] == "processing"
    doc, change = apply(doc, ANALYSIS_COMPLETED, analysed())
    assert doc["status"] == "completed" and doc["progress"] == 100.0
    assert [e.spec.name for e in change.emit] == ["job.progress", "job.completed"]
    completed = change.emit[1].data
    assert completed.stems[0].name == "vocals" and completed.analysis.key == "A minor"


def test_late_and_duplicate_events_never_move_a_job_backwards() -> None:
    doc, _ = apply(job(), AUDIO_INGESTED, ingested())
    doc, _ = apply(doc, SEPARATION_PROGRESS, SeparationProgress(job_id="j1", percent=60))
    _, change = apply(doc, SEPARATION_PROGRESS, SeparationProgress(job_id="j1", percent=40))
    assert change is None
    _, change = apply(doc, AUDIO_INGESTED, ingested())
    assert change is None
    doc, _ = apply(doc, SEPARATION_COMPLETED, separated())
    _, change = apply(doc, SEPARATION_PROGRESS, SeparationProgress(job_id="j1", percent=99))
    assert change is None
    doc, _ = apply(doc, ANALYSIS_COMPLETED, analysed())
    for spec, data in ((SEPARATION_COMPLETED, separated()), (ANALYSIS_COMPLETED, analysed())):
        assert lifecycle.apply(doc, make_event(spec, data, source="/t"), NOW) is None


def test_a_failed_stage_fails_the_job_once_with_its_error() -> None:
    failed = StageFailed(job_id="j1", error=ErrorInfo(code="not_audio", message="nope"))
    doc, change = apply(job(), INGEST_FAILED, failed)
    assert doc["status"] == "failed" and doc["error"]["code"] == "not_audio"
    assert doc["stages"]["separation"]["status"] == "skipped"
    assert [e.spec.name for e in change.emit] == ["job.progress", "job.failed"]
    assert lifecycle.apply(doc, make_event(AUDIO_INGESTED, ingested(), source="/t"), NOW) is None


def test_skipped_stages_carry_no_weight() -> None:
    doc, _ = apply(job(separate=False), AUDIO_INGESTED, ingested())
    assert doc["stages"]["separation"]["status"] == "skipped"
    doc, _ = apply(doc, ANALYSIS_COMPLETED, analysed())
    assert doc["status"] == "completed" and doc["progress"] == 100.0


def test_terminal_events_have_stable_ids_so_republishing_is_deduplicated() -> None:
    doc, _ = apply(job(separate=False), AUDIO_INGESTED, ingested())
    first = lifecycle.apply(doc, make_event(ANALYSIS_COMPLETED, analysed(), source="/t"), NOW)
    again = lifecycle.apply(doc, make_event(ANALYSIS_COMPLETED, analysed(), source="/t"), NOW)
    assert first.emit[-1].id == again.emit[-1].id


def test_cancel_only_applies_to_unfinished_jobs() -> None:
    change = lifecycle.cancel(job(), NOW)
    assert change.set["status"] == "cancelled"
    assert [e.spec.name for e in change.emit] == ["job.progress", "job.cancelled"]
    done = lifecycle._merged(job(), change.set)
    assert lifecycle.cancel(done, NOW) is None


def test_job_ids_sort_by_creation_time() -> None:
    ids = [lifecycle.new_job_id(1_700_000_000 + i) for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5 and all(len(i) == 32 for i in ids)


def test_a_job_without_change_for_the_timeout_fails_in_the_stage_that_stalled() -> None:
    doc, _ = apply(job(), AUDIO_INGESTED, ingested())
    doc, _ = apply(doc, SEPARATION_COMPLETED, separated())  # analysis still running
    assert lifecycle.time_out(doc, NOW + timedelta(seconds=599), 600) is None  # not yet
    change = lifecycle.time_out(doc, NOW + timedelta(seconds=600), 600)
    assert change is not None
    after = lifecycle._merged(doc, change.set)
    assert after["status"] == "failed" and after["error"]["code"] == "stage_timeout"
    assert "analysis" in after["error"]["message"]
    assert after["stages"]["separation"]["status"] == "completed"
    assert after["stages"]["analysis"]["status"] == "failed"
    assert lifecycle.stalled_stage(after) == "analysis"
    assert [e.spec.name for e in change.emit] == ["job.progress", "job.failed"]
    assert change.emit[-1].data.error.code == "stage_timeout"
    # The first unfinished stage is the one blamed; those after it are skipped, and a finished job never times out.
    queued = lifecycle.time_out(job(), NOW + timedelta(hours=2), 600)
    stages = lifecycle._merged(job(), queued.set)["stages"]
    assert [stages[s]["status"] for s in lifecycle.STAGES] == ["failed", "skipped", "skipped"]
    assert lifecycle.time_out(after, NOW + timedelta(days=1), 600) is None


def _target_done(name: str, stem: str) -> SeparationCompleted:
    info = StemInfo(name=stem, format="wav", media_type="audio/wav", blob_key=f"s/{name}", size=1, duration_s=10)
    return SeparationCompleted(
        job_id="j1", target=name, model=name.split("-")[0], device="cpu", precision="float32", stems=[info]
    )


def test_several_targets_each_have_their_own_status_and_result() -> None:
    doc = job(targets="htdemucs:4,htdemucs_6s:6", analyze=False)
    assert list(doc["targets"]) == ["htdemucs-4", "htdemucs_6s-6"]
    doc, _ = apply(doc, AUDIO_INGESTED, ingested())
    assert {t["status"] for t in doc["targets"].values()} == {"running"}
    doc, _ = apply(doc, SEPARATION_PROGRESS, SeparationProgress(job_id="j1", target="htdemucs_6s-6", percent=50))
    assert doc["targets"]["htdemucs_6s-6"]["percent"] == 50.0 and doc["stages"]["separation"]["percent"] == 25.0
    doc, change = apply(doc, SEPARATION_COMPLETED, _target_done("htdemucs_6s-6", "guitar"))
    assert doc["status"] == "processing" and doc["stages"]["separation"]["percent"] == 50.0
    assert change.emit[-1].data.progress.targets["htdemucs_6s-6"].status == "completed"
    # A late progress of a finished target changes nothing.
    assert (
        apply(doc, SEPARATION_PROGRESS, SeparationProgress(job_id="j1", target="htdemucs_6s-6", percent=90))[1] is None
    )
    doc, change = apply(doc, SEPARATION_COMPLETED, _target_done("htdemucs-4", "vocals"))
    assert doc["status"] == "completed" and not doc.get("partial")
    assert set(doc["result"]["targets"]) == {"htdemucs-4", "htdemucs_6s-6"}
    # The primary target (the first asked for) is the job's `result.stems`, for clients that know one separation.
    assert [s["name"] for s in doc["result"]["stems"]] == ["vocals"]
    assert doc["result"]["separation"]["target"] == "htdemucs-4"
    assert change.emit[-1].spec.name == "job.completed" and change.emit[-1].data.partial is False


def test_a_failed_target_does_not_fail_the_others() -> None:
    doc = job(targets="htdemucs:4,htdemucs_6s:6", analyze=False)
    doc, _ = apply(doc, AUDIO_INGESTED, ingested())
    oom = StageFailed(job_id="j1", target="htdemucs-4", error=ErrorInfo(code="out_of_memory", message="too big"))
    doc, _ = apply(doc, SEPARATION_FAILED, oom)
    assert doc["status"] == "processing" and doc["targets"]["htdemucs-4"]["error"]["code"] == "out_of_memory"
    doc, change = apply(doc, SEPARATION_COMPLETED, _target_done("htdemucs_6s-6", "piano"))
    assert doc["status"] == "completed" and doc["partial"] is True and doc["error"] is None
    assert [s["name"] for s in doc["result"]["stems"]] == ["piano"]  # the first target that completed
    assert change.emit[-1].data.partial is True


def test_a_job_fails_when_every_target_failed() -> None:
    doc = job(targets="htdemucs:4,htdemucs_6s:6", analyze=False)
    doc, _ = apply(doc, AUDIO_INGESTED, ingested())
    for name in ("htdemucs-4", "htdemucs_6s-6"):
        failed = StageFailed(job_id="j1", target=name, error=ErrorInfo(code="model_unavailable", message="x"))
        doc, change = apply(doc, SEPARATION_FAILED, failed)
    assert doc["status"] == "failed" and doc["error"]["code"] == "model_unavailable"
    assert "htdemucs-4" in doc["error"]["message"] and "htdemucs_6s-6" in doc["error"]["message"]
    assert change.emit[-1].spec.name == "job.failed"
