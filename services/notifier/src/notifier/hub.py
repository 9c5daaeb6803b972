"""Who is subscribed to what: connections indexed by owner and job, and the dispatch of events to them."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from stemflow_shared import metrics

from .mailbox import Item, Mailbox, Seq


class Client:
    """One connection's owner, subscriptions and mailbox.

    While a subscription is being set up (and its replay sent), live events are
    held back, then queued unless the replay had them. `marks` remember, per resumed job
    (None: all jobs), the stream position the replay reached, so that a live event
    at or before it (a replica whose queue lags behind) is not delivered twice.
    """

    __slots__ = ("_held", "all_jobs", "jobs", "mailbox", "marks", "owner")

    def __init__(self, owner: str, mailbox: Mailbox) -> None:
        self.owner = owner
        self.mailbox = mailbox
        self.jobs: set[str] = set()
        self.all_jobs = False
        self.marks: dict[str | None, Seq] | None = None
        self._held: list[Item] | None = None

    def deliver(self, item: Item) -> None:
        if self.marks and self._replayed(item):
            return
        if self._held is None:
            self.mailbox.push(item)
            return
        self._held.append(item)
        if len(self._held) > self.mailbox.max_pending:
            self.mailbox.overflow()

    def _replayed(self, item: Item) -> bool:
        assert self.marks is not None
        if item.seq is None:
            return False
        for scope in (item.job_id, None):
            mark = self.marks.get(scope)
            if mark is not None:
                if item.seq <= mark:
                    return True
                del self.marks[scope]
        return False

    def hold(self) -> None:
        self._held = []

    def release(self, replayed: Collection[str] = (), scope: str | None = None, upto: Seq | None = None) -> None:
        """Queue the live events held meanwhile, except those the replay (`replayed`: their ids) has sent."""
        held, self._held = self._held or [], None
        for item in held:
            if item.id not in replayed:
                self.mailbox.push(item)
        if upto is not None:
            self.marks = {**(self.marks or {}), scope: upto}


class Hub:
    """The clients of this replica, indexed by owner and job; every event is dispatched once."""

    def __init__(self, remember: int = 50_000) -> None:
        self._clients: set[Client] = set()
        self._by_job: dict[tuple[str, str], set[Client]] = {}
        self._by_owner: dict[str, set[Client]] = {}
        self._recent: dict[str, None] = {}
        self._remember = remember

    def add(self, client: Client) -> None:
        self._clients.add(client)
        metrics.WS_CONNECTIONS.set(len(self._clients))

    def remove(self, client: Client) -> None:
        for job_id in list(client.jobs):
            self.unsubscribe(client, job_id)
        self.unsubscribe(client, None)
        self._clients.discard(client)
        client.mailbox.close()
        metrics.WS_CONNECTIONS.set(len(self._clients))

    def subscribe(self, client: Client, job_id: str | None) -> bool:
        """Subscribe to one job of the client's owner (None: all of them); False if it already was."""
        if job_id is None:
            if client.all_jobs:
                return False
            client.all_jobs = True
            self._by_owner.setdefault(client.owner, set()).add(client)
        else:
            if job_id in client.jobs:
                return False
            client.jobs.add(job_id)
            self._by_job.setdefault((client.owner, job_id), set()).add(client)
        metrics.WS_SUBSCRIPTIONS.inc()
        return True

    def unsubscribe(self, client: Client, job_id: str | None) -> bool:
        if job_id is None:
            if not client.all_jobs:
                return False
            client.all_jobs = False
            _discard(self._by_owner, client.owner, client)
        else:
            if job_id not in client.jobs:
                return False
            client.jobs.discard(job_id)
            _discard(self._by_job, (client.owner, job_id), client)
        metrics.WS_SUBSCRIPTIONS.dec()
        return True

    def dispatch(self, item: Item) -> int:
        """Queue the event for every client that wants it; a redelivered event is dropped."""
        if item.id in self._recent:
            return 0
        self._recent[item.id] = None
        if len(self._recent) > self._remember:
            del self._recent[next(iter(self._recent))]
        per_job = self._by_job.get((item.owner, item.job_id))
        per_owner = self._by_owner.get(item.owner)
        targets = (per_job | per_owner) if per_job and per_owner else (per_job or per_owner or ())
        for client in targets:
            client.deliver(item)
        return len(targets)

    def __len__(self) -> int:
        return len(self._clients)


def _discard(index: dict[Any, set[Client]], key: Any, client: Client) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(client)
        if not members:
            del index[key]
