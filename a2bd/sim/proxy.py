"""A TCP proxy on loopback that a test or a fault storm can cut, as asyncpg's test_adversity does to a real server.

`refuse()` drops every connection and closes the listening port (connection refused); `blackhole()`
keeps accepting but forwards nothing (the peer stalls until its timeout); `stall()` keeps the open
connections but holds every byte (a server that stops answering mid-conversation); `restore()` forwards
again, delivering what was held.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.accepted = 0  # connections accepted so far, whatever the mode
        self._server: asyncio.Server | None = None
        self._mode = "forward"
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        if self._mode == "blackhole":
            with contextlib.suppress(ConnectionError):
                await reader.read()  # swallow until the client gives up
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()  # held while stalled
                if self._mode != "forward":
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)

    def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def refuse(self) -> None:
        self._mode = "refuse"
        self._drop_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def blackhole(self) -> None:
        self._mode = "blackhole"
        self._drop_all()
        if self._server is None:
            await self.start()

    def stall(self) -> None:
        self._flowing.clear()

    async def restore(self) -> None:
        self._mode = "forward"
        self._flowing.set()
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        await self.refuse()


@contextlib.asynccontextmanager
async def proxied(url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A proxy in front of the server that `url` names (redis://, postgresql://), and `url` through it."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, f"{url} names no host and port"
    proxy = TcpProxy(parts.hostname, parts.port)
    await proxy.start()
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{proxy.port}" if userinfo else f"127.0.0.1:{proxy.port}"
    try:
        yield proxy, urlunsplit(parts._replace(netloc=netloc))
    finally:
        await proxy.close()
