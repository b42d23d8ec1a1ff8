"""Request bodies read within their limits, for raw bodies and multipart forms alike.

Every limit holds while the body streams: a declared ``Content-Length`` over the limit is refused
before anything is read, and a chunked body is cut off at the first chunk past it. A body must also
keep pace: every ``timeout_s`` (20 s by default) it must bring ``timeout_s * min_rate`` bytes (10,000
at 500 bytes/s) or the rest of it, so a client that trickles a body (slowloris) is answered 408
instead of holding its connection and buffer forever. The pace is kept over each such window, not
over the whole body as Apache's ``mod_reqtimeout`` (``body=20,MinRate=500``) keeps it: there, a client
that sent 19 MB at once had earned 38,000 s in which to send the last byte, holding 19 MB. Multipart
parts spool to temporary files, which are closed (and so removed) on every path: success, a
limit passed, a malformed body, or a client that disconnects.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from server.config import Settings
from server.exceptions import BodiesOverBudget, InvalidRequest, RequestTimeout, TooLarge, UnsupportedMediaType
from tuners.errors import ArtifactError


@dataclass(frozen=True)
class BodyLimits:
    """How large a body may be, and how fast it must arrive: ``timeout_s * min_rate`` bytes (or the rest)
    in every ``timeout_s``."""

    max_bytes: int
    timeout_s: float
    min_rate: float
    budgeted: bool = True  # counted against the process's BodyBudget (uploads take turns instead)


class BodyBudget:
    """Bytes of request bodies received and not yet answered, all requests of this process together, in
    memory or in a multipart part's spool file.

    The admission queue bounds the work in flight, but a body is read before its request asks for a
    place, so without this bound a few hundred clients each sending a 20 MB body would hold gigabytes
    (120 at once held 1.9 GiB), and multipart bodies as many gigabytes of temporary disk. Each chunk is
    counted as it arrives (a declared length reserves nothing: a client that declares 20 MB and
    trickles holds only what it sent), until its request's answer is sent (``server/middleware.py``
    gives the bytes back). A chunk that would pass the budget is answered 503 (``BodiesOverBudget``),
    and the connection closed with the rest unread. Uploads are not counted: they are an admin's, up to
    512 MiB each, and take turns to be read into memory (:func:`upload_parts`). Used on the event loop only.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    def take(self, request: Request, size: int) -> None:
        """Counts ``size`` more bytes of ``request``'s body.

        Raises:
            BodiesOverBudget: the budget cannot hold them now.
        """
        if self.held + size > self.limit:
            raise BodiesOverBudget(
                f"the server holds {self.held} bytes of request bodies, and this one would pass its budget of "
                f"{self.limit}; send it again shortly"
            )
        self.held += size
        request.state.body_bytes = getattr(request.state, "body_bytes", 0) + size

    def give_back(self, size: int) -> None:
        self.held -= size


def body_limits(settings: Settings, max_bytes: int, budgeted: bool = True) -> BodyLimits:
    return BodyLimits(max_bytes, settings.body_timeout_s, settings.body_min_rate, budgeted)


async def limited_stream(request: Request, limits: BodyLimits) -> AsyncIterator[bytes]:
    """The body's chunks, each counted against the process's :class:`BodyBudget` when ``limits.budgeted``.

    Raises:
        TooLarge: as soon as their total passes ``limits.max_bytes``.
        RequestTimeout: the body falls behind its pace.
        BodiesOverBudget: at a chunk the budget cannot hold.
        UnsupportedMediaType: a compressed body (a ``Content-Encoding`` other than identity: its bytes
            are not what they say, and images compress no further), as RFC 7694 answers it.
    """
    coding = request.headers.get("content-encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {coding!r} is not accepted; send the body uncompressed")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise TooLarge(f"the request declares {declared} bytes; the limit is {limits.max_bytes}")
    loop, chunks, quota = asyncio.get_running_loop(), request.stream(), limits.timeout_s * limits.min_rate
    budget: BodyBudget = request.app.state.body_budget
    size, window, brought = 0, loop.time(), 0  # the current window's start, and the bytes it brought
    while True:
        try:
            async with asyncio.timeout_at(window + limits.timeout_s):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimeout(
                f"the body arrived too slowly: {brought} bytes in the last {limits.timeout_s:g} s ({size} in all); "
                f"send at least {quota:g} bytes every {limits.timeout_s:g} s"
            ) from None
        size, brought = size + len(chunk), brought + len(chunk)
        if brought >= quota:
            window, brought = loop.time(), 0
        if size > limits.max_bytes:
            raise TooLarge(f"the request is over the limit of {limits.max_bytes} bytes")
        if limits.budgeted:
            budget.take(request, len(chunk))
        yield chunk


async def read_body(request: Request, limits: BodyLimits) -> bytes:
    return b"".join([chunk async for chunk in limited_stream(request, limits)])


async def read_form(request: Request, limits: BodyLimits, max_files: int, max_fields: int) -> FormData:
    """A multipart form whose whole body stays within ``limits``; close it with ``await form.close()``.

    Raises:
        UnsupportedMediaType: not multipart. TooLarge: over the limit. RequestTimeout: too slow.
        InvalidRequest: malformed.
    """
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UnsupportedMediaType("send multipart/form-data")
    parser = MultiPartParser(
        request.headers, limited_stream(request, limits), max_files=max_files, max_fields=max_fields
    )
    try:
        return await parser.parse()
    except MultiPartException as e:
        raise InvalidRequest(f"the multipart body is malformed: {e.message}") from e


async def read_files(form: FormData, names: tuple[str, ...]) -> dict[str, bytes | None]:
    """The bytes of each named file part (``None`` when absent or not a file)."""
    found = {name: form.get(name) for name in names}
    return {name: await part.read() if isinstance(part, UploadFile) else None for name, part in found.items()}


@asynccontextmanager
async def upload_parts(
    request: Request, limits: BodyLimits, turns: asyncio.Semaphore
) -> AsyncIterator[tuple[bytes, bytes]]:
    """The ``weights`` and ``config`` files of a multipart upload, within ``limits`` together.

    The body spools to temporary files as it arrives, with no turn needed; the parts are read into
    memory only in one of ``turns``, held until the block ends, so uploads sent at once hold the memory
    of ``upload_concurrency`` of them, not of all.
    """
    form = await read_form(request, limits, max_files=2, max_fields=2)
    async with turns:
        try:
            parts = await read_files(form, ("weights", "config"))
        finally:
            await form.close()
        missing = [name for name, data in parts.items() if data is None]
        if missing:
            raise ArtifactError([f"missing part {n}" for n in missing])
        yield parts["weights"], parts["config"]  # type: ignore[misc]


def multipart_body(required: list[str], properties: dict[str, dict], raw_image: bool = False) -> dict:
    """``openapi_extra`` declaring a required multipart body (and, with ``raw_image``, a raw ``image/*`` one)."""
    content: dict[str, dict] = {
        "multipart/form-data": {"schema": {"type": "object", "required": required, "properties": properties}}
    }
    if raw_image:
        content["image/*"] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


BINARY = {"type": "string", "format": "binary"}
