"""A TCP proxy on 127.0.0.1 that can take a real service "down" and bring it back (fault injection).

Between real clients and a real server (SeaweedFS, mosquitto): while down, the listening port
refuses connections and every open connection is cut, exactly as when the server's host is gone;
back up, it forwards again on the same port. It runs its own event loop in a thread, so a test
can use it around child processes and its own event loop alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType
from typing import Self

from unitedllm.devservices import free_port

__all__ = ["FaultyProxy"]


class FaultyProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port`` until told to go :meth:`down`."""

    def __init__(self, target_host: str, target_port: int, *, port: int | None = None):
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faulty-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> Self:
        self._thread.start()
        self.up()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(Exception):
            self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)  # type: ignore[arg-type]

    def up(self) -> None:
        """Accept and forward connections (again) on the same port."""
        self._call(self._up())

    def down(self) -> None:
        """Refuse new connections and cut every open one."""
        self._call(self._down())

    async def _up(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def _down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._open |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._open -= {writer, up_writer}
