"""Exit codes, and a clear sentence for every problem+json answer the API gives."""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class Exit(IntEnum):
    """The documented exit codes of `stemflow` (README: "Exit codes")."""

    OK = 0
    JOB_FAILED = 1  # a job ended failed or cancelled
    USAGE = 2  # bad arguments, missing API key, unreadable config file or song
    AUTH = 3  # the API key was refused (401, 403, WebSocket 4401)
    NOT_FOUND = 4  # no such job or stem (404)
    CONFLICT = 5  # the job is not in a state that allows this (409)
    REJECTED = 6  # the request or the file was refused (400, 413, 415, 416, 422)
    RATE_LIMITED = 7  # too many requests (429)
    UNAVAILABLE = 8  # cannot connect, the service failed (5xx) or answered something unexpected
    TIMEOUT = 9  # --timeout passed before the jobs ended
    MODEL_UNAVAILABLE = 10  # no worker serves the model now (422 model_unavailable, or seen in /v1/models first)
    INTERRUPTED = 130  # Ctrl-C


class CliError(Exception):
    """An error to report on stderr and end with `exit_code`."""

    def __init__(self, message: str, exit_code: Exit, *, hint: str = "", problem: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.hint = hint
        self.problem = problem

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": self.message, "exit_code": int(self.exit_code)}
        if self.hint:
            body["hint"] = self.hint
        if self.problem:
            body["problem"] = self.problem
        return {"error": body}


def exit_for_status(status: int) -> Exit:
    if status in (401, 403):
        return Exit.AUTH
    if status == 404:
        return Exit.NOT_FOUND
    if status == 409:
        return Exit.CONFLICT
    if status == 429:
        return Exit.RATE_LIMITED
    if 400 <= status < 500:
        return Exit.REJECTED
    return Exit.UNAVAILABLE


_KEY_HINT = "set STEMFLOW_API_KEY, pass --api-key, or run `stemflow configure`"
_MODELS_HINT = "`stemflow models` lists the models served now; choose one of them, or retry later"


def _field_errors(problem: dict[str, Any]) -> str:
    errors = problem.get("errors") or []
    parts = [
        f"{e.get('field') or 'request'}: {e['message']}" if e.get("message") else str(e.get("field")) for e in errors
    ]
    return "; ".join(p for p in parts if p)


def describe_problem(status: int, problem: dict[str, Any], *, retry_after: str | None = None) -> tuple[str, str]:
    """(message, hint) for a problem+json answer, by its stable `code`."""
    code = str(problem.get("code") or "")
    detail = str(problem.get("detail") or problem.get("title") or "")
    if code == "unauthorized":
        return "the API key was refused", _KEY_HINT
    if code == "forbidden":
        return f"this API key may not do that: {detail}", _KEY_HINT
    if code == "job_not_found":
        return f"{detail} (jobs of other API keys are invisible)", "`stemflow list` shows your jobs"
    if code == "stem_not_found":
        return detail, "`stemflow status JOB` lists the job's stems"
    if code == "job_not_completed":
        return f"{detail}: stems exist only once the job has completed", "wait with `stemflow watch`"
    if code == "job_finished":
        return f"{detail}; there is nothing to cancel", ""
    if code == "analysis_not_ready":
        return f"{detail}", "the analysis appears when the job's analysis stage has completed"
    if code == "validation_failed":
        fields = _field_errors(problem)
        return f"the server refused the options: {fields or detail}", "`stemflow submit --help` lists the options"
    if code == "model_unavailable":
        return f"no worker serves this model now: {detail}", _MODELS_HINT
    if code == "payload_too_large":
        return f"the file is too large: {detail}", "trim or compress the song first"
    if code == "unsupported_media_type":
        return f"the server does not accept this file: {detail}", "send WAV, FLAC, MP3, OGG/Opus or M4A/AAC"
    if code in ("malformed_multipart", "malformed_json", "bad_request"):
        return f"the server could not read the request: {detail}", "this is a bug in stemflow; please report it"
    if code == "invalid_idempotency_key":
        return f"bad Idempotency-Key: {detail}", ""
    if code == "range_not_satisfiable":
        return f"the requested byte range is outside the file: {detail}", "delete the partial download and retry"
    if code == "rate_limited":
        wait = f"retry in {retry_after} s" if retry_after else "retry in a minute"
        return f"too many requests for this API key ({detail})", wait
    if code == "database_unavailable":
        return "Stemflow's job database is unreachable", f"retry in {retry_after or 'a few'} seconds"
    if code in ("unavailable", "internal_error"):
        return f"Stemflow failed to answer: {detail}", "retry shortly; if it persists, the service logs say why"
    if code in ("not_found", "method_not_allowed"):
        return f"the server does not serve the Stemflow API here ({detail})", "check --url / STEMFLOW_URL"
    message = f"{detail} [{code}]" if code else detail or f"HTTP {status}"
    return message, ""


def problem_error(status: int, problem: dict[str, Any], *, retry_after: str | None = None) -> CliError:
    message, hint = describe_problem(status, problem, retry_after=retry_after)
    # Not served now is not a wrong option: scripts may retry it later, so it has its own exit code.
    exit_code = Exit.MODEL_UNAVAILABLE if problem.get("code") == "model_unavailable" else exit_for_status(status)
    return CliError(message, exit_code, hint=hint, problem=problem)
