"""Request bodies read within their limits, for raw bodies and multipart forms alike.

Every limit holds while the body streams: a declared ``Content-Length`` over the limit is refused
before anything is read, and a chunked body is cut off at the first chunk past it. Multipart
parts spool to temporary files, which are closed (and so removed) on every path: success, a
limit passed, a malformed body, or a client that disconnects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from server.exceptions import InvalidRequest, TooLarge, UnsupportedMediaType


async def limited_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks; raises :class:`TooLarge` as soon as their total passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the request declares {declared} bytes; the limit is {limit}")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the request is over the limit of {limit} bytes")
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in limited_stream(request, limit)])


async def read_form(request: Request, limit: int, max_files: int, max_fields: int) -> FormData:
    """A multipart form whose whole body stays within ``limit``; close it with ``await form.close()``.

    Raises:
        UnsupportedMediaType: not multipart. TooLarge: over the limit. InvalidRequest: malformed.
    """
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UnsupportedMediaType("send multipart/form-data")
    parser = MultiPartParser(
        request.headers, limited_stream(request, limit), max_files=max_files, max_fields=max_fields
    )
    try:
        return await parser.parse()
    except MultiPartException as e:
        raise InvalidRequest(f"the multipart body is malformed: {e.message}") from e


async def read_files(form: FormData, names: tuple[str, ...]) -> dict[str, bytes | None]:
    """The bytes of each named file part (``None`` when absent or not a file)."""
    found = {name: form.get(name) for name in names}
    return {name: await part.read() if isinstance(part, UploadFile) else None for name, part in found.items()}


def multipart_body(required: list[str], properties: dict[str, dict], raw_image: bool = False) -> dict:
    """``openapi_extra`` declaring a required multipart body (and, with ``raw_image``, a raw ``image/*`` one)."""
    content: dict[str, dict] = {
        "multipart/form-data": {"schema": {"type": "object", "required": required, "properties": properties}}
    }
    if raw_image:
        content["image/*"] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


BINARY = {"type": "string", "format": "binary"}
