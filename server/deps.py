"""Request dependencies: the app's state objects and API-key checks (constant-time compare)."""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from server.errors import ServerError


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def _check(request: Request, expected: SecretStr | None, what: str) -> None:
    if expected is None:
        return
    presented = _presented_key(request)
    if not presented:
        raise ServerError(401, "missing_key", f"this endpoint needs the {what} key (Authorization: Bearer KEY)")
    if not hmac.compare_digest(presented.encode(), expected.get_secret_value().encode()):
        raise ServerError(403, "wrong_key", f"the {what} key is wrong")


def require_admin(request: Request) -> None:
    _check(request, request.app.state.settings.admin_key, "admin")


def require_inference(request: Request) -> None:
    """Inference accepts the inference key, or the admin key."""
    settings = request.app.state.settings
    if settings.inference_key is None:
        return
    presented = _presented_key(request) or ""
    admin = settings.admin_key
    if admin is not None and hmac.compare_digest(presented.encode(), admin.get_secret_value().encode()):
        return
    _check(request, settings.inference_key, "inference")


def ensure_ready(request: Request) -> None:
    if not getattr(request.app.state, "ready", False):
        raise ServerError(503, "not_ready", "the backbone is still loading", headers={"Retry-After": "5"})
