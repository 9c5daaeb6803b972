"""Grafana dashboards: well-formed, every query valid PromQL over series that exist, the overview complete."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
OBSERVABILITY = REPO / "deploy" / "observability"
SERVICES = ("gateway", "ingest", "separator", "analyzer", "notifier")


def test_there_is_an_overview_and_one_dashboard_per_service(dashboards):
    assert set(dashboards) == {"overview.json", *(f"{s}.json" for s in SERVICES)}


def test_dashboards_are_well_formed(dashboards):
    uids = [d["uid"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids)
    for name, dashboard in dashboards.items():
        assert dashboard["title"].startswith("Stemflow / "), name
        assert "stemflow" in dashboard["tags"], name
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", name
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids"
        for panel in dashboard["panels"]:
            where = f"{name}: {panel['title']}"
            box = panel["gridPos"]
            assert box["x"] + box["w"] <= 24, where
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(set(refs)) == len(refs), where
            for target in panel["targets"]:
                if "$instance" in target["expr"]:
                    assert "instance" in variables, f"{where} uses $instance, which the dashboard does not define"


def test_every_query_is_valid_promql(dashboards, queries_of, promtool, tmp_path):
    # promtool parses each query as a recording rule: a syntax error names the query.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr, "labels": {"panel": f"{name}: {title}"}}
        for name, dashboard in dashboards.items()
        for i, (title, expr) in enumerate(queries_of(dashboard))
    ]
    path = tmp_path / "dashboard-queries.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboards_read_only_series_something_exports(dashboards, queries_of, find_unknown_series):
    queries = [(f"{name}: {title}", expr) for name, d in dashboards.items() for title, expr in queries_of(d)]
    unknown = find_unknown_series(queries)
    assert not unknown, "series read by the dashboards that nothing exports:\n" + _listing(unknown)


def test_the_overview_shows_what_sres_asked_for(dashboards, queries_of):
    exprs = " ".join(expr for _, expr in queries_of(dashboards["overview.json"]))
    wanted = {
        "throughput": "stemflow_jobs_submitted_total",
        "jobs finished": "outcome:stemflow_jobs_finished:rate5m",
        "HTTP error ratio": "job:http_server_request_errors:ratio_rate5m",
        "job failure ratio": "stemflow:jobs_failed:ratio_rate30m",
        "HTTP p95": "job_method_route:http_server_request_duration_seconds:p95_5m",
        "handler p95": "queue:stemflow_message_handler_duration_seconds:p95_5m",
        "queue depth": "queue:rabbitmq_queue_messages_ready:max",
        "job duration by stage": "stemflow_stage_duration_seconds_bucket",
        "GPU use": "instance_device:stemflow_separator_device_busy:ratio_rate5m",
    }
    assert {what for what, series in wanted.items() if series not in exprs} == set()


def test_each_service_dashboard_covers_its_queue_and_process(dashboards, queries_of):
    for service in SERVICES:
        exprs = " ".join(expr for _, expr in queries_of(dashboards[f"{service}.json"]))
        for series in (
            "stemflow_messages_consumed_total",
            "rabbitmq_queue_messages_ready",
            "process_cpu_seconds_total",
        ):
            assert series in exprs, f"{service}.json does not show {series}"


def test_the_kustomization_ships_every_dashboard(dashboards):
    kustomization = yaml.safe_load((OBSERVABILITY / "kustomization.yaml").read_text())
    shipped = {f for generator in kustomization["configMapGenerator"] for f in generator["files"]}
    assert shipped == {f"grafana/{name}" for name in dashboards}


def _listing(unknown: dict[str, list[str]]) -> str:
    return "\n".join(f"  {name}  (read by {', '.join(sorted(set(where)))})" for name, where in sorted(unknown.items()))
