"""Domain errors -> HTTP, in one place. Every error body is ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuners.errors import ArtifactError, IncompatibleBackboneError

log = logging.getLogger(__name__)


class ServerError(Exception):
    """An error with a stable ``code`` and an HTTP ``status``."""

    def __init__(
        self, status: int, code: str, message: str, details: list | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details, self.headers = details or [], headers


def unknown_task(task_id: str) -> ServerError:
    return ServerError(404, "unknown_task", f"no task {task_id!r}; GET /v1/tasks lists them")


def overloaded(message: str, retry_after: int = 1) -> ServerError:
    return ServerError(503, "overloaded", message, headers={"Retry-After": str(retry_after)})


def to_server_error(exc: Exception) -> ServerError | None:
    """Maps the tuners package's errors; ``None`` for anything else."""
    if isinstance(exc, ArtifactError):
        return ServerError(422, "invalid_artifact", str(exc), details=list(exc.problems))
    if isinstance(exc, IncompatibleBackboneError):
        return ServerError(409, "incompatible_backbone", str(exc))
    return None


def _body(code: str, message: str, details: list | None = None) -> dict:
    return {"error": {"code": code, "message": message, "details": details or []}}


def install_handlers(app: FastAPI) -> None:
    """JSON errors for every path, including validation errors and unexpected exceptions."""

    def respond(request: Request, error: ServerError) -> JSONResponse:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.errors.labels(code=error.code).inc()
        return JSONResponse(_body(error.code, error.message, error.details), error.status, headers=error.headers)

    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return respond(request, ServerError(422, "invalid_request", "the request is malformed", details))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return respond(request, ServerError(exc.status_code, code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        mapped = to_server_error(exc)
        if mapped is None:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            mapped = ServerError(500, "internal", f"internal error: {type(exc).__name__}")
        return respond(request, mapped)
