"""The call lifecycle, wired: one AMI client and tracker per Asterisk server, one ledger writer, one credit
guard, one reconciler. The daemon builds it when settings list Asterisk servers ([[asterisk]]).

    AmiClient(server) ──events──▶ CallTracker(server) ──EndedCall──▶ LedgerWriter ──▶ PostgreSQL, Redis
                                        │ answered / ended                                 │ a2b:changed
                                        ▼                                                  ▼
                                   CreditGuard ◀──────────────── every daemon's changes ───┘
                                        └──AMI Hangup──▶ AmiClient(server)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from a2bd.adapters.redis_store import RedisStore
from a2bd.ami.client import AmiClient
from a2bd.ami.protocol import AmiMessage
from a2bd.config import AsteriskServer, Settings
from a2bd.errors import AmiUnavailable
from a2bd.services.charging import LedgerWriter
from a2bd.services.guard import CreditGuard, Cut
from a2bd.services.reconcile import Reconciler
from a2bd.services.tracker import TRACKED_EVENTS, CallTracker, LiveCall, RecentCalls

log = structlog.get_logger("a2bd.lifecycle")


def ami_client(server: AsteriskServer, settings: Settings) -> AmiClient:
    ami = settings.ami
    return AmiClient(
        server.name, server.host, server.port, server.username, server.read_secret(),
        request_timeout_s=ami.request_timeout_s, ping_interval_s=ami.ping_interval_s,
        ping_timeout_s=ami.ping_timeout_s, reconnect_max_s=ami.reconnect_max_s, queue_size=ami.queue_size,
        only_events=TRACKED_EVENTS,
    )


async def list_channels(client: AmiClient) -> list[AmiMessage]:
    """CoreShowChannels: every channel Asterisk has now (raises AmiUnavailable when not connected)."""
    _reply, events = await client.list_action("CoreShowChannels")
    return [e for e in events if e.event == "CoreShowChannel"]


class CallLifecycle:
    def __init__(
        self,
        settings: Settings,
        store: RedisStore,
        pool: asyncpg.Pool,
        *,
        clock: Callable[[], float] = time.time,
        clients: dict[str, AmiClient] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.pool = pool
        self.clock = clock
        billing = settings.billing
        self.recent = RecentCalls()
        self.writer = LedgerWriter(pool, store, batch_lines=billing.ledger_batch_lines,
                                   batch_ms=billing.ledger_batch_ms, clock=clock)
        self.guard = CreditGuard(store, self._hangup, horizon_s=billing.max_call_s, clock=clock,
                                 on_cut=self._on_cut)
        self.clients = clients if clients is not None else {s.name: ami_client(s, settings)
                                                            for s in settings.asterisk}
        self.trackers = {
            name: CallTracker(name, store, self.writer.charge, recent=self.recent, cdr_wait_s=billing.cdr_wait_s,
                              clock=clock, on_answered=self._on_answered, on_ended=self._on_ended,
                              on_reconnected=self._on_reconnected)
            for name in self.clients
        }
        self.writer.on_settled = self._on_settled
        self.reconciler = Reconciler(settings, store, pool, self.writer, list_channels=self._list_channels,
                                     trackers=self.trackers, clock=clock)
        self._tasks: set[asyncio.Task[Any]] = set()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", task=task.get_name(), error=repr(task.exception()))

    async def start(self) -> None:
        """Start writing and guarding, then connect to every Asterisk. A refused AMI login raises (a wrong
        secret is a configuration error); an Asterisk that cannot be reached yet is retried in the background."""
        self.writer.start()
        self.guard.start()
        for name, client in self.clients.items():
            try:
                await client.start(wait=True)
            except AmiUnavailable as exc:
                log.warning("Asterisk not reachable yet; connecting in the background", server=name, error=str(exc))
                await client.start(wait=False)
            self._spawn(self._follow(name, client), f"tracker-{name}")
        self._spawn(self._reconcile_forever(), "reconciler")

    async def close(self) -> None:
        """Stop reading AMI, let the trackers take the events already read (their streams end once the
        queues are empty), close the calls whose end is in hand, then flush the ledger writer."""
        for client in self.clients.values():
            await client.close()
        followers = [t for t in self._tasks if t.get_name().startswith("tracker-")]
        if followers:
            await asyncio.wait(followers, timeout=5.0)
        for tracker in self.trackers.values():
            tracker.flush()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for tracker in self.trackers.values():
            await tracker.close()
        await self.guard.close()
        await self.writer.close()

    async def _follow(self, name: str, client: AmiClient) -> None:
        tracker = self.trackers[name]
        async for item in client.events():
            try:
                tracker.handle(item)
            except Exception:  # one malformed event must not stop the billing of every other call
                log.exception("event could not be handled", server=name)

    async def _reconcile_forever(self) -> None:
        await asyncio.sleep(0)  # let the trackers see their first AmiConnected
        await self.reconciler.run_forever(self.settings.billing.reconcile_interval_s)

    # -- wiring ----------------------------------------------------------------------------------------------

    def _on_answered(self, call: LiveCall) -> None:
        if call.record is not None:
            self.guard.answered(call.call_id.rpartition("/")[0], call.channel, call.record)

    def _on_ended(self, call: LiveCall) -> None:
        # The account the guard watches it under is the record's (the AMI AccountCode should be the same).
        self.guard.ended(call.record.account if call.record is not None else call.account, call.call_id)

    def _on_reconnected(self, server: str) -> None:
        self._spawn(self.reconciler.run_once(), f"reconcile-{server}")

    def _on_cut(self, cut: Cut) -> None:
        server, _, uniqueid = cut.call_id.rpartition("/")
        tracker = self.trackers.get(server)
        if tracker is not None:
            tracker.mark_cut(uniqueid)

    async def _hangup(self, server: str, channel: str) -> bool:
        client = self.clients[server]
        reply = await client.action("Hangup", {"Channel": channel, "Cause": "16"})
        return reply.response == "Success"

    async def _list_channels(self, server: str) -> list[AmiMessage]:
        client = self.clients[server]
        channels = await list_channels(client)
        # Events Asterisk sent before this list are queued ahead of it: let the tracker take them all
        # before comparing, or a call whose Hangup is still in the queue would look lost.
        async with asyncio.timeout(self.settings.ami.request_timeout_s):
            while client.queued():  # noqa: ASYNC110 - the client's queue has no "emptied" event to wait on
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.005)  # the last item taken may not be handled yet
        return channels

    def _on_settled(self, lines: Any) -> None:
        """Lines written (by anyone, e.g. the reconciler from the CDR table): stop following those calls."""
        for line in lines:
            server, _, uniqueid = line.call_id.rpartition("/")
            tracker = self.trackers.get(server)
            if tracker is not None:
                tracker.discard(uniqueid)
