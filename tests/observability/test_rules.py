"""Recording and alert rules: promtool's checks and unit tests, and what each alert must carry."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "observability" / "prometheus"
RULE_FILES = sorted(PROMETHEUS.glob("*.rules.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.test.yml"))
RUNBOOK = REPO / "docs" / "runbook.md"
SEVERITIES = {"critical", "warning"}


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_rule_files_pass_promtool_check(promtool):
    result = run(promtool, "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass(promtool):
    result = run(promtool, "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_where_it_fires(rules):
    fired = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            fired |= {t["alertname"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    alerts = {rule["alert"] for rule in rules if "alert" in rule}
    assert alerts, "no alerts found"
    assert alerts - fired == set(), "alerts without a test that makes them fire"


def test_every_alert_has_a_severity_a_summary_and_a_runbook_entry(rules):
    anchors = {_anchor(line) for line in RUNBOOK.read_text().splitlines() if line.startswith("#")}
    for rule in (r for r in rules if "alert" in r):
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule.get("for"), f"{name}: an alert without `for` pages on one bad scrape"
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "docs/runbook.md", name
        assert anchor == name.lower() and anchor in anchors, f"{name}: no section `## {name}` in docs/runbook.md"
        section = _section(RUNBOOK.read_text(), name)
        for part in ("**Means.**", "**Check.**", "**Do.**"):
            assert part in section, f"{name}: the runbook entry has no {part}"


def test_rules_read_only_series_something_exports(rules, find_unknown_series):
    exprs = [(rule.get("alert") or rule["record"], rule["expr"]) for rule in rules]
    unknown = find_unknown_series(exprs)
    assert not unknown, "series read by the rules that nothing exports:\n" + "\n".join(
        f"  {name}  (read by {', '.join(where)})" for name, where in sorted(unknown.items())
    )


def test_the_prometheusrule_objects_are_up_to_date():
    spec = importlib.util.spec_from_file_location(
        "prometheusrule", REPO / "deploy" / "observability" / "prometheusrule.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.TARGET.read_text()
    assert written == module.render(), "run: python deploy/observability/prometheusrule.py"
    objects = {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(written)}
    for path in RULE_FILES:
        name = "stemflow-" + path.name.removesuffix(".rules.yml")
        assert objects[name]["kind"] == "PrometheusRule"
        assert objects[name]["spec"] == yaml.safe_load(path.read_text())


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _section(markdown: str, title: str) -> str:
    start = markdown.index(f"## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end != -1 else len(markdown)]
