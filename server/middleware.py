"""ASGI middleware: request IDs, browser-safety headers, and the audit trail of management calls.

- Every response carries ``X-Request-ID``: the client's (when it is a sane token) or a new one. It
  is also in every error body (``server/errors.py`` reads it from the request state).
- The body bytes a request was counted for go back to the process's budget once it is answered
  (``server/api/bodies.py``, ``BodyBudget``).
- Every response carries ``X-Content-Type-Options: nosniff``, and all but the interactive API docs
  a ``Content-Security-Policy`` that allows scripts, styles and connections from this origin only
  (the console page has no inline script or style).
- Each management call (upload, delete, pin, unpin, rollback) is logged as one JSON line on the
  ``sidecar.audit`` logger: time, request id, client address, key id (a short hash, never the
  key), action, task, version, artifact sha256, status and error code.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.bodies import BodyBudget

audit_log = logging.getLogger("sidecar.audit")

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
NO_CSP = ("/docs", "/redoc")  # FastAPI's interactive docs load their own scripts
SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MANAGEMENT = re.compile(r"^/v1/tasks/(?P<task>[^/]+)(?:/(?P<verb>pin|unpin|rollback))?$")
ACTIONS = {("PUT", None): "upload", ("DELETE", None): "delete"}


def management_action(method: str, path: str) -> tuple[str, str] | None:
    """(action, task id) of a management call, or ``None`` for any other request."""
    found = MANAGEMENT.match(path)
    if found is None:
        return None
    verb = found["verb"]
    action = verb if verb and method == "POST" else ACTIONS.get((method, verb))
    return (action, found["task"]) if action else None


class RequestContext:
    """See the module docstring. ``bodies`` (a ``server.api.bodies.BodyBudget``) gets back the body bytes
    a request held once its answer is sent."""

    def __init__(self, app: ASGIApp, bodies: BodyBudget) -> None:
        self.app, self.bodies = app, bodies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if SANE_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        path = scope["path"]
        status = [500]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = list(message.get("headers", []))
                headers += [(b"x-request-id", request_id.encode()), (b"x-content-type-options", b"nosniff")]
                if not path.startswith(NO_CSP):
                    headers.append((b"content-security-policy", CSP.encode()))
                message["headers"] = headers
            await send(message)

        action = management_action(scope["method"], path)
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            self.bodies.give_back(state.pop("body_bytes", 0))
            if action is not None:
                audit(action, scope, state, status[0])


def audit(action: tuple[str, str], scope: Scope, state: dict[str, Any], status: int) -> None:
    client = scope.get("client")
    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "request_id": state.get("request_id"),
        "client": client[0] if client else None,
        "key": state.get("key_id"),
        "action": action[0],
        "task": action[1],
        "version": state.get("audit_version"),
        "sha256": state.get("audit_sha256"),
        "status": status,
        "code": state.get("error_code"),
    }
    audit_log.info(json.dumps(line, sort_keys=True))
