"""The observability files as data: rule groups, dashboards, and the metric names a query may use."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
OBSERVABILITY = REPO / "deploy" / "observability"
PROMETHEUS = OBSERVABILITY / "prometheus"
RULE_FILES = sorted(PROMETHEUS.glob("*.rules.yml"))
DASHBOARDS = sorted((OBSERVABILITY / "grafana").glob("*.json"))

# Series from exporters other than the services: Prometheus' own `up`, RabbitMQ's
# rabbitmq_prometheus plugin (/metrics/per-object, as of RabbitMQ 3.10), NVIDIA's dcgm-exporter,
# and the OpenTelemetry SDK's own metrics, on the services' registry when tracing asks for them
# (shared/tests/test_sdk_metrics.py shows them there).
EXTERNAL_SERIES = frozenset(
    {
        "up",
        "rabbitmq_queue_messages_ready",
        "rabbitmq_queue_messages_unacked",
        "rabbitmq_queue_messages",
        "rabbitmq_queue_consumers",
        "DCGM_FI_DEV_GPU_UTIL",
        "otel_sdk_processor_span_processed_total",
        "otel_sdk_exporter_span_exported_total",
    }
)
# Grafana's variables, replaced by values Prometheus accepts before a query is parsed.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}


@pytest.fixture(scope="session")
def promtool() -> str:
    """The promtool executable (the test is skipped without it)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool is not installed: it comes with the Debian package `prometheus` (apt-get install prometheus)"
        )
    return path


def load_rules() -> list[dict[str, Any]]:
    """Every rule of every rule file."""
    rules = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend(group["rules"])
    return rules


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, Grafana variables replaced."""
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"})


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, labels and keywords left out)."""
    text = _STRINGS.sub('""', expr)
    text = _GROUPING.sub(" ", _RANGES.sub("", _MATCHERS.sub("", text)))
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.groups()
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def declared_series() -> set[str]:
    """The series names of every metric the services declare (shared/src/stemflow_shared/metrics.py)."""
    from stemflow_shared import metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names = set()
    for family in metrics.REGISTRY.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def recorded_series() -> set[str]:
    return {rule["record"] for rule in load_rules() if "record" in rule}


def unknown_series(exprs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Series names read by the expressions that nothing exports, with where each is read."""
    known = declared_series() | recorded_series() | EXTERNAL_SERIES
    unknown: dict[str, list[str]] = {}
    for where, expr in exprs:
        for name in sorted(series_names(expr) - known):
            unknown.setdefault(name, []).append(where)
    return unknown


@pytest.fixture(scope="session")
def rules() -> list[dict[str, Any]]:
    return load_rules()


@pytest.fixture(scope="session")
def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in DASHBOARDS}


@pytest.fixture(scope="session")
def find_unknown_series() -> Callable[[list[tuple[str, str]]], dict[str, list[str]]]:
    """unknown_series(): series read by (where, PromQL) pairs that no exporter or rule provides."""
    return unknown_series


@pytest.fixture(scope="session")
def queries_of() -> Callable[[dict[str, Any]], list[tuple[str, str]]]:
    """dashboard_queries(): (panel title, PromQL) of a dashboard."""
    return dashboard_queries
