"""The public JSON form of a job (the contract's job document)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

ANALYSIS_SUMMARY = (
    "tempo_bpm",
    "tempo_confidence",
    "key",
    "key_confidence",
    "loudness_lufs",
    "true_peak_dbfs",
    "duration_s",
    "beat_count",
)


def public_job(doc: dict[str, Any], base_url: str, events_url: str) -> dict[str, Any]:
    job_id = doc["_id"]
    self_url = f"{base_url}/v1/jobs/{job_id}"
    stages = doc["stages"]
    result = doc.get("result") or {}
    analysis = result.get("analysis")
    stems = [
        {
            "name": s["name"],
            "format": s["format"],
            "size": s["size"],
            "duration": s["duration_s"],
            "url": f"{self_url}/stems/{quote(s['name'])}",
        }
        for s in result.get("stems") or []
    ]
    input_doc = {k: v for k, v in (doc.get("input") or {}).items() if k not in ("blob_key",)}
    view: dict[str, Any] = {
        "id": job_id,
        "status": doc["status"],
        "progress": {
            "overall": doc["progress"],
            "ingest": stages["ingest"],
            "separation": stages["separation"],
            "analysis": stages["analysis"],
        },
        "options": doc["options"],
        "input": input_doc,
        "result": {
            "stems": stems,
            "analysis": {k: analysis.get(k) for k in ANALYSIS_SUMMARY} if analysis else None,
            "separation": result.get("separation"),
        },
        "error": doc.get("error"),
        "batch_id": doc.get("batch_id"),
        "created_at": _iso(doc["created_at"]),
        "updated_at": _iso(doc["updated_at"]),
        "links": {
            "self": self_url,
            "events": f"{events_url}?job_id={job_id}",
            "stems_zip": f"{self_url}/stems.zip",
            "analysis": f"{self_url}/analysis",
        },
    }
    return view


def etag(doc_id: str, version: int) -> str:
    return f'"{doc_id}-{version}"'


def _iso(value: Any) -> str:
    return value.isoformat().replace("+00:00", "Z") if hasattr(value, "isoformat") else str(value)
