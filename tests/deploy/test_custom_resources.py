"""The operators' and KEDA's custom resources against their CRD schemas (subsets in crd_schemas/, see its README)."""

from __future__ import annotations

import copy
import functools
import importlib
import json
import typing
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pydantic
import pytest
import yaml
from referencing import Registry, Resource

Doc = dict[str, Any]
SCHEMAS = Path(__file__).parent / "crd_schemas"
SCHEMA_FILES = {
    "RabbitmqCluster": "rabbitmqcluster.yaml",
    "MongoDBCommunity": "mongodbcommunity.yaml",
    "ScaledObject": "scaledobject.yaml",
    "TriggerAuthentication": "triggerauthentication.yaml",
}
# Kinds whose schema is not here: the monitoring component's (Prometheus Operator) resources.
NOT_HERE = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
# The Kubernetes release whose schemas the embedded types (resources, affinity, ...) are checked against.
KUBERNETES = "1.33"
# What the MongoDB operator merges statefulSet.spec into: its containers and claims, by name.
MONGODB_CONTAINERS = {"mongod", "mongodb-agent", "mongod-posthook", "mongodb-agent-readinessprobe"}
MONGODB_CLAIMS = {"data-volume", "logs-volume"}


@functools.cache
def kubernetes_definitions() -> Resource:
    """The definitions file of kubernetes-validate's strict schemas, which the subsets $ref."""
    package = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    (directory,) = [d for d in package.iterdir() if d.name == f"v{KUBERNETES}.0-local-strict"]
    return Resource.from_contents(json.loads((directory / "_definitions.json").read_text()))


@functools.cache
def validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = yaml.safe_load((SCHEMAS / SCHEMA_FILES[kind]).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=kubernetes_definitions() @ Registry())


def errors(doc: Doc) -> list[str]:
    return [
        f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator(doc["kind"]).iter_errors(doc)
    ]


def test_every_custom_resource_has_a_schema_here(render, target):
    built_in = {"apps", "batch", "policy", "autoscaling", "networking.k8s.io", "rbac.authorization.k8s.io", ""}
    for doc in render(target):
        group = doc["apiVersion"].rpartition("/")[0]
        if group not in built_in:
            assert doc["kind"] in SCHEMA_FILES or doc["kind"] in NOT_HERE, f"no schema for {doc['kind']}"


def test_custom_resources_match_their_schemas(render, target):
    found = [error for doc in render(target) if doc["kind"] in SCHEMA_FILES for error in errors(doc)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("RabbitmqCluster", ("spec", "replica"), 3),
        ("RabbitmqCluster", ("spec", "resources", "limit"), {"cpu": "1"}),
        ("MongoDBCommunity", ("spec", "users", 0, "passwordSecretRefs"), {"name": "x"}),
        ("MongoDBCommunity", ("spec", "type"), "Sharded"),
        ("ScaledObject", ("spec", "minReplicas"), 1),
        ("ScaledObject", ("spec", "triggers", 0, "metadata", "queuename"), "stemflow.ingest"),
        ("ScaledObject", ("spec", "triggers", 0, "metadata", "protocol"), "https"),
        ("ScaledObject", ("spec", "advanced", "horizontalPodAutoscalerConfig", "behavior", "scaleDown", "window"), 1),
        ("TriggerAuthentication", ("spec", "secretTargetRef", 0, "secret"), "x"),
    ],
)
def test_the_schemas_refuse_a_mistake(render, kind, path, value):
    """A misspelt field or a wrong value fails: the schemas are strict where the CRDs are."""
    # The separator's ScaledObject is the one with `advanced`.
    candidates = [d for d in render("overlays/prod") if d["kind"] == kind]
    doc = copy.deepcopy(next((d for d in candidates if d["metadata"]["name"] == "separator"), candidates[0]))
    assert not errors(doc)
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    assert errors(doc), f"{kind}: {'.'.join(map(str, path))} = {value!r} passed"


def test_mongodb_statefulset_overrides_merge_on_the_operators_names(render, target):
    """The operator merges statefulSet.spec by name: a misspelt container would be a new, broken one."""
    (mongodb,) = [doc for doc in render(target) if doc["kind"] == "MongoDBCommunity"]
    spec = mongodb["spec"]["statefulSet"]["spec"]
    containers = {c["name"] for c in spec.get("template", {}).get("spec", {}).get("containers", [])}
    assert containers <= MONGODB_CONTAINERS, containers - MONGODB_CONTAINERS
    claims = {claim["metadata"]["name"] for claim in spec.get("volumeClaimTemplates", [])}
    assert claims <= MONGODB_CLAIMS, claims - MONGODB_CLAIMS


def keda_models() -> Any:
    try:
        return importlib.import_module("cloudcoil.models.keda.v1alpha1")
    except ImportError:
        pytest.skip("cloudcoil-models-keda (models generated from KEDA's CRDs) is not installed")


def unknown_fields(model: Any, data: Any, where: str) -> list[str]:
    """Keys of `data` that the pydantic model generated from the CRD does not define, recursively."""
    if not (isinstance(model, type) and issubclass(model, pydantic.BaseModel)) or not isinstance(data, dict):
        return []
    fields = {(info.alias or name): info for name, info in model.model_fields.items()}
    found = []
    for key, value in data.items():
        if key not in fields:
            found.append(f"{where}.{key}")
            continue
        for candidate in _models_in(fields[key].annotation):
            items = value if isinstance(value, list) else [value]
            for item in items:
                found += unknown_fields(candidate, item, f"{where}.{key}")
    return found


def _models_in(annotation: Any) -> list[Any]:
    args = typing.get_args(annotation)
    if not args:
        return [annotation]
    return [model for arg in args for model in _models_in(arg)]


def test_keda_objects_match_the_models_generated_from_keda_crds(render):
    models = keda_models()
    kinds = {"ScaledObject": models.ScaledObject, "TriggerAuthentication": models.TriggerAuthentication}
    for doc in render("overlays/prod"):
        if doc["kind"] in kinds:
            model = kinds[doc["kind"]]
            model.model_validate(doc)
            spec_model = model.model_fields["spec"].annotation
            (spec_class,) = [m for m in _models_in(spec_model) if m is not type(None)]
            assert not unknown_fields(spec_class, doc["spec"], doc["kind"]), doc["metadata"]["name"]


def test_the_keda_subset_names_only_fields_keda_has():
    """Every field the hand-written subset allows in a ScaledObject's spec exists in KEDA's CRD."""
    models = keda_models()
    schema = yaml.safe_load((SCHEMAS / "scaledobject.yaml").read_text())["properties"]["spec"]
    defined = {(info.alias or name) for name, info in models.ScaledObjectSpec.model_fields.items()}
    assert set(schema["properties"]) <= defined, set(schema["properties"]) - defined
    (trigger_model,) = _models_in(models.ScaledObjectSpec.model_fields["triggers"].annotation)
    trigger = {(info.alias or name) for name, info in trigger_model.model_fields.items()}
    assert set(schema["properties"]["triggers"]["items"]["properties"]) <= trigger, "triggers"
