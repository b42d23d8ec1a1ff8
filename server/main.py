"""App factory, lifespan and ``server-serve``.

The lifespan builds the services once (``server.services``: backbone, runtime warmed up, store
recovered, caches, batcher) and only then turns ``/readyz`` ready. Routes reach the services
through the typed dependencies of ``server.deps``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from models.backbones.base import FrozenBackbone
from server.api.routes import backbone as backbone_routes
from server.api.routes import detect, health, tasks
from server.config import Settings
from server.errors import install_handlers
from server.middleware import RequestContext
from server.services import build_services, load_backbone

log = logging.getLogger("sidecar")


def log_management(settings: Settings) -> None:
    level = logging.WARNING if settings.management in ("open", "disabled") else logging.INFO
    log.log(level, settings.management_message)


ServicesFactory = Callable[[Settings], Awaitable[Any]]


def create_app(
    settings: Settings | None = None,
    backbone: FrozenBackbone | None = None,
    services: ServicesFactory | None = None,
) -> FastAPI:
    """The ASGI app.

    Args:
        settings: every setting (default: from the environment).
        backbone: a backbone to serve instead of the one the settings name (tests pass a small one).
        services: builds the services the routes call, instead of this process's own
            (``server/scale`` passes one whose Engine and Tasks call Ray Serve replicas).
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if services is not None:
            built = await services(settings)
        else:
            built = build_services(settings, backbone or load_backbone(settings))
        built.start()
        app.state.services, app.state.metrics = built, built.metrics
        app.state.ready = True
        log_management(settings)
        log.info("ready: serving store %s", settings.store_url or settings.store_dir)
        try:
            yield
        finally:
            app.state.ready = False
            await built.stop()

    app = FastAPI(
        title="Sidecar",
        version="0.1.0",
        summary="Many object-detection tasks from one frozen backbone; one backbone pass per image.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.ready = False
    install_handlers(app)
    if settings.cors_origin_list:  # off unless origins are listed
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestContext)
    for module in (detect, tasks, backbone_routes, health):
        app.include_router(module.router)
    return app


def _flags() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="server-serve", description="Serve detection tasks over one backbone.")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        elif typing.get_origin(field.annotation) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(field.annotation), default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, default=argparse.SUPPRESS, help=field.description)
    return parser


def run(argv: list[str] | None = None) -> None:
    """``server-serve``: flags override ``SIDECAR_*`` environment variables."""
    import uvicorn

    settings = Settings(**vars(_flags().parse_args(argv)))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.ray:
        from server.scale.ray_app import serve_forever

        serve_forever(settings)
        return
    # uvicorn drains in-flight requests on SIGTERM, then restores the previous handler and raises the
    # signal again; this handler makes that requested, graceful stop exit 0 instead of dying of SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: log.info("stopped on SIGTERM after finishing in-flight requests"))
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )


if __name__ == "__main__":
    run()
