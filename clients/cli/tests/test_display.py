"""The tables people read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console

from stemflow_cli.display import (
    Board,
    analysis_table,
    jobs_table,
    models_table,
    print_whole,
    queue_text,
    stages_text,
    stems_table,
)

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


def test_a_waiting_job_shows_its_place_and_a_start_that_counts_down() -> None:
    queue = {"ahead": 2, "estimated_start_s": 40.0}
    assert queue_text(queue) == "2 ahead · starts in ~40 s"
    assert queue_text(queue, elapsed=15.2) == "2 ahead · starts in ~25 s"
    assert queue_text(queue, elapsed=60) == "2 ahead · starts in ~0 s"
    assert queue_text({"ahead": 0, "estimated_start_s": 400.0}) == "0 ahead · starts in ~7 min"
    assert queue_text(None) == ""
    assert queue_text({"ahead": 3}) == "3 ahead"  # the pool's pace not known yet
    soon = (datetime.now(UTC) + timedelta(seconds=30.9)).isoformat().replace("+00:00", "Z")
    assert queue_text({"ahead": 1, "estimated_start_at": soon}) == "1 ahead · starts in ~31 s"
    queued = {**JOB, "status": "queued", "queue": queue, "progress": {"overall": 0.0}, "result": None}
    assert "queued 0% (2 ahead)" in render(jobs_table([queued]))


def test_the_board_keeps_a_queue_until_the_separation_starts() -> None:
    board = Board(Console(width=120, record=True, color_system=None), enabled=False)
    board.add("j", "song.wav")
    queue = {"ahead": 1, "estimated_start_s": 9.0}
    board.update("j", "queued", None, queue)
    assert board.queued() == ["j"]
    for waiting in ("pending", "running"):  # a queued separation is "running" at 0%
        assert board.queue_of("j", {"separation": {"status": waiting, "percent": 0}}) is queue
    assert board.queue_of("j", {"separation": {"status": "running", "percent": 3}}) is None
    board.update("j", "completed", None, queue)
    assert board.queued() == []


def test_the_models_table_says_what_is_served() -> None:
    catalogue = {
        "default_model": "htdemucs",
        "models": [
            {"name": "htdemucs", "stems": [2, 4], "served": True, "workers": 2, "queue_depth": 3,
             "estimated_wait_s": 12.5, "description": "fast"},
            {"name": "htdemucs_6s", "stems": [2, 4, 6], "served": False, "workers": 0, "queue_depth": 0,
             "estimated_wait_s": None, "description": "guitar and piano"},
        ],
    }  # fmt: skip
    lines = render(models_table(catalogue)).splitlines()
    served = next(line.strip() for line in lines if line.strip().startswith("htdemucs (default)"))
    assert served.split()[2:8] == ["2,", "4", "yes", "2", "3", "~13"]
    unserved = next(line.strip() for line in lines if line.strip().startswith("htdemucs_6s"))
    assert unserved.split()[1:7] == ["2,", "4,", "6", "no", "0", "0"] and "guitar and piano" in unserved


FULL = {
    **JOB["result"]["analysis"],
    "tempo_alternatives": [{"bpm": 60.02, "confidence": 0.31}],
    "key_alternatives": [{"key": "C major", "confidence": 0.22}, {"key": "E minor", "confidence": 0.1}],
    "key_camelot": "8A",
    "key_open_key": "1m",
    "chords": [{"label": "Am", "root": "A"}, {"label": "N", "root": None}, {"label": "F", "root": "F"}],
}


def test_the_analysis_states_its_doubt_and_chords_from_the_full_analysis() -> None:
    text = render(analysis_table(JOB, FULL))
    assert "120.0 BPM  (confidence 87%)  or 60.0 BPM (31%)" in text
    assert "A minor  (confidence 64%)  or C major (22%)" in text and "E minor" not in text
    assert "Camelot 8A  Open Key 1m" in text and "Am F" in text
    assert text.count("Tempo") == 1 and text.count("Chords") == 1


def test_piped_the_job_list_keeps_whole_names_and_says_why_a_job_failed() -> None:
    name = "A Very Long Song Title That Would Not Fit (Extended Club Mix).flac"
    failed = {
        **JOB,
        "status": "failed",
        "input": {"filename": name},
        "error": {"code": "not_audio", "message": "the file holds no audio stream"},
        "result": None,
    }
    console = Console(width=80, record=True, color_system=None)
    print_whole(console, jobs_table([failed], fit=False))
    text = console.export_text()
    assert name in text and "not_audio: the file holds no audio stream" in text
    assert "failed: not_audio" not in render(jobs_table([JOB]))


STEM = {"format": "flac", "duration": 4.0}


def test_the_closing_table_lists_every_file_written_for_every_target(tmp_path: Path) -> None:
    job = {
        **JOB,
        "result": {
            "stems": [{**STEM, "name": "vocals", "size": 10, "url": "http://g/v1/jobs/j/stems/vocals"}],
            "targets": {
                "htdemucs-2": {"stems": [{**STEM, "name": n, "size": 10, "url": f"http://g/{n}?t=2"} for n in ("vocals", "accompaniment")]},
                "htdemucs-4": {"stems": [{**STEM, "name": n, "size": 10, "url": f"http://g/{n}?t=4"} for n in ("drums", "bass")]},
            },
        },
    }  # fmt: skip
    files = {}
    for key in ("htdemucs-2/vocals", "htdemucs-2/accompaniment", "htdemucs-4/drums"):
        path = tmp_path / key.replace("/", "-")
        path.write_bytes(b"x" * 1_500_000)
        files[key] = str(path)
    text = Console(width=250, record=True, color_system=None)
    text.print(stems_table(job, files))
    table = text.export_text()
    for key, path in files.items():
        row = next(line for line in table.splitlines() if path in line)
        assert key.split("/")[0] in row and key.split("/")[1] in row
        assert "1.5 MB" in row  # as the download bar counts (decimal units), from the file written
    assert "bass" not in table and "http" not in table
    links = render(stems_table(job))
    assert "http://g/bass?t=4" in links and "htdemucs-4" in links


def test_a_failed_job_shows_why_on_its_bar() -> None:
    console = Console(width=160, record=True, color_system=None)
    board = Board(console, enabled=False)
    board.add("j", "song.wav")
    board.update("j", "failed", None, None, "not_audio")
    assert "not_audio" in str(board._progress.tasks[0].fields["status"])
