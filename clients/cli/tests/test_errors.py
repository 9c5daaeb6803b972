"""Every problem+json code of the API becomes a clear sentence and a documented exit code."""

from __future__ import annotations

import pytest

from stemflow_cli.errors import Exit, describe_problem, exit_for_status, problem_error

# (status, code, a phrase the message or hint must contain, exit code): every code the gateway answers with.
CASES = [
    (400, "bad_request", "could not read the request", Exit.REJECTED),
    (400, "malformed_json", "could not read the request", Exit.REJECTED),
    (400, "malformed_multipart", "could not read the request", Exit.REJECTED),
    (400, "invalid_idempotency_key", "Idempotency-Key", Exit.REJECTED),
    (401, "unauthorized", "API key was refused", Exit.AUTH),
    (403, "forbidden", "may not do that", Exit.AUTH),
    (404, "job_not_found", "other API keys", Exit.NOT_FOUND),
    (404, "stem_not_found", "stemflow status", Exit.NOT_FOUND),
    (404, "not_found", "check --url", Exit.NOT_FOUND),
    (405, "method_not_allowed", "check --url", Exit.REJECTED),
    (409, "job_not_completed", "only once the job has completed", Exit.CONFLICT),
    (409, "job_finished", "nothing to cancel", Exit.CONFLICT),
    (409, "analysis_not_ready", "analysis stage", Exit.CONFLICT),
    (413, "payload_too_large", "too large", Exit.REJECTED),
    (415, "unsupported_media_type", "does not accept this file", Exit.REJECTED),
    (416, "range_not_satisfiable", "byte range", Exit.REJECTED),
    (422, "validation_failed", "refused the options", Exit.REJECTED),
    (422, "model_unavailable", "stemflow models", Exit.MODEL_UNAVAILABLE),
    (429, "rate_limited", "retry in 17 s", Exit.RATE_LIMITED),
    (500, "internal_error", "failed to answer", Exit.UNAVAILABLE),
    (503, "unavailable", "failed to answer", Exit.UNAVAILABLE),
    (503, "database_unavailable", "database is unreachable", Exit.UNAVAILABLE),
]


@pytest.mark.parametrize(("status", "code", "phrase", "exit_code"), CASES)
def test_each_problem_code_has_a_message_and_an_exit_code(status: int, code: str, phrase: str, exit_code: Exit) -> None:
    problem = {"code": code, "status": status, "detail": f"detail of {code}", "title": "t"}
    error = problem_error(status, problem, retry_after="17")
    assert error.exit_code == exit_code
    assert phrase in f"{error.message} {error.hint}"
    assert error.as_json()["error"]["problem"] == problem


def test_validation_errors_name_the_fields() -> None:
    problem = {
        "code": "validation_failed",
        "detail": "invalid: stems",
        "errors": [{"field": "stems", "message": "Input should be 2, 4 or 6"}, {"field": "trim_end"}],
    }
    message, _ = describe_problem(422, problem)
    assert "stems: Input should be 2, 4 or 6" in message and "trim_end" in message


def test_an_unknown_code_still_says_its_detail_and_code() -> None:
    message, hint = describe_problem(418, {"code": "teapot", "detail": "short and stout"})
    assert message == "short and stout [teapot]" and hint == ""
    assert exit_for_status(418) == Exit.REJECTED
    assert exit_for_status(502) == Exit.UNAVAILABLE
