"""The gateway's internal API: what other Stemflow services may ask the owner of job state, and its answers.

The gateway alone keeps jobs, batches and API keys (MongoDB). Services that need them (the notifier:
who a WebSocket's key belongs to, a job's state for a new subscription, a job's callback URL) ask the
gateway on its internal listener (`INTERNAL_PORT`, never the public API's port) with the shared service
token (`Authorization: Bearer <INTERNAL_TOKEN>`). Jobs cross the boundary in their public form, as
`GET /v1/jobs/{id}` renders them; only what the public form leaves out (the owner, the callback URL) is
added beside it.

    POST /internal/v1/principals                      {"api_key"} -> Principal; 404 unknown or revoked
    GET  /internal/v1/jobs/{job_id}?owner=O           -> JobRecord; 404 no such job of that owner
    GET  /internal/v1/jobs?owner=O&unfinished=true&limit=N   -> JobList, newest first
    GET  /internal/v1/batches/{batch_id}?owner=O      -> BatchRecord, jobs in submission order; 404 likewise
    GET  /internal/v1/ping                            -> 204: the token is right and the API is up

Every query names the owner, so the gateway decides tenancy (another owner's job is 404, as on the public
API). A request without the right token is refused with 401, whatever the path.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

from .events import JobStatus

PREFIX = "/internal/v1"
PRINCIPALS_PATH = f"{PREFIX}/principals"
JOBS_PATH = f"{PREFIX}/jobs"
PING_PATH = f"{PREFIX}/ping"
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_API_KEY_CHARS = 200
MAX_JOBS = 1000


class PrincipalQuery(BaseModel):
    api_key: str = Field(min_length=1, max_length=MAX_API_KEY_CHARS)


class Principal(BaseModel):
    """Whose an API key is."""

    owner: str
    key_id: str


class JobState(BaseModel):
    """A job's public document (docs/api.md); the fields named here are the ones other services rely on,
    the rest of the document is kept as it is."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: JobStatus
    progress: dict[str, Any]
    error: dict[str, Any] | None = None
    updated_at: str | None = None


class JobRecord(BaseModel):
    """One job: its public document, and what the public document leaves out."""

    job: JobState
    owner: str
    callback_url: str | None = None


class JobList(BaseModel):
    jobs: list[JobState]


class BatchRecord(BaseModel):
    """A batch's jobs, in submission order."""

    batch_id: str
    jobs: list[JobState]


def job_path(job_id: str) -> str:
    return f"{PREFIX}/jobs/{quote(job_id, safe='')}"


def batch_path(batch_id: str) -> str:
    return f"{PREFIX}/batches/{quote(batch_id, safe='')}"
