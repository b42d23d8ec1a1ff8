"""Request dependencies: the services as typed ``Annotated`` dependencies, and API-key checks.

Routes never read ``app.state`` themselves: they declare ``EngineDep``, ``TasksDep`` or
``SettingsDep`` and get a typed object. Every dependency is ``async def``: each is a few
attribute reads, and FastAPI would run a plain ``def`` on a worker thread, one thread hop per
dependency per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Path, Request
from pydantic import SecretStr

from server.config import Settings
from server.engine import Engine
from server.exceptions import ManagementDisabled, MissingKey, NotReady, WrongKey
from server.services import Services
from server.store import TASK_ID
from server.tasks import Tasks


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def _services(request: Request) -> Services:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        raise NotReady("the backbone is still loading")
    return services


async def get_engine(request: Request) -> Engine:
    """The Engine service (in Ray mode, a stand-in with the same methods that calls the replicas)."""
    return (await _services(request)).engine


async def get_tasks(request: Request) -> Tasks:
    """The Tasks service (in Ray mode, a stand-in with the same methods that calls the store's writer)."""
    return (await _services(request)).tasks


async def get_upload_turns(request: Request) -> asyncio.Semaphore:
    """Turns for uploads to hold their parts in memory (``upload_concurrency`` of them; set before ready)."""
    return request.app.state.upload_turns


async def get_quarantined(request: Request) -> dict[str, str]:
    """Quarantined task id -> reason; empty while the services are starting."""
    services: Services | None = getattr(request.app.state, "services", None)
    return await services.quarantined() if services is not None else {}


TaskId = Annotated[
    str, Path(pattern=TASK_ID.pattern, max_length=64, description="task id: lowercase letters, digits, - and _")
]
SettingsDep = Annotated[Settings, Depends(get_settings)]
QuarantinedDep = Annotated[dict[str, str], Depends(get_quarantined)]
EngineDep = Annotated[Engine, Depends(get_engine)]
TasksDep = Annotated[Tasks, Depends(get_tasks)]
ServicesDep = Annotated[Services, Depends(_services)]
UploadTurnsDep = Annotated[asyncio.Semaphore, Depends(get_upload_turns)]


def key_id(key: str) -> str:
    """A short, one-way name for a key, for audit lines: never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def _check(request: Request, valid: tuple[SecretStr, ...], what: str) -> None:
    """Accepts any of ``valid`` (constant-time compares, every key tried); records who, by key id."""
    presented = _presented_key(request)
    if not presented:
        raise MissingKey(f"this endpoint needs the {what} key (Authorization: Bearer KEY)")
    matches = [hmac.compare_digest(presented.encode(), k.get_secret_value().encode()) for k in valid]
    if not any(matches):
        raise WrongKey(f"the {what} key is wrong")
    request.state.key_id = key_id(presented)


async def require_admin(request: Request, settings: SettingsDep) -> None:
    """Management: an admin key when one is set; refused off loopback without one (unless opened)."""
    mode = settings.management
    if mode == "disabled":
        raise ManagementDisabled(f"task {settings.management_message}, then send Authorization: Bearer KEY")
    if mode == "key":
        _check(request, settings.admin_keys, "admin")


async def require_inference(request: Request, settings: SettingsDep) -> None:
    """Detect: open unless an inference key is set; then an inference or an admin key."""
    if settings.inference_keys:
        _check(request, settings.inference_keys + settings.admin_keys, "inference")


async def ensure_ready(request: Request) -> None:
    if not getattr(request.app.state, "ready", False):
        raise NotReady("the backbone is still loading")
