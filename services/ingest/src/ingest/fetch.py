"""Fetching `source_url`: through the shared SSRF guard, with size and time limits."""

from __future__ import annotations

from pathlib import Path

import httpx

from stemflow_shared.netguard import UrlRefused, guarded_request

from .audio import AudioError


class FetchError(AudioError):
    """The URL could not be fetched; codes: url_forbidden, fetch_failed, too_large."""


async def fetch(
    url: str,
    dst: Path,
    *,
    client: httpx.AsyncClient,
    max_bytes: int,
    max_redirects: int,
    allow_private: bool,
) -> int:
    """Stream `url` into `dst` and return the byte count; never more than `max_bytes`."""
    try:
        async with guarded_request(
            client, "GET", url, allow_private=allow_private, max_redirects=max_redirects
        ) as response:
            if response.status_code != 200:
                raise FetchError("fetch_failed", f"the source answered HTTP {response.status_code}")
            if int(response.headers.get("content-length") or 0) > max_bytes:
                raise FetchError("too_large", f"the source is larger than {max_bytes} bytes")
            size = 0
            with open(dst, "wb") as fh:
                async for chunk in response.aiter_bytes(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FetchError("too_large", f"the source is larger than {max_bytes} bytes")
                    fh.write(chunk)
            return size
    except UrlRefused as exc:
        raise FetchError(exc.code, str(exc)) from exc
    except httpx.HTTPError as exc:
        raise FetchError("fetch_failed", f"fetching the source failed: {type(exc).__name__}") from exc
