"""App factory, lifespan and ``server-serve``.

The services are built once (``server.services``: backbone, runtime warmed up, store recovered,
caches, batcher): by ``server-serve`` before it serves, so a start-up mistake is one line, or by
the lifespan of an app made without them (tests). ``/readyz`` turns ready only after that. Routes
reach the services through the typed dependencies of ``server.deps``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import socket
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo

from models.backbones.base import FrozenBackbone
from server.api.bodies import BodyBudget
from server.api.routes import backbone as backbone_routes
from server.api.routes import detect, health, tasks
from server.config import Settings
from server.errors import install_handlers
from server.middleware import RequestContext
from server.protocol import head_deadline_protocol
from server.services import Services, build_services, freeze_heap, load_backbone
from tuners.commands import UsageError, add_common
from tuners.commands import run as run_command

log = logging.getLogger("sidecar")


def log_management(settings: Settings) -> None:
    level = logging.WARNING if settings.management in ("open", "disabled") else logging.INFO
    log.log(level, settings.management_message)


ServicesFactory = Callable[[Settings], Awaitable[Any]]


def build_local(settings: Settings, backbone: FrozenBackbone | None = None) -> Services:
    """This process's services, built and warmed up (:func:`server.services.build_services`)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    return build_services(settings, backbone or load_backbone(settings))


async def ready_local(built: Services) -> Services:
    """What a local server does between being built and being ready: pins restored, spare models built.
    (Under Ray the writer holds the pins, and the replicas follow it.)"""
    await built.tasks.restore_pins()
    await built.tasks.build_spares()
    return built


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
        built = await (services(settings) if services else ready_local(build_local(settings, backbone)))
        built.start()
        freeze_heap()
        app.state.services, app.state.metrics = built, built.metrics
        app.state.upload_turns = asyncio.Semaphore(settings.upload_concurrency)
        built.metrics.body_bytes.set_function(lambda: app.state.body_budget.held)
        app.state.ready = True
        log_management(settings)
        log.info("ready: serving store %s", settings.store_url or settings.store_dir)
        try:
            yield
        finally:
            app.state.ready = False
            await built.stop()
            gc.unfreeze()  # for a process that serves again (tests); a server exits here

    app = FastAPI(
        title="Sidecar",
        version="0.1.0",
        summary="Many object-detection tasks from one frozen backbone; one backbone pass per image.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.ready = False
    app.state.body_budget = BodyBudget(settings.max_body_memory_bytes)
    install_handlers(app)
    add_middleware(app, settings)
    for module in (detect, tasks, backbone_routes, health):
        app.include_router(module.router)
    return app


def add_middleware(app: FastAPI, settings: Settings) -> None:
    """CORS when origins are listed (off otherwise), then the request context: request ids, the
    browser-safety headers, the audit trail and the shared budget of request bodies in memory."""
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestContext, bodies=app.state.body_budget)


def _help(name: str, field: FieldInfo) -> str:
    """A flag's help: what it does, its default and the environment variable that also sets it."""
    default = field.default.get_secret_value() if isinstance(field.default, SecretStr) else field.default
    shown = "none" if default is None else default
    return f"{field.description or ''} (default: {shown}; env SIDECAR_{name.upper()})".lstrip()


def _flags() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="server-serve",
        description="Serve detection tasks over one backbone. Every flag can also be set by its environment "
        "variable; a flag wins over the variable.",
    )
    add_common(parser)
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=_help(name, field))  # fmt: skip
        elif typing.get_origin(field.annotation) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(field.annotation), default=argparse.SUPPRESS,
                                help=_help(name, field))  # fmt: skip
        else:
            parser.add_argument(flag, default=argparse.SUPPRESS, metavar=name.upper(), help=_help(name, field))
    return parser


def setting_flags(argv: list[str] | None = None) -> tuple[dict[str, Any], bool]:
    """(the settings given as flags, ``--verbose``)."""
    args = vars(_flags().parse_args(argv))
    return args, args.pop("verbose")


def run(argv: list[str] | None = None) -> int:
    """``server-serve``: flags override ``SIDECAR_*`` environment variables."""
    args, verbose = setting_flags(argv)
    return run_command("server-serve", lambda: _serve(args), verbose)


def _setting_problem(error: Any) -> str:
    name = str(error["loc"][0]) if error["loc"] else "settings"
    where = f"--{name.replace('_', '-')} (env SIDECAR_{name.upper()})" if name in Settings.model_fields else name
    return f"{where}: {error['msg']}" + (
        f", got {error['input']!r}" if "input" in error and name != "settings" else ""
    )


def _serve(args: dict[str, object]) -> int:
    import torch
    import uvicorn

    try:
        settings = Settings(**args)
    except ValidationError as e:
        raise UsageError("; ".join(_setting_problem(err) for err in e.errors())) from None
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for, but torch sees no CUDA GPU here; use --device cpu or auto")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.ray:  # Serve's proxies bind the address (one may already hold it, for a redeploy)
        from server.scale.ray_app import serve_forever

        serve_forever(settings)
        return 0
    check_address(settings.host, settings.port)
    built = build_local(settings)  # here, not in the lifespan: a wrong path or URL is one line, not a traceback
    # uvicorn drains in-flight requests on SIGTERM, then restores the previous handler and raises the
    # signal again; this handler makes that requested, graceful stop exit 0 instead of dying of SIGTERM.
    # (Set after the build: a SIGTERM while building stops the process at once, as before.)
    signal.signal(signal.SIGTERM, lambda *_: log.info("stopped on SIGTERM after finishing in-flight requests"))
    uvicorn.run(create_app(settings, services=lambda _: ready_local(built)), **uvicorn_options(settings))
    return 0


def check_address(host: str, port: int) -> None:
    """Binds ``host:port`` once and lets it go, so that an address that cannot be served is one line
    before start-up, not uvicorn's error after the backbone has loaded."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as e:  # socket.gaierror
        raise UsageError(f"--host {host} (env SIDECAR_HOST) cannot be resolved: {e.strerror or e}") from None
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as e:
        raise RuntimeError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What ``server-serve`` runs uvicorn with (the tests' live servers too)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "ssl_certfile": settings.ssl_certfile,
        "ssl_keyfile": settings.ssl_keyfile,
        "timeout_graceful_shutdown": settings.shutdown_timeout,
        "http": head_deadline_protocol(settings.head_timeout_s),
    }


if __name__ == "__main__":
    raise SystemExit(run())
