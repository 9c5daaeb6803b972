"""Logging: one JSON line per record, credentials never written."""

from __future__ import annotations

import json
import logging

import pytest

from stemflow_shared import telemetry


def test_credentials_in_url_queries_are_redacted() -> None:
    line = 'connection open: "GET /v1/ws?job=abc&token=sfk_live_123 HTTP/1.1" 101'
    assert telemetry.redact(line) == 'connection open: "GET /v1/ws?job=abc&token=[redacted] HTTP/1.1" 101'
    assert telemetry.redact("/v1/ws?TOKEN=x&api_key=y") == "/v1/ws?TOKEN=[redacted]&api_key=[redacted]"
    assert telemetry.redact("/v1/jobs?tokens=ok") == "/v1/jobs?tokens=ok"


def test_log_lines_are_json_with_the_job_id_and_no_secret(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        telemetry.setup_logging("unit", "INFO", "json")
        with telemetry.job_context("job-42"):
            logging.getLogger("uvicorn.error").info("%s - WebSocket %s", "127.0.0.1", "/v1/ws?token=sfk_secret")
        entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    assert entry["service"] == "unit" and entry["job_id"] == "job-42" and entry["level"] == "INFO"
    assert entry["msg"] == "127.0.0.1 - WebSocket /v1/ws?token=[redacted]"
    assert "sfk_secret" not in json.dumps(entry)
