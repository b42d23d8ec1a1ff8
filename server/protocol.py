"""uvicorn's HTTP protocol with a deadline on each request's head, which uvicorn does not set.

uvicorn times out a keep-alive connection only after a response. A connection that opens and sends
nothing, or sends a request line and then a header a minute (slowloris), holds a socket forever;
enough of them use up the process's file descriptors, and no one else can connect. Here the head
of each request (request line and headers) must arrive within ``head_timeout_s`` of its first byte,
or of the connection opening; otherwise the connection is closed, as Apache's ``mod_reqtimeout``
and nginx's ``client_header_timeout`` do. The body has its own deadline, kept while it streams
(:mod:`server.api.bodies`).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeadDeadlineProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` that closes a connection whose request head is not in on time."""

    head_timeout_s: float = 20.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def head_deadline_protocol(head_timeout_s: float) -> type[HeadDeadlineProtocol]:
    """The protocol class for uvicorn's ``http`` option, with this deadline."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"head_timeout_s": head_timeout_s})
