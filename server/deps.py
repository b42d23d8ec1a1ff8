"""Request dependencies: the services as typed ``Annotated`` dependencies, and API-key checks.

Routes never read ``app.state`` themselves: they declare ``EngineDep``, ``TasksDep`` or
``SettingsDep`` and get a typed object.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr

from server.config import Settings
from server.engine import Engine
from server.exceptions import MissingKey, NotReady, WrongKey
from server.metrics import Metrics
from server.services import Services
from server.tasks import Tasks


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def _services(request: Request) -> Services:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        raise NotReady("the backbone is still loading")
    return services


def get_engine(request: Request) -> Engine:
    return _services(request).engine


def get_tasks(request: Request) -> Tasks:
    return _services(request).tasks


def get_metrics(request: Request) -> Metrics:
    return _services(request).metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
TasksDep = Annotated[Tasks, Depends(get_tasks)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def _matches(presented: str, expected: SecretStr | None) -> bool:
    return expected is not None and hmac.compare_digest(presented.encode(), expected.get_secret_value().encode())


def _check(request: Request, expected: SecretStr | None, what: str) -> None:
    if expected is None:
        return
    presented = _presented_key(request)
    if not presented:
        raise MissingKey(f"this endpoint needs the {what} key (Authorization: Bearer KEY)")
    if not _matches(presented, expected):
        raise WrongKey(f"the {what} key is wrong")


def require_admin(request: Request, settings: SettingsDep) -> None:
    _check(request, settings.admin_key, "admin")


def require_inference(request: Request, settings: SettingsDep) -> None:
    """Inference accepts the inference key, or the admin key."""
    if settings.inference_key is None or _matches(_presented_key(request) or "", settings.admin_key):
        return
    _check(request, settings.inference_key, "inference")


def ensure_ready(request: Request) -> None:
    if not getattr(request.app.state, "ready", False):
        raise NotReady("the backbone is still loading")
