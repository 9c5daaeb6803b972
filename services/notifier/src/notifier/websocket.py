"""`GET /v1/ws`: job events pushed to a client in batches.

Authentication: `Authorization: Bearer <api key>`; from a browser, which cannot
set headers on a WebSocket, the subprotocols `stemflow` and
`stemflow.bearer.<api key>` (`new WebSocket(url, ["stemflow", "stemflow.bearer." + key])`):
the key travels in the `Sec-WebSocket-Protocol` header, not in the URL (which
proxies, access logs and browser history keep), and the handshake answers with
the plain `stemflow` subprotocol, never the one holding the key. `?token=<api key>`
still works for existing clients. Without a valid key the handshake is refused
with HTTP 401 (a problem+json body); no WebSocket is opened. When the key cannot
be checked (the gateway, which owns the keys, does not answer) it is refused with 503.

Client messages (JSON objects):
  {"type": "subscribe", "job_id": ID?, "last_event_id": ID?}   no job_id: all of the key's jobs
  {"type": "subscribe", "batch_id": ID}                         every job of a batch (POST /v1/batches)
  {"type": "unsubscribe", "job_id": ID?}
  {"type": "ping"}
`?job_id=` and `&last_event_id=` (or `?batch_id=`) on the URL subscribe at once.

Server messages:
  {"type": "subscribed", "job_id", "state"?, "jobs"?, "resumed"?}
      state: the job now, its document as GET /v1/jobs/{id} returns it (job subscriptions);
      jobs: the documents of the key's unfinished jobs, newest first, at most SNAPSHOT_MAX_JOBS
      (subscriptions to all jobs, when any)
  {"type": "subscribed", "batch_id", "jobs"}              the batch's jobs now, in submission order
  {"type": "batch", "events": [CloudEvent, ...]}           oldest first
  {"type": "unsubscribed", "job_id"}, {"type": "pong"}
  {"type": "error", "code", "message", "job_id"?}     code `unavailable`: the job state could not be
                                                        read just now (the gateway); try again
`subscribed` comes before any event of the subscription. With `last_event_id`,
the events after it follow first (in order, none twice), then live ones;
`resumed: false` means that event was no longer kept (refresh over HTTP).

Close codes:
  1000  normal closure (the client's, or the server's answer to it)
  1009  a client message larger than MAX_MESSAGE_BYTES
  1011  no pong to a keep-alive ping within PING_TIMEOUT_S (the peer is gone)
  1012  the notifier is restarting: reconnect (any replica) with last_event_id
  4000  idle: nothing sent either way for IDLE_TIMEOUT_S
  4008  too slow: the client did not keep up with its events; reconnect with
        last_event_id, nothing is lost (events are kept in Redis)
  4401  the API key was revoked
A client that reads nothing for SEND_TIMEOUT_S cannot even receive a close
frame: its connection is dropped (1006 on its side).
"""

from __future__ import annotations

import logging

from fastapi import WebSocket
from starlette.responses import JSONResponse

from stemflow_shared.auth import bearer_token
from stemflow_shared.problems import problem_response

from .gateway_client import GatewayUnavailable
from .session import Session

log = logging.getLogger(__name__)

SUBPROTOCOL = "stemflow"
BEARER_SUBPROTOCOL = "stemflow.bearer."


async def websocket_route(websocket: WebSocket) -> None:
    offered = offered_subprotocols(websocket.headers.get("sec-websocket-protocol"))
    token = (
        bearer_token(websocket.headers.get("authorization"))
        or subprotocol_token(offered)
        or websocket.query_params.get("token")
    )
    try:
        principal = await websocket.app.state.gateway.principal(token)
    except GatewayUnavailable as exc:
        log.warning("API key not checked: %s", exc)
        await websocket.send_denial_response(_unavailable())
        return
    if principal is None:
        await websocket.send_denial_response(_unauthorized())
        return
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    await Session(websocket, token or "", principal.owner).run()


def offered_subprotocols(header: str | None) -> list[str]:
    """The subprotocols a client offers (`Sec-WebSocket-Protocol`, comma-separated, possibly repeated)."""
    return [name.strip() for name in (header or "").split(",") if name.strip()]


def subprotocol_token(offered: list[str]) -> str | None:
    """The API key a browser sends as the subprotocol `stemflow.bearer.<key>`, if any."""
    for name in offered:
        if name.startswith(BEARER_SUBPROTOCOL) and len(name) > len(BEARER_SUBPROTOCOL):
            return name[len(BEARER_SUBPROTOCOL) :]
    return None


def _unauthorized() -> JSONResponse:
    detail = (
        "a valid API key is required (Authorization: Bearer <key>, the subprotocols "
        "stemflow and stemflow.bearer.<key>, or ?token=<key>)"
    )
    return _problem(401, "Unauthorized", "unauthorized", detail)


def _unavailable() -> JSONResponse:
    return _problem(503, "Service Unavailable", "unavailable", "the API key cannot be checked now; try again")


def _problem(status: int, title: str, code: str, detail: str) -> JSONResponse:
    return problem_response(status, code, title, detail)
