"""The Kubernetes manifests as kustomize renders them: API schemas, and what a reviewer checks by hand."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

Doc = dict[str, Any]

# The oldest and the newest Kubernetes release the built-in objects must be valid for.
KUBERNETES_VERSIONS = ("1.29", "1.33")
# API groups of Kubernetes itself; the rest (operators', KEDA's) are checked in test_custom_resources.py.
BUILT_IN_GROUPS = {"", "apps", "batch", "policy", "autoscaling"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
# The services' own workloads: Deployments, and the notifier's StatefulSet (stable replica names).
SERVICE_WORKLOADS = {"Deployment", "StatefulSet"}
CONNECTION_SECRET = "stemflow-connections"
CONNECTION_KEYS = ("AMQP_URL", "MONGODB_URL", "REDIS_URL")
# With the filesystem blob store only the gateway talks to MongoDB (components/gridfs-blobs adds the workers);
# the notifier asks the gateway's internal API.
MONGODB_USERS = {"gateway"}
BLOB_USERS = {"gateway", "ingest", "separator", "analyzer"}
# Secrets that the operators make, not people (so not in secrets.example.yaml).
OPERATOR_SECRETS = {"rabbitmq-default-user"}
# In dev, Tilt's live update writes the edited source into these containers.
LIVE_UPDATED_IN_DEV = {"gateway", "ingest", "separator", "analyzer", "notifier"}
SERVED = {"gateway", "notifier"}
# A URL with a user and password in it, e.g. amqp://user:secret@host/.
CREDENTIAL_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)


def find(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    matches = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def workloads(docs: tuple[Doc, ...]) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] in WORKLOAD_KINDS]


def deployments_of(docs: tuple[Doc, ...], service: str) -> list[Doc]:
    """A service's workloads: one, or for the separator one Deployment per pool."""
    found = [
        doc
        for doc in docs
        if doc["kind"] in SERVICE_WORKLOADS
        and doc["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == service
    ]
    assert found, f"no workload of {service}"
    return found


def built_in(doc: Doc) -> bool:
    group = doc["apiVersion"].rpartition("/")[0]
    return group in BUILT_IN_GROUPS or group.endswith(".k8s.io")


def pod_spec(workload: Doc) -> Doc:
    return workload["spec"]["template"]["spec"]


def containers(workload: Doc) -> list[Doc]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_values(docs: tuple[Doc, ...]) -> Iterator[tuple[str, str, str]]:
    """(where, name, value) of every literal env value and ConfigMap entry."""
    for workload in workloads(docs):
        for container in containers(workload):
            for var in container.get("env", []):
                if "value" in var:
                    yield f"{workload['metadata']['name']}/{container['name']}", var["name"], str(var["value"])
    for config in (doc for doc in docs if doc["kind"] == "ConfigMap"):
        for key, value in config.get("data", {}).items():
            yield f"ConfigMap/{config['metadata']['name']}", key, str(value)


def test_everything_is_in_the_stemflow_namespace(render, target):
    for doc in render(target):
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == "stemflow"
        else:
            assert doc["metadata"].get("namespace") == "stemflow", name
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "stemflow", name


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_built_in_objects_match_the_kubernetes_schemas(render, target, version):
    errors = []
    for doc in render(target):
        if not built_in(doc):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_every_container_has_probes_requests_and_limits(render, target):
    for workload in workloads(render(target)):
        for container in pod_spec(workload)["containers"]:
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert "livenessProbe" in container, where
            assert "readinessProbe" in container, where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container.get("resources", {}).get(bound, {})), f"{where} {bound}"


def test_every_pod_runs_locked_down(render, target):
    for workload in workloads(render(target)):
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        pod_security = spec.get("securityContext", {})
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        tmp_volumes = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for container in containers(workload):
            where = f"{name}/{container['name']}"
            security = container.get("securityContext", {})
            assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in security.get("capabilities", {}).get("drop", []), where
            if target == "overlays/dev" and container["name"] in LIVE_UPDATED_IN_DEV:
                continue
            assert security.get("readOnlyRootFilesystem") is True, where
            tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in tmp_volumes, f"{where}: /tmp needs an emptyDir"


def test_no_credentials_in_plain_text(render, target):
    docs = render(target)
    assert not [doc for doc in docs if doc["kind"] == "Secret"], "Secrets are created by hand, never committed"
    for where, name, value in env_values(docs):
        assert not CREDENTIAL_URL.search(value), f"{where} {name} holds credentials"
        assert not (SECRET_NAME.search(name) and value), f"{where} {name} looks like a secret"
        assert name not in CONNECTION_KEYS, f"{where} {name} belongs in the Secret {CONNECTION_SECRET}"


def test_each_service_is_complete_and_consistent(render, target, service, ports):
    docs = render(target)
    for deployment in deployments_of(docs, service):
        check_deployment(docs, deployment, service, ports[service])


def check_deployment(docs: tuple[Doc, ...], deployment: Doc, service: str, port: int) -> None:
    spec = pod_spec(deployment)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = spec["containers"]
    account = find(docs, "ServiceAccount", spec["serviceAccountName"])
    (config_name,) = [source["configMapRef"]["name"] for source in container["envFrom"]]
    config = find(docs, "ConfigMap", config_name)["data"]
    budgets = [
        doc
        for doc in docs
        if doc["kind"] == "PodDisruptionBudget" and doc["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ]

    assert account["automountServiceAccountToken"] is False
    assert len(budgets) == 1, f"{deployment['metadata']['name']}: one PodDisruptionBudget, not {len(budgets)}"
    assert container["image"].split(":")[0] == f"stemflow/{service}"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    assert config["HTTP_PORT"] == str(port)
    assert config["OTEL_SERVICE_NAME"] == service
    assert {"name": "http", "containerPort": port} in container["ports"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    if service == "gateway":  # /metrics on a port of its own (METRICS_PORT, default 9100), not on the API's
        metrics_port = int(config.get("METRICS_PORT", "9100"))
        assert {"name": "metrics", "containerPort": metrics_port} in container["ports"]
        assert annotations["prometheus.io/port"] == str(metrics_port) != str(port)
    else:
        assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}

    secret_refs = {
        var["name"]: var["valueFrom"]["secretKeyRef"]
        for var in container.get("env", [])
        if "secretKeyRef" in var.get("valueFrom", {})
    }
    gridfs = config.get("BLOB_BACKEND") == "gridfs"
    for key in CONNECTION_KEYS:
        needed = key != "MONGODB_URL" or service in MONGODB_USERS or (gridfs and service in BLOB_USERS)
        if needed:
            assert secret_refs.get(key) == {"name": CONNECTION_SECRET, "key": key}, key
        else:
            assert key not in secret_refs, f"{service} does not need {key}"

    if service in SERVED:
        service_object = find(docs, "Service", service)
        assert service_object["spec"]["selector"].items() <= pod_labels.items()
        assert [(p["port"], p["targetPort"]) for p in service_object["spec"]["ports"]] == [(port, "http")]
    if service in BLOB_USERS and not gridfs:
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert claims[mounts[config["BLOB_DIR"]]] == "stemflow-blobs"
        find(docs, "PersistentVolumeClaim", "stemflow-blobs")


def test_the_gridfs_component_moves_every_blob_into_mongodb(render_with, services, ports):
    docs = render_with("overlays/prod", ("components/gridfs-blobs",))
    assert not [
        doc for doc in docs if doc["kind"] == "PersistentVolumeClaim" and doc["metadata"]["name"] == "stemflow-blobs"
    ]
    for service in BLOB_USERS:
        for deployment in deployments_of(docs, service):
            check_deployment(docs, deployment, service, ports[service])
            (container,) = pod_spec(deployment)["containers"]
            assert "blobs" not in {m["name"] for m in container["volumeMounts"]}
            assert "blobs" not in {v["name"] for v in pod_spec(deployment)["volumes"]}
            (config,) = [source["configMapRef"]["name"] for source in container["envFrom"]]
            assert find(docs, "ConfigMap", config)["data"]["BLOB_BACKEND"] == "gridfs"


def test_rabbitmq_and_mongodb_come_from_their_operators(render, target):
    docs = render(target)
    size = 1 if target == "overlays/dev" else 3
    rabbitmq = find(docs, "RabbitmqCluster", "rabbitmq")
    assert rabbitmq["apiVersion"] == "rabbitmq.com/v1beta1"
    assert rabbitmq["spec"]["replicas"] == size
    assert {"requests", "limits"} <= set(rabbitmq["spec"]["resources"])

    mongodb = find(docs, "MongoDBCommunity", "mongodb")
    assert mongodb["apiVersion"] == "mongodbcommunity.mongodb.com/v1"
    assert mongodb["spec"]["type"] == "ReplicaSet"
    assert mongodb["spec"]["members"] == size
    assert isinstance(mongodb["spec"]["version"], str)
    assert mongodb["spec"]["security"]["authentication"]["modes"] == ["SCRAM"]
    for user in mongodb["spec"]["users"]:
        assert "password" not in user
        assert user["passwordSecretRef"]["name"]
        assert user["scramCredentialsSecretName"]


def test_a_drain_takes_one_member_of_each_cluster_at_a_time(render, target):
    """The operators make no PodDisruptionBudget; these keep RabbitMQ's and MongoDB's majority through drains."""
    docs = render(target)
    # The labels the operators give their pods.
    members = {
        "rabbitmq": {"app.kubernetes.io/name": "rabbitmq", "app.kubernetes.io/component": "rabbitmq"},
        "mongodb": {"app": "mongodb-svc"},
    }
    for name, labels in members.items():
        budget = find(docs, "PodDisruptionBudget", name)["spec"]
        assert budget["maxUnavailable"] == 1
        assert budget["selector"]["matchLabels"].items() <= labels.items()


def test_redis_requires_a_password_from_a_secret(render, target):
    docs = render(target)
    (container,) = pod_spec(find(docs, "Deployment", "redis"))["containers"]
    assert "--requirepass" in container["args"]
    (password,) = [var for var in container["env"] if var["name"] == "REDIS_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"]["name"] == "stemflow-redis"
    assert find(docs, "Service", "redis")["spec"]["ports"][0]["port"] == 6379


REDIS_UNITS = {"kb": 1024, "mb": 1024**2, "gb": 1024**3}
KUBERNETES_UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


def test_redis_evicts_before_the_kernel_kills_it(render, target):
    """maxmemory (Redis' units: 1mb = 1 MiB) leaves room under the memory limit for buffers and fragmentation."""
    (container,) = pod_spec(find(render(target), "Deployment", "redis"))["containers"]
    args = container["args"]
    amount = re.fullmatch(r"(\d+)(kb|mb|gb)", args[args.index("--maxmemory") + 1])
    assert amount, "maxmemory in kb, mb or gb"
    maxmemory = int(amount.group(1)) * REDIS_UNITS[amount.group(2)]
    limit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", container["resources"]["limits"]["memory"])
    assert limit
    assert maxmemory <= 0.8 * int(limit.group(1)) * KUBERNETES_UNITS[limit.group(2)]
    assert args[args.index("--maxmemory-policy") + 1] == "volatile-lru", "only keys with a TTL are evicted"


def test_the_blob_volume_is_shared_except_on_a_single_dev_node(render, target):
    claim = find(render(target), "PersistentVolumeClaim", "stemflow-blobs")
    expected = ["ReadWriteOnce"] if target == "overlays/dev" else ["ReadWriteMany"]
    assert claim["spec"]["accessModes"] == expected


def test_notifier_replicas_keep_their_names_and_with_them_their_queues(render, target):
    """Each replica's queue is named after its pod: a StatefulSet's pod comes back under the same name, finds
    its durable queue with the events published while it was down, and logs them for resume."""
    docs = render(target)
    assert not [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "notifier"]
    notifier = find(docs, "StatefulSet", "notifier")
    (container,) = containers(notifier)
    (replica_id,) = [var for var in container["env"] if var["name"] == "REPLICA_ID"]
    assert replica_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert notifier["spec"]["podManagementPolicy"] == "Parallel"  # started and scaled all at once
    governing = find(docs, "Service", notifier["spec"]["serviceName"])
    assert governing["spec"]["selector"].items() <= notifier["spec"]["template"]["metadata"]["labels"].items()
    if target == "overlays/dev":  # Tilt's live update writes into it, as into the Deployments
        assert container["securityContext"]["readOnlyRootFilesystem"] is False


def test_the_notifier_asks_the_gateways_internal_port_with_the_token_the_gateway_requires(render, target):
    """No MongoDB for the notifier: its GATEWAY_INTERNAL_URL is the Service gateway-internal (the gateway's
    `internal` port, apart from the public Service the ingress routes), and both read INTERNAL_TOKEN from the
    same Secret key."""
    docs = render(target)
    gateway, notifier = find(docs, "Deployment", "gateway"), find(docs, "StatefulSet", "notifier")
    (gateway_container,), (notifier_container,) = containers(gateway), containers(notifier)
    assert {"name": "internal", "containerPort": 9200} in gateway_container["ports"]
    internal = find(docs, "Service", "gateway-internal")["spec"]
    assert internal["selector"].items() <= gateway["spec"]["template"]["metadata"]["labels"].items()
    (service_port,) = internal["ports"]
    assert service_port["targetPort"] == "internal"
    config = find(docs, "ConfigMap", "notifier")["data"]
    assert config["GATEWAY_INTERNAL_URL"] == f"http://gateway-internal:{service_port['port']}"
    assert not [name for name in config if name.startswith("MONGODB")]

    def token(container: Doc) -> Doc:
        (var,) = [v for v in container["env"] if v["name"] == "INTERNAL_TOKEN"]
        return var["valueFrom"]["secretKeyRef"]

    assert (
        token(gateway_container) == token(notifier_container) == {"name": "stemflow-internal", "key": "INTERNAL_TOKEN"}
    )
    assert not [v for v in notifier_container["env"] if v["name"].startswith("MONGODB")]


def test_prod_runs_every_separator_pool_on_a_gpu(render):
    docs = render("overlays/prod")
    for pool in deployments_of(docs, "separator"):
        spec = pod_spec(pool)
        (container,) = spec["containers"]
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        assert str(container["resources"]["requests"]["nvidia.com/gpu"]) == "1"
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        assert spec["nodeSelector"]
        assert spec["runtimeClassName"] == "nvidia"
        assert container["image"].endswith(":cuda")
        (config,) = [source["configMapRef"]["name"] for source in container["envFrom"]]
        data = find(docs, "ConfigMap", config)["data"]
        assert data["DEVICE"] == "cuda"
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts[data["MODEL_REPO"]]["readOnly"] is True, "models come from the separator-models volume"


def service_settings(docs: tuple[Doc, ...], service: str) -> list[dict[str, str]]:
    """The ConfigMap data each Deployment of a service reads its environment from."""
    found = []
    for deployment in deployments_of(docs, service):
        (container,) = pod_spec(deployment)["containers"]
        (config,) = [source["configMapRef"]["name"] for source in container["envFrom"]]
        found.append(find(docs, "ConfigMap", config)["data"])
    return found


def test_prod_traces_one_job_in_ten_through_a_collector(render, services):
    docs = render("overlays/prod")
    for service in services:
        for data in service_settings(docs, service):
            assert data["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://otel-collector."), service
            assert data["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
            # Parent-based everywhere: the gateway decides per job, the others follow its decision.
            assert data["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
            assert float(data["OTEL_TRACES_SAMPLER_ARG"]) == 0.1
            assert data["OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED"] == "true"  # lost spans are counted
            assert data["OTEL_SERVICE_NAME"] == service


def test_without_the_tracing_component_nothing_is_exported(render, services):
    for target in ("base", "overlays/dev"):
        docs = render(target)
        for service in services:
            for data in service_settings(docs, service):
                assert not any(key.startswith("OTEL_EXPORTER") or key == "OTEL_TRACES_SAMPLER" for key in data), (
                    target,
                    service,
                )


def test_prod_replicates_every_service(render, services):
    docs = render("overlays/prod")
    for service in services:
        assert sum(d["spec"]["replicas"] for d in deployments_of(docs, service)) >= 2, service


def test_prod_routes_only_the_public_api_through_the_ingress(render, ports):
    docs = render("overlays/prod")
    routes = {}
    for ingress in (doc for doc in docs if doc["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                routes[path["path"]] = (backend["name"], backend["port"]["name"])
                assert [p["name"] for p in find(docs, "Service", backend["name"])["spec"]["ports"]] == ["http"]
    assert routes == {"/v1": ("gateway", "http"), "/v1/ws": ("notifier", "http")}


def test_dev_runs_one_of_everything_without_a_gpu(render):
    docs = render("overlays/dev")
    assert len(deployments_of(docs, "separator")) == 1, "one separator pool, serving every model, on the CPU"
    for deployment in (doc for doc in docs if doc["kind"] in SERVICE_WORKLOADS):
        assert deployment["spec"]["replicas"] == 1, deployment["metadata"]["name"]
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs)
    assert not find(docs, "Deployment", "separator")["spec"]["template"]["spec"]["containers"][0]["image"].endswith(
        "cuda"
    )


def test_every_image_is_built_here_or_pinned(render, repo: Path):
    tiltfile = (repo / "Tiltfile").read_text()
    images = {
        c["image"]
        for target in ("base", "overlays/dev", "overlays/prod")
        for w in workloads(render(target))
        for c in containers(w)
    }
    for image in images:
        name, _, tag = image.partition(":")
        if name.startswith("stemflow/"):
            service = name.removeprefix("stemflow/")
            assert (repo / "services" / service / "Dockerfile").is_file(), image
            assert re.search(rf"docker_build\(\s*'{re.escape(name)}'", tiltfile), (
                f"no docker_build for {name} in the Tiltfile"
            )
        else:
            assert tag and tag != "latest", f"{image}: pin third-party images to a version"


def test_the_secrets_example_covers_every_reference_with_placeholders(render, repo: Path):
    path = repo / "deploy" / "k8s" / "secrets.example.yaml"
    example = {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}
    for doc in example.values():
        assert doc["kind"] == "Secret"
        assert all("CHANGE-ME" in value for value in doc["stringData"].values()), doc["metadata"]["name"]

    for target in ("base", "overlays/dev", "overlays/prod"):
        docs = render(target)
        for workload in workloads(docs):
            for container in containers(workload):
                for var in container.get("env", []):
                    ref = var.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in example[ref["name"]]["stringData"], f"{ref} is not in the example"
        for user in find(docs, "MongoDBCommunity", "mongodb")["spec"]["users"]:
            ref = user["passwordSecretRef"]
            assert ref.get("key", "password") in example[ref["name"]]["stringData"]
        for auth in (doc for doc in docs if doc["kind"] == "TriggerAuthentication"):
            for ref in auth["spec"].get("secretTargetRef", []):
                assert ref["name"] in OPERATOR_SECRETS or ref["key"] in example[ref["name"]]["stringData"], ref
        for ingress in (doc for doc in docs if doc["kind"] == "Ingress"):
            for tls in ingress["spec"].get("tls", []):
                assert example[tls["secretName"]]["type"] == "kubernetes.io/tls"

    for kustomization in (repo / "deploy").rglob("kustomization.yaml"):
        entries = yaml.safe_dump(yaml.safe_load(kustomization.read_text()))  # without the comments
        assert "secrets.example" not in entries, kustomization
