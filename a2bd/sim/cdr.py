"""The simulated Asterisk's cdr_pgsql: every Cdr it posts also lands in a PostgreSQL table.

a2bd reads that table (`[[asterisk]] cdr_table`) to bill calls that ended while it heard nothing over AMI:
the daemon was down, or its AMI connection was cut. The table has cdr_pgsql's columns (asterisk_conf/
cdr_pgsql.conf). Rows are written in batches, one ``COPY`` per loop turn's worth: at a storm's rate
one INSERT per Cdr would cost PostgreSQL more than the daemon's own ledger.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg

from a2bd.sim.ami import CdrRecord

CDR_TABLE = """
CREATE TABLE IF NOT EXISTS cdr (
    accountcode text, src text, dst text, dcontext text, clid text, channel text, dstchannel text,
    lastapp text, lastdata text, start timestamp, answer timestamp, "end" timestamp, duration integer,
    billsec integer, disposition text, amaflags text, userfield text, uniqueid text, linkedid text,
    peeraccount text, sequence integer
)"""

_COLUMNS = ("accountcode", "src", "dst", "channel", "lastapp", "start", "answer", "end", "duration", "billsec",
            "disposition", "uniqueid", "linkedid")


def _timestamp(t: float | None) -> datetime | None:
    """cdr_pgsql writes UTC wall-clock times without a zone."""
    return None if t is None else datetime.fromtimestamp(t, UTC).replace(tzinfo=None)


class CdrTable:
    """A `SimAsterisk(cdr_sink=...)`: `await table(rec)` returns once the row is committed, as cdr_pgsql
    with ``batch = no`` posts each Cdr before the channel is gone."""

    def __init__(self, pool: asyncpg.Pool, table: str = "cdr") -> None:
        self.pool = pool
        self.table = table
        self._rows: list[tuple[object, ...]] = []
        self._done: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, rec: CdrRecord) -> None:
        self._rows.append((rec.accountcode, rec.src, rec.dst, rec.channel, rec.lastapp, _timestamp(rec.start),
                           _timestamp(rec.answer), _timestamp(rec.end), rec.duration, rec.billsec,
                           rec.disposition, rec.uniqueid, rec.linkedid))
        if self._done is None:  # the first Cdr of this turn starts the batch; the others join it
            self._done = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._flush())  # runs after this turn's other Cdrs are appended
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.shield(self._done)

    async def _flush(self) -> None:
        rows, self._rows = self._rows, []
        done, self._done = self._done, None
        assert done is not None
        try:
            await self.pool.copy_records_to_table(self.table, records=rows, columns=_COLUMNS)
        except Exception as exc:  # handed to every Cdr of the batch, as a failed INSERT would be
            done.set_exception(exc)
        else:
            done.set_result(None)


async def create_table(conn: asyncpg.Connection) -> None:
    await conn.execute(CDR_TABLE)
