"""The tables people read."""

from __future__ import annotations

from rich.console import Console

from stemflow_cli.display import analysis_table, jobs_table, stages_text

JOB = {
    "id": "01abc",
    "status": "completed",
    "input": {"filename": "song.wav"},
    "progress": {"overall": 100.0},
    "created_at": "2026-11-22T12:01:20.868000Z",
    "result": {
        "stems": [],
        "analysis": {
            "tempo_bpm": 120.04,
            "tempo_confidence": 0.87,
            "key": "A minor",
            "key_confidence": 0.64,
            "loudness_lufs": -14.23,
            "true_peak_dbfs": -1.02,
            "duration_s": 95.5,
            "beat_count": 190,
        },
    },
}


def render(renderable: object) -> str:
    console = Console(width=120, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_the_analysis_shows_tempo_and_key_with_confidence() -> None:
    text = render(analysis_table(JOB))
    assert "120.0 BPM  (confidence 87%)" in text
    assert "A minor  (confidence 64%)" in text
    assert "-14.2 LUFS" in text and "1:35.5" in text and "190" in text


def test_stages_show_a_mark_when_done_and_a_percent_while_running() -> None:
    progress = {
        "ingest": {"status": "completed", "percent": 100},
        "separation": {"status": "running", "percent": 41.6},
        "analysis": {"status": "pending", "percent": 0},
    }
    assert stages_text(progress) == "ingest ✓  separation 42%  analysis …"


def test_the_job_list_keeps_whole_ids_on_a_narrow_terminal() -> None:
    job = {**JOB, "id": "01a203221f8bf096be6f6772f1cd0a39"}
    console = Console(width=80, record=True, color_system=None)
    console.print(jobs_table([job]))
    assert "01a203221f8bf096be6f6772f1cd0a39" in console.export_text()
