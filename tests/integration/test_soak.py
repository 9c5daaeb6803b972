"""Soak: mixed requests (uploads, polls, lists, downloads, refused bodies) from clients with different
connection-pool settings and from raw keep-alive sockets, with idle gaps around common pool expiries.
Not one request may be dropped (a connection closed before its answer) and none may be a 5xx.

The gaps matter: a server whose keep-alive time equals a client's pool expiry (uvicorn's and httpx's 5 s)
closes connections just as the client reuses them, and the request on such a connection is lost.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf

from stemflow_dev.client import StemflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# httpx's keepalive_expiry of each pooled client: around its default (5 s), shorter and longer.
POOL_EXPIRIES = (0.5, 4.9, 5.0, 5.1, 30.0)
ROUNDS = 6
RAW_CLIENTS = 2


def wav_bytes(seconds: float = 1.0, sr: int = 22050) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), sr, format="WAV")
    return buffer.getvalue()


@dataclass
class Tally:
    answered: int = 0
    dropped: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)

    def record(self, what: str, status: int) -> None:
        self.answered += 1
        if status >= 500:
            self.server_errors.append(f"{what}: {status}")


def gap(rng: random.Random) -> float:
    """An idle pause that straddles the 5 s keep-alive/pool expiry, or a short one."""
    return rng.choice([rng.uniform(4.8, 5.2), rng.uniform(0.0, 0.3)])


async def pooled_client(
    base_url: str, key: str, expiry: float, done_job: dict[str, Any], audio: bytes, tally: Tally, seed: int
) -> None:
    rng = random.Random(seed)
    limits = httpx.Limits(max_keepalive_connections=4, keepalive_expiry=expiry)
    headers = {"Authorization": f"Bearer {key}"}
    stem_url = done_job["result"]["stems"][0]["url"]
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=60) as http:

        async def call(what: str, method: str, url: str, **kwargs: Any) -> httpx.Response | None:
            try:
                response = await http.request(method, url, **kwargs)
                await response.aread()
            except httpx.TransportError as exc:
                tally.dropped.append(f"expiry {expiry}: {what}: {type(exc).__name__}: {exc}")
                return None
            tally.record(what, response.status_code)
            return response

        for _ in range(ROUNDS):
            files = {"file": ("soak.wav", audio, "audio/wav")}
            created = await call("upload", "POST", "/v1/jobs", files=files, data={"stems": "4"})
            polls = [call("list", "GET", "/v1/jobs?limit=5"), call("download", "GET", stem_url)]
            if created is not None and created.status_code == 202:
                polls.append(call("poll", "GET", f"/v1/jobs/{created.json()['id']}"))
            await asyncio.gather(*polls)
            too_big = json.dumps({"source_url": "https://example.com/x.wav", "pad": "x" * 100_000})
            await call(
                "refused json", "POST", "/v1/jobs", content=too_big, headers={"Content-Type": "application/json"}
            )
            await call("analysis", "GET", f"/v1/jobs/{done_job['id']}/analysis")
            await asyncio.sleep(gap(rng))  # idle, as a real client is between polls


async def raw_client(port: int, key: str, job_id: str, tally: Tally, seed: int) -> None:
    """One keep-alive socket: pipelined polls, and a refused (413) JSON body followed at once by a request."""
    rng = random.Random(seed)
    auth = b"Authorization: Bearer " + key.encode() + b"\r\n"
    poll = b"GET /v1/jobs/" + job_id.encode() + b" HTTP/1.1\r\nHost: gw\r\n" + auth + b"\r\n"
    body = b'{"pad": "' + b"y" * 200_000 + b'"}'
    refused = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: gw\r\n" + auth + b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for round_ in range(ROUNDS):
            batch = [(poll, 200), (poll, 200), (refused, 413), (poll, 200)]
            writer.write(b"".join(request for request, _ in batch))
            for index, (_, expected) in enumerate(batch):
                try:
                    status = await read_answer(reader)
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    tally.dropped.append(f"raw round {round_} request {index}: {type(exc).__name__}")
                    return
                tally.record(f"raw {expected}", status)
                if status != expected:
                    tally.dropped.append(f"raw round {round_} request {index}: {status}, expected {expected}")
            await asyncio.sleep(gap(rng))
    finally:
        writer.close()


async def read_answer(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    if headers.get("transfer-encoding") == "chunked":
        while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) > 0:
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    else:
        await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1])


async def test_mixed_clients_with_different_pools_lose_no_request(system: Any, api_key: str) -> None:
    audio = wav_bytes()
    client = StemflowClient(system.gateway_url, system.events_url, api_key)
    try:
        files = {"file": ("soak.wav", audio, "audio/wav")}
        created = (await client.http.post("/v1/jobs", files=files, data={"stems": "4"})).json()
        await client.follow(created["id"], timeout_s=300)
        done_job = await client.job(created["id"])
    finally:
        await client.aclose()
    assert done_job["status"] == "completed", done_job
    tally = Tally()
    await asyncio.gather(
        *(
            pooled_client(system.gateway_url, api_key, expiry, done_job, audio, tally, seed)
            for seed, expiry in enumerate(POOL_EXPIRIES)
        ),
        *(raw_client(system.ports.gateway, api_key, done_job["id"], tally, 100 + n) for n in range(RAW_CLIENTS)),
    )
    assert tally.dropped == [], tally.dropped
    assert tally.server_errors == [], tally.server_errors
    assert tally.answered >= ROUNDS * (len(POOL_EXPIRIES) * 6 + RAW_CLIENTS * 4)
