"""Autoscaling against the broker topology of shared/: every queue has a scaler or a stated reason.

The queue names come from stemflow_shared.topology, the one place that
defines them, so a queue added there without a scaler (or a reason) fails here.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import pytest

from stemflow_shared.topology import (
    ALL_QUEUES,
    ANALYZER_QUEUE,
    GATEWAY_QUEUE,
    INGEST_QUEUE,
    MIXER_QUEUE,
    MODELS,
    NOTIFIER_QUEUE,
    PRIORITIES,
    SHARED_QUEUES,
    WEBHOOKS_QUEUE,
    Names,
    separator_queue,
)

Doc = dict[str, Any]
# The manifests leave STEMFLOW_NAMESPACE at its default (checked below).
NAMES = Names()
REPLICA = "notifier-7d9f8-x2kq5"  # what a notifier pod's name makes of its queue
# Queues no KEDA scaler watches, and why.
UNSCALED = {
    NAMES.queue(GATEWAY_QUEUE): (
        "stage results for the gateway, a few small messages per job: it keeps up as long as the gateway does, "
        "and the gateway scales on CPU (HPA), driven by its HTTP traffic"
    ),
    NAMES.queue(NOTIFIER_QUEUE, REPLICA): (
        "one queue per notifier replica, each reading every job event: another replica adds WebSocket capacity, "
        "not event throughput, so the notifier scales on CPU (HPA)"
    ),
    NAMES.queue(WEBHOOKS_QUEUE): (
        "at most one webhook per finished job, sent by the notifier replicas beside their WebSockets: "
        "it scales with them (HPA on CPU); a backlog raises the queue-backlog alert"
    ),
    NAMES.dead_letter_queue: "drained by people, not workers (docs/runbook.md); an alert fires while it is not empty",
}
QUEUE_WORKERS = {INGEST_QUEUE.name: "ingest", ANALYZER_QUEUE.name: "analyzer", MIXER_QUEUE.name: "analyzer"}
SCALED_ON_CPU = ("gateway", "notifier")


def every_queue() -> list[str]:
    names = [NAMES.queue(spec, REPLICA if spec.per_replica else None) for spec in ALL_QUEUES]
    return [*names, NAMES.dead_letter_queue]


def find(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    matches = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def of_kind(docs: tuple[Doc, ...], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def app(deployment: Doc) -> str:
    return deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]


def separator_pools(docs: tuple[Doc, ...]) -> list[Doc]:
    return [doc for doc in of_kind(docs, "Deployment") if app(doc) == "separator"]


def pool_models(docs: tuple[Doc, ...], pool: Doc) -> list[str]:
    (container,) = pool["spec"]["template"]["spec"]["containers"]
    (config,) = [source["configMapRef"]["name"] for source in container["envFrom"]]
    return [model.strip() for model in find(docs, "ConfigMap", config)["data"]["MODELS"].split(",")]


def consumed_by(docs: tuple[Doc, ...], deployment: Doc) -> set[str]:
    """The queues a Deployment's pods consume, from the topology."""
    if app(deployment) == "separator":
        return {NAMES.queue(separator_queue(m, p)) for m in pool_models(docs, deployment) for p in PRIORITIES}
    return {NAMES.queue(spec) for spec in SHARED_QUEUES if QUEUE_WORKERS.get(spec.name) == app(deployment)}


def watched(trigger: Doc) -> set[str]:
    """The queues of the topology a rabbitmq trigger counts.

    With useRegex, RabbitMQ's management API matches queueName as an unanchored
    regular expression (hence the anchors in the manifests).
    """
    metadata = trigger["metadata"]
    if metadata.get("useRegex") == "true":
        return {queue for queue in every_queue() if re.search(metadata["queueName"], queue)}
    return {queue for queue in every_queue() if queue == metadata["queueName"]}


def scalers(docs: tuple[Doc, ...]) -> dict[str, set[str]]:
    """Deployment name → the queues its ScaledObject watches."""
    return {
        scaler["spec"]["scaleTargetRef"]["name"]: set().union(*(watched(t) for t in scaler["spec"]["triggers"]))
        for scaler in of_kind(docs, "ScaledObject")
    }


def test_the_manifests_keep_the_default_broker_namespace(render, target):
    for config in of_kind(render(target), "ConfigMap"):
        assert "STEMFLOW_NAMESPACE" not in config.get("data", {}), config["metadata"]["name"]


def test_every_queue_has_a_scaler_or_a_reason(render):
    docs = render("overlays/prod")
    scaled = set().union(*scalers(docs).values())
    for queue in every_queue():
        assert (queue in scaled) != (queue in UNSCALED), f"{queue}: " + (
            "has both a scaler and a reason" if queue in scaled else "has neither a scaler nor a reason"
        )
    assert set(UNSCALED) <= set(every_queue()), "a reason for a queue the topology no longer has"


def test_each_scaler_watches_exactly_the_queues_its_workers_consume(render, target):
    docs = render(target)
    watching = scalers(docs)
    for name, queues in watching.items():
        deployment = find(docs, "Deployment", name)
        assert queues, f"{name}: its scaler matches no queue of the topology"
        assert queues == consumed_by(docs, deployment), name


def test_every_queue_worker_scales_on_its_queues_in_prod(render):
    docs = render("overlays/prod")
    watching = scalers(docs)
    workers = [d for d in of_kind(docs, "Deployment") if app(d) in ("ingest", "analyzer", "separator")]
    assert len(workers) >= 4, "ingest, analyzer and at least two separator pools"
    for worker in workers:
        assert worker["metadata"]["name"] in watching, f"{worker['metadata']['name']} has no ScaledObject"


def test_the_separator_pools_serve_every_model_once(render, target):
    docs = render(target)
    served = [model for pool in separator_pools(docs) for model in pool_models(docs, pool)]
    assert sorted(served) == sorted(MODELS), f"each model in exactly one pool, got {served}"


def test_prod_keeps_models_warm_in_pools_of_their_own(render):
    docs = render("overlays/prod")
    pools = separator_pools(docs)
    assert len(pools) >= 2
    assert pool_models(docs, find(docs, "Deployment", "separator")) == ["htdemucs"], (
        "the default model has its own pool"
    )
    for pool in pools:
        others = [p for p in pools if p is not pool]
        labels = pool["spec"]["template"]["metadata"]["labels"]
        for other in others:
            selector = other["spec"]["selector"]["matchLabels"]
            assert not selector.items() <= labels.items(), (
                f"{other['metadata']['name']} selects {pool['metadata']['name']}"
            )
        budgets = [
            b
            for b in of_kind(docs, "PodDisruptionBudget")
            if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(budgets) == 1, f"{pool['metadata']['name']}: one disruption budget, not {len(budgets)}"


def test_scalers_ask_rabbitmq_through_its_management_api(render):
    """Counting unacknowledged messages needs the HTTP API; the host must be the operator's Service."""
    docs = render("overlays/prod")
    (cluster,) = of_kind(docs, "RabbitmqCluster")
    namespace = cluster["metadata"]["namespace"]
    for scaler in of_kind(docs, "ScaledObject"):
        name = scaler["metadata"]["name"]
        spec = scaler["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
        for trigger in spec["triggers"]:
            metadata = trigger["metadata"]
            assert trigger["type"] == "rabbitmq", name
            assert metadata["protocol"] == "http" and metadata["mode"] == "QueueLength", name
            assert metadata.get("excludeUnacknowledged", "false") == "false", name
            host = urlsplit(metadata["host"])
            assert (host.scheme, host.hostname, host.port) == (
                "http",
                f"{cluster['metadata']['name']}.{namespace}.svc",
                15672,
            )
            assert not host.username and not host.password, f"{name}: credentials come from the TriggerAuthentication"
            assert metadata["vhostName"] == "/"
            assert float(metadata["value"]) > 0
            auth = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
            refs = {ref["parameter"]: (ref["name"], ref["key"]) for ref in auth["spec"]["secretTargetRef"]}
            # The Secret the operator makes for the cluster's default user.
            secret = f"{cluster['metadata']['name']}-default-user"
            assert refs == {"username": (secret, "username"), "password": (secret, "password")}


def test_the_edge_scales_on_cpu_and_nothing_has_two_autoscalers(render):
    docs = render("overlays/prod")
    hpas = {hpa["spec"]["scaleTargetRef"]["name"]: hpa for hpa in of_kind(docs, "HorizontalPodAutoscaler")}
    for name in SCALED_ON_CPU:
        hpa = hpas[name]["spec"]
        # The notifier is a StatefulSet: stable pod names keep each replica's queue across restarts.
        kind = hpas[name]["spec"]["scaleTargetRef"]["kind"]
        assert kind == ("StatefulSet" if name == "notifier" else "Deployment")
        assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
        (metric,) = hpa["metrics"]
        assert metric["resource"]["name"] == "cpu"
        (container,) = find(docs, kind, name)["spec"]["template"]["spec"]["containers"]
        assert "cpu" in container["resources"]["requests"], "utilisation is measured against the request"
    assert not set(hpas) & set(scalers(docs)), "a Deployment under both an HPA and a ScaledObject"


@pytest.mark.parametrize("target", ["base", "overlays/dev"])
def test_without_the_component_nothing_autoscales(render, target):
    docs = render(target)
    assert not of_kind(docs, "ScaledObject") and not of_kind(docs, "HorizontalPodAutoscaler")
