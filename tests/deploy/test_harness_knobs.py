"""Knobs that only tests and benchmarks turn (stemflow_shared.settings.HarnessKnobs) are named in no deployment file."""

from __future__ import annotations

from pathlib import Path

from stemflow_shared.settings import HarnessKnobs

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT_FILES = [
    *(ROOT / "deploy").rglob("*.yaml"),
    *(ROOT / "deploy").rglob("*.yml"),
    *(ROOT / "deploy").rglob("*.env*"),
    ROOT / "Tiltfile",
]


def test_no_deployment_file_sets_a_harness_knob() -> None:
    names = [f"STEMFLOW_TEST_{field.upper()}" for field in HarnessKnobs.model_fields]
    assert names and len(DEPLOYMENT_FILES) > 10
    for path in DEPLOYMENT_FILES:
        text = path.read_text(errors="replace")
        assert "STEMFLOW_TEST_" not in text, f"{path.relative_to(ROOT)} sets a test-only knob"
