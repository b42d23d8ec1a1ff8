"""The Ray Serve application: ``server-serve --ray``, or ``serve run server.scale.ray_app:app``.

Three deployments (SCALE_OUT.md):

- ``Api``: Sidecar's own FastAPI app (``create_app``) behind ``@serve.ingress``, so the HTTP API,
  errors, auth, audit, ``/readyz`` and ``/metrics`` are those of the single-process server; its
  services call the others (``remote.py``).
- ``Engine``: ``ray_replicas`` engine replicas (or autoscaled between ``ray_min_replicas`` and
  ``ray_max_replicas``), each with ``ray_replica_cpus`` CPUs and ``ray_replica_gpus`` GPUs.
- ``Writer``: the store's only writer (one replica).

The store is a path every replica reaches: a local folder on one machine, a shared volume on a
cluster. No ``@serve.batch``: it would split batches by task and lose the shared backbone pass;
each engine replica batches with its own batcher instead.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from server.config import Settings
from server.engine import Limits
from server.main import create_app
from server.metrics import Metrics
from server.scale.remote import RemoteEngine, RemoteServices, RemoteTasks, snapshots
from server.scale.replicas import EngineReplica, StoreWriter

log = logging.getLogger(__name__)
APP = "sidecar"
# Ray on a machine with no network, reachable on loopback only (SCALE_OUT.md, section 2).
OFFLINE_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class Api:
    """The ingress replica. Its app's lifespan reaches the other deployments by name; binding them
    here makes them part of the application."""

    def __init__(self, engines: DeploymentHandle, writer: DeploymentHandle) -> None:
        self.engines, self.writer = engines, writer


async def remote_services(settings: Settings) -> RemoteServices:
    """Handles to the other deployments; returns once an engine replica answers, so /readyz means it."""
    app_name = serve.get_replica_context().app_name
    engines = serve.get_deployment_handle("Engine", app_name)
    writer = serve.get_deployment_handle("Writer", app_name)
    deadline = time.monotonic() + 600
    while not await snapshots(engines):
        if time.monotonic() > deadline:
            raise RuntimeError("no engine replica came up within 600 s")
        await asyncio.sleep(0.5)
    limits = Limits(settings.max_request_bytes, settings.max_image_pixels, settings.max_tasks_per_request)
    return RemoteServices(RemoteEngine(engines, limits), RemoteTasks(writer, engines), Metrics(), engines, writer)


def engine_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.ray_replica_cpus, "num_gpus": settings.ray_replica_gpus},
        "max_ongoing_requests": max(16, 2 * settings.max_batch_size),  # room to fill a batch
        "health_check_period_s": 2,
        "graceful_shutdown_timeout_s": min(settings.shutdown_timeout, 30),
        "graceful_shutdown_wait_loop_s": 0.1,
    }
    if settings.ray_max_replicas:
        options["autoscaling_config"] = {
            "min_replicas": settings.ray_min_replicas,
            "initial_replicas": settings.ray_replicas,
            "max_replicas": settings.ray_max_replicas,
        }
    else:
        options["num_replicas"] = settings.ray_replicas
    return options


def build_app(settings: Settings) -> Application:
    """The bound application; paths become absolute, since replicas may start in other folders."""
    settings = settings.model_copy(
        update={"store_dir": settings.store_dir.resolve(), "cache_dir": settings.cache_dir.resolve()}
    )
    replica = EngineReplica.with_routing(settings.ray_max_tasks_per_replica)
    engine = serve.deployment(replica, name="Engine", **engine_options(settings))
    writer = serve.deployment(
        StoreWriter,
        name="Writer",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=64,
        health_check_period_s=2,  # a dead writer is replaced in seconds; meanwhile writes answer 503
    )
    ingress = serve.deployment(
        serve.ingress(create_app(settings, services=remote_services))(Api),
        name="Api",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=256,
    )
    return ingress.bind(engine.bind(settings), writer.bind(settings))


def http_options(settings: Settings) -> dict[str, Any]:
    """Serve's proxy options: the address, and the certificate and key when TLS is set (the proxy
    terminates it, as uvicorn does for ``server-serve``). Paths are absolute: the proxy is an actor
    that starts in another folder. Serve's other proxy defaults stay (README, settings)."""

    def absolute(path: Path | None) -> str | None:
        return None if path is None else str(path.resolve())

    return {
        "host": settings.host,
        "port": settings.port,
        "ssl_certfile": absolute(settings.ssl_certfile),
        "ssl_keyfile": absolute(settings.ssl_keyfile),
    }


def start_proxies(settings: Settings) -> None:
    """``serve.start`` with :func:`http_options`. Where Serve already runs in the cluster, it keeps its
    proxies' options and only logs that it ignored the new ones: a server asked for HTTPS or another
    port would then say it serves what it does not, so a difference is an error here."""
    from ray.serve.context import _get_global_client  # Serve has no public accessor for the running options

    wanted = http_options(settings)
    serve.start(http_options=wanted)
    running = _get_global_client().http_config
    differ = {key: getattr(running, key) for key, value in wanted.items() if getattr(running, key) != value}
    if differ:
        raise RuntimeError(
            f"Serve already runs in this Ray cluster with other proxy options ({differ}, where this server "
            "asks for " + ", ".join(f"{key}={wanted[key]!r}" for key in differ) + "); stop it first "
            "(serve shutdown) or start with its options"
        )


def replica_error(app: str) -> str:
    """The exception a failed deployment's replicas raised, as ``Deployment: Error: message``: the last
    line of the traceback Serve keeps in the deployment's status (a wrong ``--store-url``, a missing
    weights file), so that ``server-serve --ray`` ends in one line that says why, as without Ray."""
    status = serve.status().applications.get(app)
    for name, deployment in status.deployments.items() if status else []:
        lines = [line.strip() for line in deployment.message.splitlines() if line.strip()]
        if deployment.status == "DEPLOY_FAILED" and lines:
            return f"{name}: {lines[-1]}"
    return ""


def serve_forever(settings: Settings) -> None:
    """``server-serve --ray``: joins (or starts) Ray, serves on ``host:port`` until SIGTERM or SIGINT."""
    import ray

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    options: dict[str, Any] = {}
    if settings.ray_address is None:  # a local Ray: logical CPUs for every replica, the ingress and the writer
        wanted = settings.ray_replica_cpus * max(settings.ray_replicas, settings.ray_max_replicas) + 0.2
        options["num_cpus"] = max(os.cpu_count() or 1, math.ceil(wanted))
        if options["num_cpus"] > (os.cpu_count() or 1):
            log.warning("a local Ray with %d logical CPUs on %d cores: replicas will share cores",
                        options["num_cpus"], os.cpu_count())  # fmt: skip
    ray.init(address=settings.ray_address, include_dashboard=False, namespace=APP, log_to_driver=False, **options)
    stop = threading.Event()  # replaces the handler ray.init installs, which exits at once: stop gracefully
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        start_proxies(settings)
    except RuntimeError:
        ray.shutdown()  # this driver's connection; the cluster's Serve is left as it was
        raise
    try:
        serve.run(build_app(settings), name=APP, route_prefix="/")
    except RuntimeError as e:  # Serve says which deployments failed; the replicas' own error says why
        why = replica_error(APP)
        serve.shutdown()
        ray.shutdown()
        raise RuntimeError(f"{e} {why}".strip()) from None
    scheme = "https" if settings.ssl_certfile else "http"
    log.info("serving on Ray at %s://%s:%d with %d engine replicas", scheme, settings.host, settings.port,
             settings.ray_replicas)  # fmt: skip
    stop.wait()
    log.info("stopping: draining the replicas")
    # Bounded: Serve's graceful shutdown waits on replicas, which can hang if Ray itself is going down.
    closing = threading.Thread(target=serve.shutdown, daemon=True)
    closing.start()
    closing.join(settings.shutdown_timeout + 10)
    ray.shutdown()


def __getattr__(name: str) -> Application:
    """``serve run server.scale.ray_app:app`` builds the application from the environment's settings."""
    if name == "app":
        settings = Settings()
        if settings.ssl_certfile is not None:  # Serve starts its proxies with its own options, not these
            raise ValueError(
                "SIDECAR_SSL_CERTFILE and SIDECAR_SSL_KEYFILE apply to server-serve (--ray too); under serve "
                "run or KubeRay, Serve's proxies take TLS from http_options in Serve's config (ssl_certfile, "
                "ssl_keyfile): set them there and unset these"
            )
        return build_app(settings.behind_serve_proxies())
    raise AttributeError(name)
