"""Events in: `job.*` (and `job.mix.*`) to the connected clients (through the resume log), terminal ones to webhooks."""

from __future__ import annotations

import logging
from typing import Any

from stemflow_shared.events import (
    JOB_COMPLETED,
    JOB_FAILED,
    TERMINAL_JOB_EVENTS,
    Event,
    EventSpec,
)
from stemflow_shared.messaging import Handler
from stemflow_shared.topology import NOTIFIER_QUEUE

from .mailbox import Item
from .public import public_json
from .relay import Relay
from .webhooks import Webhooks

log = logging.getLogger(__name__)


def job_event_handlers(relay: Relay) -> dict[EventSpec[Any], Handler]:
    async def on_job_event(event: Event[Any]) -> None:
        item = Item(
            id=event.id,
            owner=event.data.owner,
            job_id=event.data.job_id,
            type=event.envelope.type,
            json=public_json(event.envelope).decode(),
        )
        await relay.submit(item)
        if event.spec in TERMINAL_JOB_EVENTS:
            log.info("relayed %s", event.spec.name)

    # Every event the replica's queue is bound to (one list: the topology's).
    return {spec: on_job_event for spec in NOTIFIER_QUEUE.events}


def webhook_handlers(webhooks: Webhooks) -> dict[EventSpec[Any], Handler]:
    async def on_terminal_event(event: Event[Any]) -> None:
        await webhooks.handle(event)

    return {JOB_COMPLETED: on_terminal_event, JOB_FAILED: on_terminal_event}
