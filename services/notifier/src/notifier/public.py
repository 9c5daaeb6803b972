"""Job events as clients see them (WebSocket and webhooks): the CloudEvent without what is internal.

The gateway's events carry the job's owner (for routing here) and each stem's blob key (where the
workers stored it). Neither is the client's business: the owner is dropped, and each stem's blob key is
replaced by the stem's path on the public API, which is what a client downloads it from. Everything else
of the CloudEvent (id, source, type, time, subject, the rest of the data) is kept as it is.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from stemflow_shared.events import CloudEvent

INTERNAL_FIELDS = ("owner",)


def public_envelope(envelope: CloudEvent) -> CloudEvent:
    """A copy of a job event's envelope that a client may see."""
    data = {key: value for key, value in envelope.data.items() if key not in INTERNAL_FIELDS}
    stems = data.get("stems")
    if isinstance(stems, list):
        data["stems"] = [_public_stem(stem, data.get("job_id")) for stem in stems]
    return envelope.model_copy(update={"data": data})


def public_json(envelope: CloudEvent) -> bytes:
    return public_envelope(envelope).to_json()


def _public_stem(stem: Any, job_id: Any) -> Any:
    if not isinstance(stem, dict):
        return stem
    public = {key: value for key, value in stem.items() if key != "blob_key"}
    if isinstance(job_id, str) and isinstance(stem.get("name"), str):
        public["path"] = f"/v1/jobs/{quote(job_id, safe='')}/stems/{quote(stem['name'], safe='')}"
    return public
