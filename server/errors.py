"""Domain errors -> HTTP, in one place. Every error body is ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import exceptions as ex
from tuners.errors import ArtifactError, IncompatibleBackboneError

log = logging.getLogger(__name__)

STATUS: dict[type[ex.SidecarError], int] = {
    ex.InvalidRequest: 422,
    ex.UnsupportedMediaType: 415,
    ex.InvalidTaskId: 422,
    ex.UnknownTask: 404,
    ex.UnknownVersion: 404,
    ex.TaskQuarantined: 409,
    ex.TaskFailed: 500,
    ex.InsufficientStorage: 507,
    ex.TooManyTasks: 413,
    ex.TooLarge: 413,
    ex.RequestTimeout: 408,
    ex.NotAnImage: 415,
    ex.UnreadableImage: 422,
    ex.Overloaded: 503,
    ex.CacheBudget: 507,
    ex.NotReady: 503,
    ex.MissingKey: 401,
    ex.WrongKey: 403,
    ex.ManagementDisabled: 403,
}

# Errors that can leave part of the body unread: the connection is closed after the answer.
UNREAD_BODY = (ex.RequestTimeout, ex.TooLarge, ex.BodiesOverBudget)


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods some route of ``app`` answers at ``path``."""
    found = {m for r in app.routes if isinstance(r, APIRoute) and r.path_regex.match(path) for m in r.methods}
    return sorted(found)


def http_status(error: ex.SidecarError) -> int:
    """The status of a domain error: its own class's, else its nearest mapped base class's."""
    return next((STATUS[c] for c in type(error).__mro__ if c in STATUS), 500)


def _response(
    request: Request,
    status: int,
    code: str,
    message: str,
    details: list | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(code=code).inc()
    request.state.error_code = code  # for the audit line (server/middleware.py)
    request_id = getattr(request.state, "request_id", None)
    body = {"error": {"code": code, "message": message, "details": details or [], "request_id": request_id}}
    return JSONResponse(body, status, headers=headers)


def install_handlers(app: FastAPI) -> None:
    """JSON errors for every path, including validation errors and unexpected exceptions."""

    @app.exception_handler(ex.SidecarError)
    async def _domain(request: Request, exc: ex.SidecarError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
        if isinstance(exc, UNREAD_BODY):
            headers["Connection"] = "close"  # the rest of the body would be read as the next request
        return _response(request, http_status(exc), exc.code, exc.message, exc.details, headers)

    @app.exception_handler(ArtifactError)
    async def _artifact(request: Request, exc: ArtifactError) -> JSONResponse:
        return _response(request, 422, "invalid_artifact", str(exc), list(exc.problems))

    @app.exception_handler(IncompatibleBackboneError)
    async def _backbone(request: Request, exc: IncompatibleBackboneError) -> JSONResponse:
        return _response(request, 409, "incompatible_backbone", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return _response(request, 422, "invalid_request", "the request is malformed", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method of the path, not just those of the first route that matched
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.url.path))
        return _response(request, exc.status_code, code, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _response(request, 500, "internal", f"internal error: {type(exc).__name__}")
