"""Liveness, readiness (after the backbone is loaded and warmed up), Prometheus metrics, demo page."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.deps import QuarantinedDep, ServicesDep, SettingsDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
@router.head("/healthz", include_in_schema=False)  # for probes and monitors that ask with HEAD
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
@router.head("/readyz", include_in_schema=False)
async def readyz(request: Request, settings: SettingsDep, quarantined: QuarantinedDep) -> JSONResponse:
    """503 until the backbone is loaded and warmed up; ``details`` says how management is guarded and
    which tasks are quarantined (kept on disk, not served), with why."""
    ready = getattr(request.app.state, "ready", False)
    details = {"management": settings.management, "message": settings.management_message, "quarantined": quarantined}
    body = {"ready": ready, "details": details}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text format",
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(services: ServicesDep) -> Response:
    return Response(await services.metrics_text(), media_type=CONTENT_TYPE_LATEST)


WEB = {"": ("index.html", "text/html; charset=utf-8"), "app.js": ("app.js", "text/javascript; charset=utf-8"),
       "app.css": ("app.css", "text/css; charset=utf-8")}  # fmt: skip


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def demo_page() -> Response:
    return _web("")


@router.get("/app.js", include_in_schema=False)
async def demo_script() -> Response:
    return _web("app.js")


@router.get("/app.css", include_in_schema=False)
async def demo_style() -> Response:
    return _web("app.css")


def _web(name: str) -> Response:
    """The console's files, each its own response: no inline script or style, so a strict CSP holds."""
    filename, media_type = WEB[name]
    return Response((files("server") / "web" / filename).read_text(), media_type=media_type)
