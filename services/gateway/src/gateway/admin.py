"""Administration: `python -m gateway.admin create-key --owner NAME` prints a new API key."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pymongo import AsyncMongoClient

from stemflow_shared.auth import ApiKeys

from .settings import Settings


async def _create_key(owner: str, label: str) -> str:
    settings = Settings()
    client: AsyncMongoClient = AsyncMongoClient(settings.mongodb_url, tz_aware=True)
    try:
        return await ApiKeys(client[settings.mongodb_db]).create(owner, label)
    finally:
        await client.close()


async def _revoke_key(key: str) -> bool:
    settings = Settings()
    client: AsyncMongoClient = AsyncMongoClient(settings.mongodb_url, tz_aware=True)
    try:
        return await ApiKeys(client[settings.mongodb_db]).revoke(key)
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.admin")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create-key", help="create an API key for an owner and print it")
    create.add_argument("--owner", required=True)
    create.add_argument("--label", default="")
    revoke = commands.add_parser("revoke-key", help="revoke an API key")
    revoke.add_argument("key")
    args = parser.parse_args(argv)
    if args.command == "create-key":
        print(asyncio.run(_create_key(args.owner, args.label)))
        return 0
    if not asyncio.run(_revoke_key(args.key)):
        print("no such key", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
