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
    stems = _stem_views(result.get("stems") or [], self_url, None)
    input_doc = {k: v for k, v in (doc.get("input") or {}).items() if k not in ("blob_key",)}
    view: dict[str, Any] = {
        "id": job_id,
        "status": doc["status"],
        "progress": {
            "overall": doc["progress"],
            "ingest": stages["ingest"],
            "separation": stages["separation"],
            "analysis": stages["analysis"],
            **({"targets": _target_progress(doc)} if doc.get("targets") else {}),
        },
        "options": doc["options"],
        "input": input_doc,
        "result": {
            "stems": stems,
            "analysis": {k: analysis.get(k) for k in ANALYSIS_SUMMARY} if analysis else None,
            "separation": result.get("separation"),
            **({"targets": _target_results(doc, self_url)} if doc.get("targets") else {}),
        },
        "partial": bool(doc.get("partial")),
        "error": doc.get("error"),
        "batch_id": doc.get("batch_id"),
        **({"webhook": doc["webhook"]} if doc.get("webhook") else {}),
        **({"queue": _queue_view(doc["queue"])} if doc.get("queue") else {}),
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


def _stem_views(stems: list[dict[str, Any]], self_url: str, target: str | None) -> list[dict[str, Any]]:
    query = f"?target={quote(target)}" if target else ""
    return [
        {
            "name": s["name"],
            "format": s["format"],
            "size": s["size"],
            "duration": s["duration_s"],
            "url": f"{self_url}/stems/{quote(s['name'])}{query}",
        }
        for s in stems
    ]


def _target_progress(doc: dict[str, Any]) -> dict[str, Any]:
    return {name: {"status": t["status"], "percent": t["percent"]} for name, t in doc["targets"].items()}


def _target_results(doc: dict[str, Any], self_url: str) -> dict[str, Any]:
    """Each target: its status, its stems (with their own URLs), how it was made, or its error."""
    finished = (doc.get("result") or {}).get("targets") or {}
    views = {}
    for name, target in doc["targets"].items():
        done = finished.get(name) or {}
        views[name] = {
            "status": target["status"],
            "stems": _stem_views(done.get("stems") or [], self_url, name),
            "stems_zip": f"{self_url}/stems.zip?target={quote(name)}" if done else None,
            "separation": done.get("separation"),
            "error": target.get("error"),
        }
    return views


def etag(doc_id: str, version: int) -> str:
    return f'"{doc_id}-{version}"'


def _queue_view(queue: dict[str, Any]) -> dict[str, Any]:
    """Jobs ahead of this one's separation and, when the pool's pace is known, when it should start."""
    start = queue.get("estimated_start_at")
    return {"ahead": queue.get("ahead", 0), **({"estimated_start_at": _iso(start)} if start else {})}


def _iso(value: Any) -> str:
    return value.isoformat().replace("+00:00", "Z") if hasattr(value, "isoformat") else str(value)
