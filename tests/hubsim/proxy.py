"""A small HTTP CONNECT proxy on loopback (asyncio, in a background thread).

Interface::

    proxy = ConnectProxy(auth=None | ("user", "password"), answer=None | b"HTTP/1.1 403 ...")
    port = proxy.start()
    proxy.targets     # ["host:port", ...] that clients asked to CONNECT to (and were allowed)
    proxy.stop()

Every target resolves on this machine; a wrong or missing Proxy-Authorization gets
``407 Proxy Authentication Required``; ``answer`` is sent to every request instead (a proxy
that refuses, in its own words).
"""

from __future__ import annotations

import asyncio
import base64
import threading


class ConnectProxy:
    def __init__(self, auth=None, answer: bytes | None = None):
        self.auth, self.answer = auth, answer
        self.targets: list[str] = []
        self.refused = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server = None

    def start(self, port: int = 0) -> int:
        self._thread.start()

        async def serve():
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
            return self._server.sockets[0].getsockname()[1]

        return asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)

    def stop(self) -> None:
        async def close():
            self._server.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, reader, writer):
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            if self.answer is not None:
                writer.write(self.answer)
                await writer.drain()
                return
            method, target = head[0].split(" ")[:2]
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in head[1:] if ":" in line)}
            if self.auth is not None:
                want = "basic " + base64.b64encode(":".join(self.auth).encode()).decode()
                scheme, _, value = headers.get("proxy-authorization", "").partition(" ")
                if f"{scheme.lower()} {value}" != want:  # the scheme is case-insensitive
                    self.refused += 1
                    writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                    await writer.drain()
                    return
            host, _, port = target.rpartition(":")
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                return
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            self.targets.append(target)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
