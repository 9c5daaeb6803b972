"""Recent job events in Redis streams, so that a client can resume with `last_event_id`.

Per owner, one stream of all its jobs' events and one per job, both bounded in
length and expiring after the TTL. An event is appended once across replicas by
a Lua script that also records under the event id where it went: its entry id,
the same in both streams (an owner's ids only grow, and a job's stream is a
subset of its owner's). A resume then reads only what follows that entry, in
order. An owner's keys share a hash tag, so the script also runs on a cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

from .mailbox import Item, Seq

_APPEND = """
local seen = redis.call('GET', KEYS[1])
if seen then return seen end
local fields = {'i', ARGV[1], 'j', ARGV[2], 't', ARGV[3], 'e', ARGV[4]}
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', unpack(fields))
local ok = redis.pcall('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], id, unpack(fields))
if type(ok) == 'table' and ok.err then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', unpack(fields))
end
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('SET', KEYS[1], id, 'EX', ARGV[5])
return id
"""


@dataclass(frozen=True)
class Replay:
    """What a resuming client missed; `resumed` is False when its last event was no longer kept."""

    items: list[Item]
    resumed: bool
    upto: Seq | None


def parse_seq(entry_id: bytes | str) -> Seq:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    millis, _, seq = text.partition("-")
    return int(millis), int(seq or 0)


class EventLog:
    """The resume streams of every owner and job, in one Redis database."""

    def __init__(self, redis: Any, prefix: str, max_len: int, ttl_s: int) -> None:
        self._redis = redis
        self._prefix = prefix
        self._max_len = max_len
        self._ttl = ttl_s
        self._sha: str | None = None

    def _key(self, owner: str, rest: str) -> str:
        return f"{self._prefix}events:{{{owner}}}:{rest}"

    async def append(self, items: Sequence[Item]) -> list[Seq]:
        """Log events in order, each once across replicas, in one round trip; their stream positions."""
        try:
            return await self._append(items)
        except NoScriptError:  # Redis restarted and forgot the script
            self._sha = None
            return await self._append(items)

    async def _append(self, items: Sequence[Item]) -> list[Seq]:
        if self._sha is None:
            self._sha = await self._redis.script_load(_APPEND)
        pipe = self._redis.pipeline(transaction=False)
        for item in items:
            pipe.evalsha(
                self._sha,
                3,
                self._key(item.owner, f"id:{item.id}"),
                self._key(item.owner, "all"),
                self._key(item.owner, f"job:{item.job_id}"),
                item.id,
                item.job_id,
                item.type,
                item.json,
                self._ttl,
                self._max_len * 10,
                self._max_len,
            )
        return [parse_seq(entry_id) for entry_id in await pipe.execute()]

    async def since(self, owner: str, last_event_id: str, job_id: str | None = None) -> Replay:
        """Events of the job (or of all the owner's jobs) after `last_event_id`, oldest first.

        When that event is no longer kept, everything kept is returned.
        """
        stream = self._key(owner, f"job:{job_id}" if job_id else "all")
        position = await self._redis.get(self._key(owner, f"id:{last_event_id}"))
        pipe = self._redis.pipeline(transaction=False)
        pipe.xrange(stream, min=b"(" + position if position else "-", max="+")
        pipe.xrange(stream, min="-", max="+", count=1)
        entries, first = await pipe.execute()
        items = [_item(owner, entry_id, fields) for entry_id, fields in entries]
        if position is None:
            return Replay(items, False, items[-1].seq if items else None)
        mark = parse_seq(position)
        trimmed = bool(first) and parse_seq(first[0][0]) > mark
        return Replay(items, not trimmed, items[-1].seq if items else mark)


def _item(owner: str, entry_id: bytes, fields: dict[bytes, bytes]) -> Item:
    return Item(
        id=fields[b"i"].decode(),
        owner=owner,
        job_id=fields[b"j"].decode(),
        type=fields[b"t"].decode(),
        json=fields[b"e"].decode(),
        seq=parse_seq(entry_id),
    )
