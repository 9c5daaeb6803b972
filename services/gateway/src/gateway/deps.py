"""Typed request dependencies of the routes: settings, the job service, the rate limiter, the caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from stemflow_shared.auth import ApiKeys, Principal

from .jobs import Jobs
from .problems import Problem
from .ratelimit import RateLimiter
from .settings import Settings

bearer = HTTPBearer(auto_error=False, description="An API key from `python -m gateway.admin create-key`")


def jobs_of(request: Request) -> Jobs:
    return request.app.state.jobs


def limiter_of(request: Request) -> RateLimiter:
    return request.app.state.limiter


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


# Coroutines, not plain functions: FastAPI runs a plain dependency in a worker thread, a hop per request.
async def _jobs(request: Request) -> Jobs:
    return jobs_of(request)


async def _limiter(request: Request) -> RateLimiter:
    return limiter_of(request)


async def _settings(request: Request) -> Settings:
    return settings_of(request)


JobsDep = Annotated[Jobs, Depends(_jobs)]
LimiterDep = Annotated[RateLimiter, Depends(_limiter)]
SettingsDep = Annotated[Settings, Depends(_settings)]


async def authenticated(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    """The API key's principal; the caller applies the rate limit (see `Owner`)."""
    keys: ApiKeys = request.app.state.api_keys
    found = await keys.authenticate(credentials.credentials if credentials else None)
    if found is None:
        raise Problem(401, "unauthorized", "a valid API key is required", headers={"WWW-Authenticate": "Bearer"})
    return found


async def rate_limited(request: Request, who: Annotated[Principal, Depends(authenticated)]) -> Principal:
    """Authenticate and count the request against the key's rate limit."""
    await limiter_of(request).check(who)
    return who


Owner = Annotated[Principal, Depends(rate_limited)]
# Only for a route that counts the request itself, in the same Redis call as its cache read.
Caller = Annotated[Principal, Depends(authenticated)]


def not_found(job_id: str) -> Problem:
    return Problem(404, "job_not_found", f"no job {job_id}")
