"""Conventions a newcomer can rely on, checked over the services' and the shared library's source."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("services/*/src/**/*.py"), *ROOT.glob("shared/src/**/*.py")])


def test_loggers_are_named_after_their_module() -> None:
    # logging.getLogger(__name__): a log line's logger says which module wrote it (uvicorn's own are theirs).
    literal = re.compile(r"""logging\.getLogger\(\s*["'](?!uvicorn)""")
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES if literal.search(p.read_text())]
    assert len(SOURCES) > 50
    assert offenders == []
