"""Signed webhooks: `job.completed` and `job.failed` POSTed to the job's `options.callback_url`.

The request body is the CloudEvent itself (structured JSON,
`Content-Type: application/cloudevents+json`, without internal fields: see public.py), with these headers:

    Stemflow-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
    Stemflow-Event-Id: <the CloudEvent id: the same on every retry, deduplicate on it>
    Stemflow-Event-Type: job.completed | job.failed
    Stemflow-Attempt: <1, 2, ...>

A receiver recomputes the HMAC over the timestamp, a dot and the raw body bytes
with the shared secret (`WEBHOOK_SECRET`), compares it in constant time, and
rejects timestamps a few minutes old (replays). The timestamp is that of the
attempt, so each retry is signed afresh.

The job's callback URL comes from the gateway, which owns job state (its internal
API: gateway_client.py). The URL goes through `stemflow_shared.netguard`, as ingest's `source_url` does:
http(s) only, no credentials in the URL, every address the host resolves to
public unless `WEBHOOK_ALLOW_PRIVATE` (cloud metadata addresses never), and the
connection pinned to the checked address. Redirects are not followed: a 3xx
answer gives the webhook up at once (the same URL would answer the same). A 2xx
answer is delivery.
Network errors, timeouts, 408, 429 and 5xx are retried with exponential backoff
(a `Retry-After` is honoured up to the cap) until `WEBHOOK_MAX_ATTEMPTS`; then
the webhook is given up: a log line, a metric, and the message dead-lettered
with the reason. Other 3xx and 4xx answers and refused addresses are given up at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx

from stemflow_shared import metrics
from stemflow_shared.events import CONTENT_TYPE, Event
from stemflow_shared.messaging import PermanentError
from stemflow_shared.netguard import UrlRefused, guarded_request

from .gateway_client import GatewayClient, let_go_of_stream
from .public import public_json

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Stemflow-Signature"
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The `Stemflow-Signature` header value for a body sent at `timestamp`."""
    digest = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


@dataclass(frozen=True)
class Policy:
    max_attempts: int = 6
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 10.0
    allow_private: bool = False

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Wait before attempt `attempt + 1`: doubling, jittered by up to 10%, at least Retry-After, capped."""
        delay = self.backoff_s * 2 ** (attempt - 1) * random.uniform(0.9, 1.0)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.backoff_max_s)


@dataclass(frozen=True)
class Attempt:
    outcome: str  # delivered, retry, rejected
    detail: str
    retry_after: float | None = None


class Webhooks:
    """Sends the webhook of a terminal job event, if the job asked for one."""

    def __init__(self, http: httpx.AsyncClient, gateway: GatewayClient, secret: bytes | None, policy: Policy) -> None:
        self._http = http
        self._gateway = gateway
        self._secret = secret
        self._policy = policy

    async def handle(self, event: Event[Any]) -> None:
        # The gateway keeps the job's callback URL; if it cannot be asked now, the event is retried.
        job = await self._gateway.job(event.data.owner, event.data.job_id)
        url = job.callback_url if job is not None else None
        if not url:
            return
        if self._secret is None:
            metrics.WEBHOOK_DELIVERIES.labels("disabled").inc()
            raise PermanentError("webhooks_disabled", "WEBHOOK_SECRET is not set; the webhook cannot be signed")
        await self.deliver(url, public_json(event.envelope), event.id, event.spec.name)

    async def deliver(self, url: str, body: bytes, event_id: str, event_name: str) -> None:
        """POST until delivered; raise PermanentError when given up."""
        for attempt in range(1, self._policy.max_attempts + 1):
            result = await self._attempt(url, body, event_id, event_name, attempt)
            if result.outcome == "delivered":
                metrics.WEBHOOK_DELIVERIES.labels("delivered").inc()
                return
            if result.outcome == "rejected":
                metrics.WEBHOOK_DELIVERIES.labels("rejected").inc()
                log.warning("webhook %s for event %s rejected: %s", event_name, event_id, result.detail)
                raise PermanentError("webhook_rejected", result.detail)
            if attempt < self._policy.max_attempts:
                metrics.WEBHOOK_DELIVERIES.labels("retried").inc()
                delay = self._policy.delay(attempt, result.retry_after)
                log.info(
                    "webhook %s attempt %d failed (%s); retrying in %.2f s", event_id, attempt, result.detail, delay
                )
                await asyncio.sleep(delay)
        metrics.WEBHOOK_DELIVERIES.labels("given_up").inc()
        log.warning(
            "webhook %s for event %s given up after %d attempts: %s",
            event_name,
            event_id,
            self._policy.max_attempts,
            result.detail,
        )
        raise PermanentError("webhook_failed", f"{self._policy.max_attempts} attempts: {result.detail}")

    async def _attempt(self, url: str, body: bytes, event_id: str, event_name: str, attempt: int) -> Attempt:
        assert self._secret is not None
        headers = {
            "Content-Type": CONTENT_TYPE,
            "User-Agent": "Stemflow-Webhooks/1",
            SIGNATURE_HEADER: sign(self._secret, int(time.time()), body),
            "Stemflow-Event-Id": event_id,
            "Stemflow-Event-Type": event_name,
            "Stemflow-Attempt": str(attempt),
        }
        started = time.perf_counter()
        try:
            async with guarded_request(
                self._http,
                "POST",
                url,
                allow_private=self._policy.allow_private,
                follow_redirects=False,
                content=body,
                headers=headers,
                timeout=self._policy.timeout_s,
            ) as response:
                attempt = _classify(response)
            let_go_of_stream(response)
            return attempt
        except UrlRefused as exc:
            return Attempt("rejected" if exc.code == "url_forbidden" else "retry", str(exc))
        except httpx.HTTPError as exc:
            return Attempt("retry", f"{type(exc).__name__}: {exc}"[:300])
        finally:
            metrics.WEBHOOK_DURATION.observe(time.perf_counter() - started)


def _classify(response: httpx.Response) -> Attempt:
    status = response.status_code
    if 200 <= status < 300:
        return Attempt("delivered", f"HTTP {status}")
    if status in RETRYABLE_STATUS or status >= 500:
        return Attempt("retry", f"HTTP {status}", _retry_after(response.headers.get("retry-after")))
    if response.is_redirect:
        # The same URL would answer the same: the receiver's address is wrong, not busy.
        location = response.headers.get("location", "")[:200]
        return Attempt("rejected", f"HTTP {status}: redirects are not followed (Location: {location})")
    return Attempt("rejected", f"HTTP {status}")


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
