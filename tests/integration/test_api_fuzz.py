"""The public API fuzzed from its own OpenAPI document: no 5xx, every error a problem+json with a code."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.integration
EXAMPLES_PER_OPERATION = 25
CONTRACT = {
    "POST /v1/jobs",
    "GET /v1/jobs",
    "GET /v1/jobs/{job_id}",
    "DELETE /v1/jobs/{job_id}",
    "POST /v1/jobs/{job_id}/cancel",
    "GET /v1/jobs/{job_id}/stems/{stem}",
    "GET /v1/jobs/{job_id}/stems.zip",
    "GET /v1/jobs/{job_id}/analysis",
}


def test_no_server_errors_and_problem_details_everywhere(system: Any, api_key: str) -> None:
    schema = schemathesis.openapi.from_url(f"{system.gateway_url}/openapi.json")
    headers = {"Authorization": f"Bearer {api_key}"}
    checked: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case: Any) -> None:
            response = case.call(headers=headers)
            where = f"{case.method} {case.formatted_path}"
            assert response.status_code < 500, f"{where} -> {response.status_code}: {response.text}"
            if response.status_code >= 400:
                content_type = response.headers["content-type"]
                content_type = content_type[0] if isinstance(content_type, list) else content_type
                assert content_type.startswith("application/problem+json"), (
                    f"{where} -> {response.status_code} {content_type}: {response.text[:200]}"
                )
                body = response.json()
                assert body["status"] == response.status_code and body["code"] and body["title"], where

        check()
        checked.append(operation.label)
    # Every operation of the contract (docs/api.md, "HTTP API") was fuzzed.
    assert set(checked) >= CONTRACT, sorted(CONTRACT - set(checked))
