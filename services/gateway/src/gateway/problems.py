"""RFC 9457 problem details with a stable machine `code`, for every error the gateway returns."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pymongo.errors import AutoReconnect, ConnectionFailure, ServerSelectionTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from stemflow_shared import problems as shared_problems

log = logging.getLogger(__name__)

MEDIA_TYPE = shared_problems.MEDIA_TYPE

_STATUS_CODES = {
    400: ("bad_request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    406: ("not_acceptable", "Not acceptable"),
    409: ("conflict", "Conflict"),
    411: ("length_required", "Length required"),
    413: ("payload_too_large", "Payload too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
    416: ("range_not_satisfiable", "Range not satisfiable"),
    422: ("validation_failed", "Validation failed"),
    429: ("rate_limited", "Too many requests"),
    500: ("internal_error", "Internal server error"),
    503: ("unavailable", "Service unavailable"),
}


class Problem(Exception):
    """An error answer: HTTP status, stable code, human title and detail, extra members."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str = "",
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.title = title or _STATUS_CODES.get(status, ("", "Error"))[1]
        self.detail = detail
        self.headers = headers
        self.extra = extra


def problem_response(problem: Problem, instance: str | None = None) -> JSONResponse:
    members = {"instance": instance} if instance else {}
    return shared_problems.problem_response(
        problem.status,
        problem.code,
        problem.title,
        problem.detail,
        headers=problem.headers,
        **members,
        **problem.extra,
    )


def install(app: FastAPI) -> None:
    """Make every error of the app, including the framework's own, a problem+json answer."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code, title = _STATUS_CODES.get(exc.status_code, ("http_error", "Error"))
        detail = exc.detail if isinstance(exc.detail, str) else title
        return problem_response(
            Problem(exc.status_code, code, detail, title=title, headers=getattr(exc, "headers", None)),
            request.url.path,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "field": ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "path", "header")),
                "message": err["msg"],
            }
            for err in exc.errors()
        ]
        fields = ", ".join(e["field"] or "body" for e in errors)
        return problem_response(
            Problem(422, "validation_failed", f"invalid: {fields}", errors=errors), request.url.path
        )

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # Nobody reads this answer; it exists so that the request is counted as the client's (499), not a 500.
        log.info("client left during %s %s", request.method, request.url.path)
        return problem_response(
            Problem(499, "client_closed_request", "the client closed the connection", title="Client closed request"),
            request.url.path,
        )

    @app.exception_handler(ServerSelectionTimeoutError)
    @app.exception_handler(ConnectionFailure)
    @app.exception_handler(AutoReconnect)
    async def _database_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return problem_response(
            Problem(
                503,
                "database_unavailable",
                "the job database is unreachable; retry shortly",
                headers={"Retry-After": "5"},
            ),
            request.url.path,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(Problem(500, "internal_error", "an unexpected error occurred"), request.url.path)
