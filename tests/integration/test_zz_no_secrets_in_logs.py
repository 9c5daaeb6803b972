"""After the other integration tests ran (this file is collected last): no secret reached a log line."""

from __future__ import annotations

import re
from typing import Any

import pytest

from .conftest import ARTIFACTS

pytestmark = pytest.mark.integration


def test_no_api_key_or_password_in_any_service_log(system: Any, api_key: str) -> None:
    logs = {path.name: path.read_text(errors="replace") for path in (ARTIFACTS / "logs").glob("*.log")}
    assert set(logs) >= {"gateway.log", "notifier.log", "ingest.log", "separator.log", "analyzer.log"}
    assert sum(len(text) for text in logs.values()) > 1000
    for name, text in logs.items():
        assert api_key not in text, f"an API key is in {name}"
        assert not re.search(r"sfk_[A-Za-z0-9_-]{20,}", text), f"an API key shape is in {name}"
        assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), f"a URL with credentials is in {name}"
