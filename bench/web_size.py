"""The web page's initial load, gzipped: what a phone downloads before the page can be used.

The initial load is the HTML plus what it references (stylesheet, script); stems and job data come
later, on demand. By default the files on disk are gzipped at level 9, as the gateway's GZipMiddleware
does; with --url the page is fetched from a running gateway and the bytes on the wire are counted.
The budget is 100 KB.

    .venv/bin/python bench/web_size.py [--url http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "services" / "gateway" / "src" / "gateway" / "static"
RESULTS = ROOT / "bench" / "results"
BUDGET_BYTES = 100 * 1024
REFERENCE = re.compile(r"""<(?:link[^>]+href|script[^>]+src)="([^"#:]+)\"""")


def referenced(html: str) -> list[str]:
    """Same-origin files the page loads up front (data: and absolute URLs excluded)."""
    return [name for name in REFERENCE.findall(html) if not name.startswith("//")]


def from_disk() -> dict[str, dict[str, int]]:
    index = (STATIC / "index.html").read_bytes()
    names = ["index.html", *referenced(index.decode())]
    sizes = {}
    for name in names:
        data = (STATIC / name.lstrip("/")).read_bytes()
        sizes[name] = {"raw": len(data), "gzip": len(gzip.compress(data, compresslevel=9, mtime=0))}
    return sizes


def from_server(url: str) -> dict[str, dict[str, int]]:
    import httpx

    sizes = {}
    with httpx.Client(base_url=url.rstrip("/"), headers={"Accept-Encoding": "gzip"}, timeout=30) as client:
        index = client.get("/")
        index.raise_for_status()
        for name in ["/", *(("/" + n.lstrip("/")) for n in referenced(index.text))]:
            with client.stream("GET", name) as response:
                response.raise_for_status()
                wire = b"".join(response.iter_raw())
            gzipped = response.headers.get("content-encoding") == "gzip"
            sizes[name] = {"raw": len(gzip.decompress(wire)) if gzipped else len(wire), "gzip": len(wire)}
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="measure a running gateway instead of the files on disk")
    args = parser.parse_args()
    sizes = from_server(args.url) if args.url else from_disk()
    total_gzip = sum(s["gzip"] for s in sizes.values())
    total_raw = sum(s["raw"] for s in sizes.values())
    for name, size in sizes.items():
        print(f"{name:<12} {size['raw']:>8,} B raw  {size['gzip']:>7,} B gzipped")
    verdict = "within" if total_gzip < BUDGET_BYTES else "OVER"
    print(
        f"{'total':<12} {total_raw:>8,} B raw  {total_gzip:>7,} B gzipped ({total_gzip / 1024:.1f} KB, {verdict} the 100 KB budget)"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": args.url or "files on disk, gzip level 9",
        "files": sizes,
        "total_raw_bytes": total_raw,
        "total_gzip_bytes": total_gzip,
        "budget_bytes": BUDGET_BYTES,
        "within_budget": total_gzip < BUDGET_BYTES,
    }
    (RESULTS / "web_size.json").write_text(json.dumps(result, indent=2) + "\n")
    if total_gzip >= BUDGET_BYTES:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
