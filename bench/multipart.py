"""Streaming multipart parsers side by side: CPU to take the file out of a 5 MB form, in the chunk sizes a
server hands over, against hashing and writing the same bytes (what every upload costs anyway).

Candidates: the gateway's own path (python-multipart's MultipartParser behind gateway.multipart), and,
when installed, `multipart` (PushMultipartParser) and `streaming-form-data` (Cython). Each must yield
exactly the file's bytes. Best of `--repeat` runs of process CPU time; writes bench/results/multipart.json.

    .venv/bin/python bench/multipart.py [--megabytes 5] [--repeat 7]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This script's folder must not shadow packages on the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
BOUNDARY = b"stemflowbench0123456789abcdef"
CHUNKS_KIB = (16, 64, 256)


def form(payload: bytes) -> bytes:
    head = (
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="stems"\r\n\r\n4\r\n--' + BOUNDARY
        + b'\r\nContent-Disposition: form-data; name="file"; filename="song.wav"\r\nContent-Type: audio/wav\r\n\r\n'
    )  # fmt: skip
    return head + payload + b"\r\n--" + BOUNDARY + b"--\r\n"


def gateway_parser(chunks: list[bytes]) -> int:
    from gateway.multipart import MultipartUpload, stream_file_parts

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    async def parse() -> int:
        size = 0
        content_type = "multipart/form-data; boundary=" + BOUNDARY.decode()
        async for _, piece in stream_file_parts(body(), content_type, MultipartUpload(), max_files=1):
            size += len(piece)
        return size

    return asyncio.run(parse())


def push_parser(chunks: list[bytes]) -> int:
    import multipart

    parser = multipart.PushMultipartParser(BOUNDARY)
    size, in_file = 0, False
    for chunk in [*chunks, b""]:
        for event in parser.parse(chunk):
            if event is None:
                in_file = False
            elif isinstance(event, bytes | bytearray | memoryview):
                size += len(event) if in_file else 0
            else:
                in_file = event.name == "file"
    return size


def streaming_form_data(chunks: list[bytes]) -> int:
    from streaming_form_data import StreamingFormDataParser
    from streaming_form_data.targets import BaseTarget, ValueTarget

    class Counter(BaseTarget):  # type: ignore[misc]
        size = 0

        def on_data_received(self, chunk: bytes) -> None:
            self.size += len(chunk)

    target = Counter()
    parser = StreamingFormDataParser(headers={"Content-Type": "multipart/form-data; boundary=" + BOUNDARY.decode()})
    parser.register("file", target)
    parser.register("stems", ValueTarget())
    for chunk in chunks:
        parser.data_received(chunk)
    return target.size


def hash_and_write(chunks: list[bytes]) -> int:
    """The floor of any upload: sha256 and a write to the page cache of the same bytes."""
    digest = hashlib.sha256()
    with tempfile.TemporaryFile(buffering=0) as fh:
        for chunk in chunks:
            digest.update(chunk)
            fh.write(chunk)
    return -1


CANDIDATES: dict[str, Callable[[list[bytes]], int]] = {
    "gateway (python-multipart)": gateway_parser,
    "multipart (PushMultipartParser)": push_parser,
    "streaming-form-data": streaming_form_data,
    "sha256 + write, for reference": hash_and_write,
}


def best_cpu_ms(parse: Callable[[list[bytes]], int], chunks: list[bytes], expected: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        size = parse(chunks)
        best = min(best, time.process_time() - started)
        if size not in (expected, -1):
            raise AssertionError(f"{parse.__name__} yielded {size} bytes of {expected}")
    return round(best * 1000, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    payload = os.urandom(args.megabytes << 20)
    body = form(payload)
    results: dict[str, dict[str, float | None]] = {}
    for name, parse in CANDIDATES.items():
        results[name] = {}
        for kib in CHUNKS_KIB:
            chunks = [body[i : i + (kib << 10)] for i in range(0, len(body), kib << 10)]
            try:
                results[name][f"{kib} KiB"] = best_cpu_ms(parse, chunks, len(payload), args.repeat)
            except ImportError:
                results[name][f"{kib} KiB"] = None
    print(f"CPU ms to parse a {args.megabytes} MB form (best of {args.repeat}), by chunk size; load {os.getloadavg()}")
    print(f"{'':<34}" + "".join(f"{f'{kib} KiB':>10}" for kib in CHUNKS_KIB))
    for name, row in results.items():
        print(f"{name:<34}" + "".join(f"{v:>10.2f}" if v is not None else f"{'-':>10}" for v in row.values()))
    out = HERE / "results" / "multipart.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"megabytes": args.megabytes, "cpu_ms": results, "load": os.getloadavg()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
