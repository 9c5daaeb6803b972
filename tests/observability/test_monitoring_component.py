"""The kustomize monitoring component, rendered on the base: it scrapes every service and ships the rules and dashboards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OBSERVABILITY = REPO / "deploy" / "observability"
SERVICES = ("gateway", "ingest", "separator", "analyzer", "notifier")

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    """The base with the component, as an overlay would render it."""
    if kubectl := shutil.which("kubectl"):
        command = [kubectl, "kustomize"]
    elif kustomize := shutil.which("kustomize"):
        command = [kustomize, "build"]
    else:
        pytest.skip("neither kubectl nor kustomize is installed; one of them renders the kustomizations")
    overlay = tmp_path_factory.mktemp("overlay")
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "stemflow",
        "resources": [os.path.relpath(K8S / "base", overlay)],
        "components": [os.path.relpath(K8S / "components" / "monitoring", overlay)],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    result = subprocess.run([*command, str(overlay)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_the_pod_monitor_scrapes_every_service_on_its_metrics_port(docs):
    monitors = [d["spec"] for d in docs if d["kind"] == "PodMonitor"]
    for service in SERVICES:
        pod = one(docs, "StatefulSet" if service == "notifier" else "Deployment", service)["spec"]["template"]
        labels = pod["metadata"]["labels"]
        (monitor,) = [
            m
            for m in monitors
            if all(
                e["operator"] == "In" and labels.get(e["key"]) in e["values"] for e in m["selector"]["matchExpressions"]
            )
        ]
        (endpoint,) = monitor["podMetricsEndpoints"]
        assert endpoint["path"] == "/metrics"
        # The job label comes from the pod label, so job="<service>" as the rules expect.
        assert labels[monitor["jobLabel"]] == service
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert endpoint["port"] in ports, service
        # The gateway's `http` port is the public API: its /metrics is on a port of its own.
        assert endpoint["port"] == ("metrics" if service == "gateway" else "http"), service


def test_rabbitmq_is_scraped_per_queue(docs):
    monitor = one(docs, "ServiceMonitor", "rabbitmq")["spec"]
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] == "prometheus"
    assert endpoint["path"] == "/metrics/per-object"
    # The Service the RabbitMQ Cluster Operator creates for a cluster carries these labels.
    cluster = one(docs, "RabbitmqCluster", monitor["selector"]["matchLabels"]["app.kubernetes.io/name"])
    assert cluster["metadata"]["namespace"] == "stemflow"
    assert monitor["selector"]["matchLabels"]["app.kubernetes.io/component"] == "rabbitmq"


def test_the_prometheus_rules_are_the_rule_files(docs):
    for path in sorted((OBSERVABILITY / "prometheus").glob("*.rules.yml")):
        rule = one(docs, "PrometheusRule", "stemflow-" + path.name.removesuffix(".rules.yml"))
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        assert rule["spec"] == yaml.safe_load(path.read_text())


def test_every_dashboard_is_a_configmap_for_the_grafana_sidecar(docs):
    for path in sorted((OBSERVABILITY / "grafana").glob("*.json")):
        config = one(docs, "ConfigMap", f"grafana-dashboard-stemflow-{path.stem}")
        assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config["metadata"]["namespace"] == "stemflow"
        assert json.loads(config["data"][path.name]) == json.loads(path.read_text())
