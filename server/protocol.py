"""uvicorn's HTTP protocol with a deadline and a size limit on each request's head; uvicorn sets neither.

uvicorn times out a keep-alive connection only after a response. A connection that opens and sends
nothing, or sends a request line and then a header a minute (slowloris), holds a socket forever;
enough of them use up the process's file descriptors, and no one else can connect. Here the head
of each request (request line and headers) must arrive within ``head_timeout_s`` of its first byte,
or of the connection opening; otherwise the connection is closed, as Apache's ``mod_reqtimeout``
and nginx's ``client_header_timeout`` do. The body has its own deadline, kept while it streams
(:mod:`server.api.bodies`).

uvicorn also reads a head of any size: 100 MB of small headers, sent in 2 s, left the server 1 GiB
larger for good, and a 200 MB request target held a core and the event loop for 20 s (its parts are
joined one by one).
Here, as Apache's ``LimitRequestLine`` and ``LimitRequestFields`` and nginx's
``large_client_header_buffers`` do, a target over ``MAX_TARGET_BYTES`` is answered 414, and a head
over ``MAX_HEAD_BYTES`` or ``MAX_FIELDS`` header fields 431; then the connection is closed. The head's
bytes are counted as they arrive, and no more than fit are parsed, so the limit holds to within one read.

uvicorn also queues pipelined requests without a bound: 300,000 ``GET``s sent on one connection in
4 s, before reading any answer, left the server 680 MiB larger (``bench.hostile``). Here a connection with
``MAX_PIPELINED`` requests waiting parses no more: those are answered, then it closes, and the client
sends the rest again, as HTTP/1.1 asks of a client whose connection closes under its pipeline.

Every close the server makes after an answer lingers, as Apache's and nginx's do: the answer is sent,
the server half-closes, and what the client still sends is read and dropped until it closes its side,
sends nothing for ``LINGER_S``, or ``LINGER_MAX_S`` pass. A socket closed with a body still arriving
resets: a client still sending a body refused partway (413, 503 over the body budget) got ECONNRESET
before it read the answer, and some systems drop an answer not yet read when the reset comes.

An answer to a request with ``Expect: 100-continue`` that starts before the body was asked for closes
the connection (:class:`_ClosesIfBodyNotAsked`).

A request that asks to switch protocols (``Connection: Upgrade`` with ``Upgrade: h2c``, as ``curl
--http2`` and Java's ``HttpClient`` send on ``http://``, or ``websocket``) is served as HTTP/1.1, as
RFC 9110 (section 7.8) lets a server do: the app has no other protocol. llhttp stops at the head of
such a request and uvicorn then loses its body and what follows it on the connection (``curl --http2``
posting a photo got 415 "the image is empty"), so the ``Upgrade`` field of each head is renamed
``Ignored`` before it is parsed (:func:`ignore_upgrade`).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
import weakref
from http import HTTPStatus

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

MAX_TARGET_BYTES = 8 * 1024
"""Longest request target (path and query): Apache's and nginx's 8 KiB."""
MAX_HEAD_BYTES = 64 * 1024
"""Longest request head, request line and header fields together."""
MAX_FIELDS = 100
"""Most header fields in one request: Apache's ``LimitRequestFields``."""
MAX_PIPELINED = 100
"""Most requests queued on one connection behind the one being answered (HTTP/1.1 pipelining)."""
LINGER_S = 2.0
"""A lingering close ends once the client has sent nothing for this long (nginx's ``lingering_timeout``)."""
LINGER_MAX_S = 30.0
"""... and at the latest this long after it began (nginx's ``lingering_time``)."""


UPGRADE_FIELD = re.compile(rb"\nupgrade:", re.IGNORECASE)
IGNORED_FIELD = b"\nIgnored:"  # as long as the name it replaces: the head's size is unchanged


def ignore_upgrade(data: bytes) -> bytes:
    """``data``, which starts in a request head, with the head's ``Upgrade`` fields renamed ``Ignored``;
    the bytes after the head's end (a body, or the next request) are left as they are. A field name
    split across two reads, or in a head pipelined behind a body in the same read, is missed, and
    that request's upgrade is left to uvicorn."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    if not UPGRADE_FIELD.search(head):
        return data
    return UPGRADE_FIELD.sub(IGNORED_FIELD, head) + (b"" if end < 0 else data[end:])


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a head that was answered and closed."""


class _LingeringClose:
    """The transport as a request's cycle sees it: the cycle closes the connection after an answer
    with ``Connection: close`` (or one it could not finish), and that close lingers. It holds its
    protocol weakly: the protocol holds the cycle, and a reference cycle would keep both, and the
    body bytes the cycle holds, until a full collection."""

    def __init__(self, protocol: HeadDeadlineProtocol) -> None:
        self._protocol = weakref.ref(protocol)
        self._transport = protocol.transport

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)

    def close(self) -> None:
        protocol = self._protocol()
        if protocol is None:
            self._transport.close()
        else:
            protocol._linger()


class _ClosesIfBodyNotAsked:
    """A request cycle's ``send`` when the client sent ``Expect: 100-continue``: an answer that starts
    before the body was asked for (a 401 or a 415 decided from the head) closes the connection, as
    Go's ``net/http`` does. Kept open, the client may send the body or not, and the connection's state
    is unknown: a client that reused it without sending the body had its next request read as this
    one's body, and waited for an answer that never came (RFC 9110, section 10.1.1)."""

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = weakref.ref(cycle)  # the cycle holds this; a strong reference would make a cycle

    async def __call__(self, message: ASGISendEvent) -> None:
        cycle = self._cycle()
        if cycle is None:
            return
        if message["type"] == "http.response.start" and cycle.waiting_for_100_continue and cycle.more_body:
            cycle.keep_alive = False
        await RequestResponseCycle.send(cycle, message)


class HeadDeadlineProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` that closes a connection whose request head is not in on time, answers
    a head that is too large, bounds a pipeline, lingers when it closes, and ignores upgrades (see the
    module's docstring)."""

    head_timeout_s: float = 20.0
    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0  # bytes of the head in progress so far (less the read it began in, after a first request)
    _heads = 0  # heads completed on this connection
    _refused = False  # no more requests are parsed on this connection
    _lingering = False
    _in_body = False  # between a request's head and its end: reads are body bytes
    _linger_timer: asyncio.TimerHandle | None = None
    _linger_deadline = 0.0
    _last_read = 0.0

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._last_read = self.loop.time()
            return
        if not self._in_body:
            data = ignore_upgrade(data)
        room = MAX_HEAD_BYTES - self._head_bytes
        if self._head_timer is None or len(data) <= room:  # no head in progress, or all of it fits
            self._head_bytes += len(data) if self._head_timer is not None else 0
            super().data_received(data)
            return
        heads = self._heads
        super().data_received(data[:room])  # the head must end in here
        if self._refused or self.transport.is_closing():
            return
        if self._heads == heads:
            self._refuse(431, "headers_too_large", f"the request head is over {MAX_HEAD_BYTES} bytes")
            return
        super().data_received(data[room:])

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > MAX_TARGET_BYTES:
            self._refuse(414, "uri_too_long", f"the request target is over {MAX_TARGET_BYTES} bytes")
            raise _Refused
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= MAX_FIELDS:
            self._refuse(431, "headers_too_large", f"the request has over {MAX_FIELDS} header fields")
            raise _Refused
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        """Malformed HTTP: uvicorn's plain-text 400 and abrupt close become the API's error body and a
        lingering close."""
        if not self._refused:  # else the parser stopped at a _Refused, and the head is answered
            self._refuse(400, "malformed_http", f"the request is not valid HTTP/1.1: {msg}")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answers ``status`` with the API's error body, then closes the connection, lingering."""
        self._refused = True
        self._disarm()
        request_id = uuid.uuid4().hex
        error = {"code": code, "message": message, "details": [], "request_id": request_id}
        body = json.dumps({"error": error}).encode()
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nx-request-id: {request_id}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self._linger()

    def _linger(self) -> None:
        """A lingering close (see the module's docstring): half-closes, then drops the client's reads
        until it closes, or is quiet for ``LINGER_S``, or ``LINGER_MAX_S`` pass."""
        if self._lingering or self.transport.is_closing():
            return
        self._refused = self._lingering = True
        self._disarm()
        self.pipeline.clear()  # requests queued behind the answer are not answered: the client sends them again
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()  # paused under a large body: read on, to drop it
        now = self.loop.time()
        self._last_read, self._linger_deadline = now, now + LINGER_MAX_S
        self._linger_timer = self.loop.call_later(LINGER_S, self._linger_check)

    def _linger_check(self) -> None:
        self._linger_timer = None  # a fired handle keeps its callback, and with it this protocol
        now = self.loop.time()
        if now >= self._linger_deadline or now - self._last_read >= LINGER_S:
            self.transport.close()
            return
        wake = min(self._last_read + LINGER_S, self._linger_deadline)
        self._linger_timer = self.loop.call_later(wake - now, self._linger_check)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._head_bytes, self._heads = 0, self._heads + 1
        if len(self.pipeline) >= MAX_PIPELINED:  # answer those queued, then close: the client resends the rest
            self._refused = True
            raise _Refused
        super().on_headers_complete()
        self._in_body = True
        if self.cycle is not None:
            self.cycle.transport = _LingeringClose(self)  # type: ignore[assignment]
            if self.cycle.waiting_for_100_continue:
                self.cycle.send = _ClosesIfBodyNotAsked(self.cycle)  # type: ignore[method-assign]

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._lingering:  # the answer closed the connection
            self.server_state.total_requests += 1
            return
        last = not self.pipeline
        super().on_response_complete()
        if self._refused and last:
            self._linger()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
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
