"""Broker topology: exchange and queue names and bindings, defined once.

Names take a namespace (default ``stemflow``) so that test runs and several
deployments can share one broker without seeing each other's messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .events import (
    ANALYSIS_COMPLETED,
    ANALYSIS_FAILED,
    ANALYSIS_REQUESTED,
    AUDIO_INGESTED,
    INGEST_FAILED,
    JOB_CANCELLED,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_MIX_COMPLETED,
    JOB_MIX_FAILED,
    JOB_MIX_PROGRESS,
    JOB_PROGRESS,
    JOB_SUBMITTED,
    MIX_COMPLETED,
    MIX_FAILED,
    MIX_PROGRESS,
    MIX_REQUESTED,
    SEPARATION_COMPLETED,
    SEPARATION_FAILED,
    SEPARATION_PROGRESS,
    Event,
    EventSpec,
    Model,
)

DEFAULT_NAMESPACE = "stemflow"

# Headers set on a message this project dead-letters itself.
REASON_HEADER = "x-stemflow-reason"
DETAIL_HEADER = "x-stemflow-detail"
QUEUE_HEADER = "x-stemflow-queue"
SERVICE_HEADER = "x-stemflow-service"
# Headers that route separation work to the workers of one model (and its priority lane).
MODEL_HEADER = "stemflow-model"
PRIORITY_HEADER = "stemflow-priority"
MODELS: tuple[str, ...] = Model.__args__  # type: ignore[attr-defined]
PRIORITIES = ("normal", "high")


@dataclass(frozen=True)
class QueueSpec:
    """A service's input queue: its short name and the events it is bound to.

    A queue with `match` headers is bound to the work exchange (a headers exchange
    fed with `audio.ingested`) instead of by routing key: that is how separation
    work reaches only the workers that keep its model warm.
    """

    name: str
    events: tuple[EventSpec, ...]
    per_replica: bool = False
    match: tuple[tuple[str, str], ...] = ()

    @property
    def routing_keys(self) -> tuple[str, ...]:
        return tuple(spec.routing_key for spec in self.events)


def separator_queue(model: str, priority: str = "normal") -> QueueSpec:
    """The queue of one model's separation work; `high` priority jobs have a lane of their own."""
    if model not in MODELS or priority not in PRIORITIES:
        raise ValueError(f"no separator queue for model {model!r}, priority {priority!r}")
    suffix = "" if priority == "normal" else f".{priority}"
    return QueueSpec(
        f"separator.{model}{suffix}",
        (AUDIO_INGESTED,),
        match=((MODEL_HEADER, model), (PRIORITY_HEADER, priority)),
    )


def routing_headers(event: Event[Any]) -> dict[str, str]:
    """Headers the work exchange routes on (only separation work has them)."""
    if event.spec is AUDIO_INGESTED:
        options = event.data.options
        return {MODEL_HEADER: options.model, PRIORITY_HEADER: options.priority}
    return {}


INGEST_QUEUE = QueueSpec("ingest", (JOB_SUBMITTED,))
SEPARATOR_QUEUES: tuple[QueueSpec, ...] = tuple(separator_queue(m, p) for m in MODELS for p in PRIORITIES)
# A job that separates is analysed once its stems exist: the gateway then asks with `analysis.requested`.
ANALYZER_QUEUE = QueueSpec("analyzer", (AUDIO_INGESTED, ANALYSIS_REQUESTED))
# Practice mixes: rendered by the analyzer's warm CPU workers, on a queue of their own (its dead letters end the mix).
MIXER_QUEUE = QueueSpec("mixer", (MIX_REQUESTED,))
GATEWAY_QUEUE = QueueSpec(
    "gateway",
    (
        JOB_SUBMITTED,
        AUDIO_INGESTED,
        INGEST_FAILED,
        SEPARATION_PROGRESS,
        SEPARATION_COMPLETED,
        SEPARATION_FAILED,
        ANALYSIS_COMPLETED,
        ANALYSIS_FAILED,
        MIX_PROGRESS,
        MIX_COMPLETED,
        MIX_FAILED,
    ),
)
# Every notifier replica binds a queue of its own, so any replica can serve any client.
NOTIFIER_QUEUE = QueueSpec(
    "notifier",
    (JOB_PROGRESS, JOB_COMPLETED, JOB_FAILED, JOB_CANCELLED, JOB_MIX_PROGRESS, JOB_MIX_COMPLETED, JOB_MIX_FAILED),
    per_replica=True,
)
# Webhooks are sent once per event whatever the number of notifier replicas: one shared queue.
WEBHOOKS_QUEUE = QueueSpec("webhooks", (JOB_COMPLETED, JOB_FAILED))

ALL_QUEUES: tuple[QueueSpec, ...] = (
    INGEST_QUEUE,
    *SEPARATOR_QUEUES,
    ANALYZER_QUEUE,
    MIXER_QUEUE,
    GATEWAY_QUEUE,
    NOTIFIER_QUEUE,
    WEBHOOKS_QUEUE,
)
# Queues every service declares at start, so no event is published before its queue exists.
SHARED_QUEUES: tuple[QueueSpec, ...] = tuple(q for q in ALL_QUEUES if not q.per_replica)
# Events that must reach a shared queue; publishing one that the broker cannot route is an error.
# The others (job.*) fan out to notifier replicas, of which there may be none at a given moment.
ROUTED_EVENTS: frozenset[str] = frozenset(spec.name for q in SHARED_QUEUES for spec in q.events)


@dataclass(frozen=True)
class Names:
    """Concrete broker names for one namespace."""

    namespace: str = DEFAULT_NAMESPACE

    @property
    def exchange(self) -> str:
        return f"{self.namespace}.events"

    @property
    def work_exchange(self) -> str:
        return f"{self.namespace}.separation"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.namespace}.dead-letter"

    @property
    def dead_letter_watch_queue(self) -> str:
        """A second copy of every dead letter, which the gateway consumes to end the jobs they belong to."""
        return f"{self.namespace}.dead-letter.watch"

    def short_queue(self, queue: str) -> str:
        """A queue's name without the namespace (`stemflow.separator.htdemucs` → `separator.htdemucs`)."""
        return queue.removeprefix(f"{self.namespace}.")

    def queue(self, spec: QueueSpec, replica: str | None = None) -> str:
        if spec.per_replica:
            if not replica:
                raise ValueError(f"queue {spec.name!r} needs a replica id")
            return f"{self.namespace}.{spec.name}.{replica}"
        return f"{self.namespace}.{spec.name}"
