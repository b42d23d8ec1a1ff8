"""App factory, lifespan and ``server-serve``.

The lifespan loads the backbone once, warms it up, recovers the store, starts the batcher, and
only then turns ``/readyz`` ready. Every loaded object lives on ``app.state``.
"""

from __future__ import annotations

import argparse
import logging
import typing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from models import build_backbone
from models.backbones.base import FrozenBackbone
from models.runtime import build_runtime
from models.transform import PreprocessSpec
from server.api.routes import backbone as backbone_routes
from server.api.routes import detect, health, tasks
from server.batcher import Batcher
from server.config import Settings
from server.engine import Engine
from server.errors import install_handlers
from server.feature_cache import FeatureCache
from server.metrics import Metrics
from server.store import TaskStore
from server.tuner_cache import TunerCache

log = logging.getLogger("sidecar")


def load_backbone(settings: Settings) -> FrozenBackbone:
    return build_backbone(
        settings.backbone,
        weights=settings.weights,
        allow_download=settings.allow_download,
        preprocess=PreprocessSpec(size=settings.image_size),
    )


def start_engine(app: FastAPI, settings: Settings, backbone: FrozenBackbone) -> None:
    """Builds runtime, caches, engine and batcher onto ``app.state`` and warms the backbone up."""
    state = app.state
    state.metrics = Metrics()
    state.runtime = build_runtime(backbone, settings.runtime, settings.device, taps=list(backbone.feature_spec))
    device = torch.device(
        settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    state.backbone = backbone.to(device)
    state.store = TaskStore(settings.store_dir)
    state.store.recover()
    budgets = {"device": settings.device_cache_bytes, "host": settings.host_cache_bytes}
    state.tuner_cache = TunerCache(state.store, state.backbone, device, budgets, state.metrics)
    features = FeatureCache(settings.feature_cache_bytes) if settings.feature_cache_bytes else None
    state.engine = Engine(state.backbone, state.runtime, state.metrics, features)
    canvas = backbone.preprocess.canvas
    state.runtime(torch.zeros(1, 3, canvas, canvas), list(backbone.pyramid_taps))  # warm-up
    state.batcher = Batcher(
        state.engine, state.metrics, settings.max_batch_size, settings.batch_window_ms / 1e3, settings.max_queue
    )


def create_app(settings: Settings | None = None, backbone: FrozenBackbone | None = None) -> FastAPI:
    """The ASGI app. ``backbone`` lets tests pass a small model; otherwise it is built from settings."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        start_engine(app, settings, backbone or load_backbone(settings))
        app.state.batcher.start()
        app.state.ready = True
        log.info("ready: %s on %s, store %s", app.state.backbone.name, app.state.engine.device, settings.store_dir)
        try:
            yield
        finally:
            app.state.ready = False
            await app.state.batcher.stop()
            app.state.tuner_cache.close()

    app = FastAPI(
        title="Sidecar",
        version="0.1.0",
        summary="Many object-detection tasks from one frozen backbone; one backbone pass per image.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.ready = False
    install_handlers(app)
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
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


if __name__ == "__main__":
    run()
