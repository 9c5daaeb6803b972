"""MongoDB command monitoring: commands slower than a threshold are counted and logged."""

from __future__ import annotations

import logging

from pymongo import monitoring

from stemflow_shared import metrics

log = logging.getLogger(__name__)


class SlowCommandLogger(monitoring.CommandListener):
    """Counts and logs MongoDB commands slower than the threshold."""

    def __init__(self, threshold_ms: float) -> None:
        self.threshold_ms = threshold_ms

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        return None

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        millis = event.duration_micros / 1000
        if millis > self.threshold_ms:
            metrics.MONGODB_SLOW_COMMANDS.labels(event.command_name).inc()
            log.warning("slow MongoDB command %s took %.1f ms", event.command_name, millis)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        return None
