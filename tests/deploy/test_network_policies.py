"""The NetworkPolicies, evaluated the way a network plugin applies them, against who must talk to whom.

A small evaluator of NetworkPolicy semantics (selectors, namespaces, named
ports, ipBlocks, both directions) answers "may A open a connection to B on
port P?" for every pair of known peers: the services' pods as rendered, the
operators' pods by the labels the operators give them, and pods and
addresses outside the namespace. The answer must be yes exactly for the
connections listed below.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest

Doc = dict[str, Any]
NAMESPACE = "stemflow"
SERVICES = ("gateway", "notifier", "ingest", "separator", "analyzer")
WEB = {80, 443}


@dataclass(frozen=True)
class Peer:
    """A pod (labels, namespace, named ports) or an address outside the cluster (ip)."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    namespace: str = NAMESPACE
    ports: dict[str, int] = field(default_factory=dict)
    ip: str | None = None

    def __hash__(self) -> int:
        return hash(self.name)


# The operators' pods, by the labels the operators give them.
RABBITMQ = Peer(
    "rabbitmq",
    {
        "app.kubernetes.io/name": "rabbitmq",
        "app.kubernetes.io/component": "rabbitmq",
        "app.kubernetes.io/part-of": "rabbitmq",
    },
    ports={"amqp": 5672, "management": 15672, "prometheus": 15692, "epmd": 4369, "cluster-links": 25672},
)
MONGODB = Peer("mongodb", {"app": "mongodb-svc"}, ports={"mongodb": 27017})
# Outside the namespace.
DNS = Peer("dns", {"k8s-app": "kube-dns"}, "kube-system", {"dns": 53})
INGRESS = Peer("ingress-controller", {"app.kubernetes.io/name": "ingress-nginx"}, "ingress-nginx")
PROMETHEUS = Peer("prometheus", {"app.kubernetes.io/name": "prometheus"}, "monitoring")
KEDA = Peer("keda", {"app.kubernetes.io/name": "keda-operator"}, "keda")
COLLECTOR = Peer(
    "otel-collector", {"app.kubernetes.io/name": "opentelemetry-collector"}, "observability", {"otlp-http": 4318}
)
STRANGER = Peer("stranger", {"app": "curl"}, "default")
OUTSIDERS = (INGRESS, PROMETHEUS, KEDA, STRANGER)
PUBLIC = (Peer("public-v4", ip="93.184.216.34"), Peer("public-v6", ip="2606:4700:4700::1111"))
PRIVATE = tuple(
    Peer(f"private-{ip}", ip=ip)
    for ip in ("10.96.0.1", "172.20.3.4", "192.168.1.10", "100.64.0.9", "169.254.169.254", "127.0.0.1", "fd00::1")
)
# Ports nobody listens on, to show that an allowance does not spill over.
STRAY_PORTS = (22, 8080)


def selects(selector: Doc | None, labels: dict[str, str]) -> bool:
    """A LabelSelector; an empty one selects everything."""
    selector = selector or {}
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def matches_peer(rule_peer: Doc, peer: Peer) -> bool:
    """One `from`/`to` entry of a policy in the stemflow namespace."""
    if "ipBlock" in rule_peer:
        if peer.ip is None:
            return False
        address = ipaddress.ip_address(peer.ip)
        block = rule_peer["ipBlock"]
        within = lambda cidr: address in ipaddress.ip_network(cidr)  # noqa: E731
        return address.version == ipaddress.ip_network(block["cidr"]).version and (
            within(block["cidr"]) and not any(within(cidr) for cidr in block.get("except", []))
        )
    if peer.ip is not None:
        return False
    if "namespaceSelector" in rule_peer:
        if not selects(rule_peer["namespaceSelector"], {"kubernetes.io/metadata.name": peer.namespace}):
            return False
    elif peer.namespace != NAMESPACE:
        return False
    return selects(rule_peer.get("podSelector"), peer.labels)


def matches_port(rule: Doc, port: int, protocol: str, server: Peer) -> bool:
    if "ports" not in rule:
        return True
    for entry in rule["ports"]:
        if entry.get("protocol", "TCP") != protocol:
            continue
        wanted = entry.get("port")
        if wanted is None or wanted == port or server.ports.get(str(wanted)) == port:
            return True
    return False


def policies_for(docs: tuple[Doc, ...], peer: Peer, direction: str) -> list[Doc]:
    """The policies that isolate `peer` in `direction` ("Ingress" or "Egress")."""
    if peer.namespace != NAMESPACE or peer.ip is not None:
        return []
    return [
        doc
        for doc in docs
        if doc["kind"] == "NetworkPolicy"
        and direction in doc["spec"].get("policyTypes", ["Ingress"])
        and selects(doc["spec"]["podSelector"], peer.labels)
    ]


def side_allows(docs: tuple[Doc, ...], local: Peer, remote: Peer, direction: str, port: int, protocol: str) -> bool:
    policies = policies_for(docs, local, direction)
    if not policies:
        return True  # not isolated: only pods of other namespaces, outside these manifests
    key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    server = remote if direction == "Egress" else local
    return any(
        matches_port(rule, port, protocol, server)
        and (peers_key not in rule or any(matches_peer(peer, remote) for peer in rule[peers_key]))
        for policy in policies
        for rule in policy["spec"].get(key, [])
    )


def connects(docs: tuple[Doc, ...], client: Peer, server: Peer, port: int, protocol: str = "TCP") -> bool:
    """May `client` open a connection to `server` on `port`? Both ends' policies must allow it."""
    return side_allows(docs, client, server, "Egress", port, protocol) and side_allows(
        docs, server, client, "Ingress", port, protocol
    )


def service_pods(docs: tuple[Doc, ...]) -> list[Peer]:
    """One peer per Deployment or StatefulSet of the namespace (each separator pool, Redis), as rendered."""
    peers = []
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        template = doc["spec"]["template"]
        ports = {
            port["name"]: port["containerPort"]
            for container in template["spec"]["containers"]
            for port in container.get("ports", [])
            if "name" in port
        }
        peers.append(Peer(doc["metadata"]["name"], dict(template["metadata"]["labels"]), ports=ports))
    return peers


def role(peer: Peer) -> str:
    """What a peer is, whatever its instance: every separator pool is `separator`."""
    if peer.namespace == NAMESPACE and peer.ip is None:
        return peer.labels.get("app.kubernetes.io/name", peer.name)
    return peer.name


def expected(
    client: Peer,
    server: Peer,
    port: int,
    *,
    keda: bool,
    gridfs: bool,
    downloads: bool = False,
    tracing: bool = False,
) -> bool:
    """The connections Stemflow needs, and no other.

    `keda`: the autoscaling component is in; `gridfs`: the GridFS blob store;
    `downloads`: the separator fetches its weights (no MODEL_REPO, the dev overlay);
    `tracing`: the services export spans to the collector (the tracing component).
    """
    who, what = role(client), role(server)
    if server is COLLECTOR:
        return tracing and who in SERVICES and port == 4318
    if what == "dns":
        return port == 53 and client.namespace == NAMESPACE
    if server.ip is not None:
        if downloads and who == "separator" and server in PUBLIC and port == 443:
            return True
        return who in ("ingest", "notifier") and server in PUBLIC and port in WEB
    needs = {
        ("gateway", "mongodb", 27017),
        # The notifier asks the gateway, which owns job state, on its internal port; not MongoDB.
        ("notifier", "gateway", 9200),
        ("ingress-controller", "gateway", 8000),
        ("ingress-controller", "notifier", 8001),
        ("prometheus", "rabbitmq", 15692),
    }
    needs |= {(service, "rabbitmq", 5672) for service in SERVICES}
    needs |= {(service, "redis", 6379) for service in SERVICES}
    # Scrapes: the gateway's /metrics has a port of its own; the others serve it on their `http` port.
    if what in SERVICES and port == server.ports.get("metrics", server.ports.get("http")):
        needs.add(("prometheus", what, port))
    if keda:
        needs.add(("keda", "rabbitmq", 15672))
    if gridfs:
        needs |= {(worker, "mongodb", 27017) for worker in ("ingest", "separator", "analyzer")}
    if who == what and what in ("rabbitmq", "mongodb"):
        return True  # cluster members talk among themselves on every port
    return (who, what, port) in needs


def check_matrix(
    docs: tuple[Doc, ...], *, keda: bool, gridfs: bool, downloads: bool = False, tracing: bool = False
) -> None:
    pods = [*service_pods(docs), RABBITMQ, MONGODB]
    wrong = []
    for client in [*pods, *OUTSIDERS]:
        # Outside the namespace only what enters it is these policies' business.
        servers = [*pods, DNS, COLLECTOR] if client.namespace == NAMESPACE else pods
        for server in servers:
            ports = {*server.ports.values(), *STRAY_PORTS}
            for port in sorted(ports):
                protocols = ("UDP", "TCP") if server is DNS else ("TCP",)
                for protocol in protocols:
                    want = expected(
                        client, server, port, keda=keda, gridfs=gridfs, downloads=downloads, tracing=tracing
                    )
                    if connects(docs, client, server, port, protocol) != want:
                        state = "open" if want else "shut"
                        wrong.append(f"{client.name} -> {server.name}:{port}/{protocol} should be {state}")
        if client.namespace != NAMESPACE:
            continue
        for address in [*PUBLIC, *PRIVATE]:
            for port in (*WEB, *STRAY_PORTS):
                want = expected(client, address, port, keda=keda, gridfs=gridfs, downloads=downloads)
                if connects(docs, client, address, port) != want:
                    wrong.append(f"{client.name} -> {address.ip}:{port} should be {'open' if want else 'shut'}")
    assert not wrong, "\n".join(wrong)


def test_the_namespace_denies_by_default(render, target):
    policies = {doc["metadata"]["name"]: doc for doc in render(target) if doc["kind"] == "NetworkPolicy"}
    deny = policies["default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_every_pod_has_a_policy_of_its_own(render, target):
    """Besides the namespace-wide ones (default-deny, dns), a policy names each Deployment's pods and the operators'."""
    docs = render(target)
    own = [doc for doc in docs if doc["kind"] == "NetworkPolicy" and doc["spec"]["podSelector"] not in ({}, None)]
    for pod in [*service_pods(docs), RABBITMQ, MONGODB]:
        assert any(selects(policy["spec"]["podSelector"], pod.labels) for policy in own), (
            f"no policy selects {pod.name}"
        )


def test_every_selector_in_a_policy_selects_something(render, target):
    """A misspelt label would make a policy silently useless (or an allowance silently missing)."""
    docs = render(target)
    pods = [*service_pods(docs), RABBITMQ, MONGODB]
    outside = [DNS, COLLECTOR, *OUTSIDERS]
    for policy in (doc for doc in docs if doc["kind"] == "NetworkPolicy"):
        name = policy["metadata"]["name"]
        spec = policy["spec"]
        assert any(selects(spec["podSelector"], pod.labels) for pod in pods), f"{name} selects no pod"
        for rule in [*spec.get("ingress", []), *spec.get("egress", [])]:
            for peer in rule.get("from", rule.get("to", [])):
                if "ipBlock" in peer:
                    continue
                assert any(matches_peer(peer, candidate) for candidate in [*pods, *outside]), (
                    f"{name}: {peer} matches nothing"
                )


def test_each_service_reaches_only_what_it_needs(render):
    check_matrix(render("base"), keda=False, gridfs=False)


def test_in_dev_the_separator_also_downloads_its_weights(render):
    docs = render("overlays/dev")
    assert (
        "MODEL_REPO"
        not in next(d for d in docs if d["metadata"]["name"] == "separator" and d["kind"] == "ConfigMap")["data"]
    )
    check_matrix(docs, keda=False, gridfs=False, downloads=True)


def test_each_service_reaches_only_what_it_needs_in_prod(render):
    check_matrix(render("overlays/prod"), keda=True, gridfs=False, tracing=True)


def test_with_gridfs_blobs_the_workers_reach_mongodb(render_with):
    docs = render_with("overlays/prod", ("components/gridfs-blobs",))
    check_matrix(docs, keda=True, gridfs=True, tracing=True)


def test_only_the_notifier_reaches_the_gateways_internal_api_and_it_no_longer_reaches_mongodb(render, target):
    docs = render(target)
    pods = {peer.name: peer for peer in service_pods(docs)}
    gateway, notifier = pods["gateway"], pods["notifier"]
    internal = gateway.ports["internal"]
    assert connects(docs, notifier, gateway, internal)
    assert not connects(docs, notifier, gateway, gateway.ports["http"])
    assert not connects(docs, notifier, MONGODB, 27017)
    for other in [*(p for name, p in pods.items() if name != "notifier"), *OUTSIDERS]:
        assert not connects(docs, other, gateway, internal), other.name


def widen(policy: Doc, key: str, rule: Doc) -> Doc:
    return {**policy, "spec": {**policy["spec"], key: [*policy["spec"].get(key, []), rule]}}


def test_the_check_finds_a_hole(render):
    """Opening one more path (the separator to MongoDB, at both ends) fails the matrix check."""
    to_mongodb = {"to": [{"podSelector": {"matchLabels": {"app": "mongodb-svc"}}}], "ports": [{"port": 27017}]}
    from_separator = {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "separator"}}}]}
    docs = []
    for doc in render("overlays/prod"):
        if doc["kind"] == "NetworkPolicy" and doc["metadata"]["name"] == "separator":
            doc = widen(doc, "egress", to_mongodb)
        if doc["kind"] == "NetworkPolicy" and doc["metadata"]["name"] == "mongodb":
            doc = widen(doc, "ingress", from_separator)
        docs.append(doc)
    with pytest.raises(AssertionError, match="separator -> mongodb:27017/TCP should be shut"):
        check_matrix(tuple(docs), keda=True, gridfs=False)
