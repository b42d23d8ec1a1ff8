"""The ingress's services: the same methods as ``Engine`` and ``Tasks``, calling Ray Serve replicas.

Routing policy. A request goes whole to one engine replica, so a fan-out still makes one
backbone pass per image. Its routing key is the smallest task id it names: the same set in any
order lands on the same replica, and Serve's multiplexed routing prefers a replica already
holding that task (then the one holding fewest). The set's other tasks load there once, if cold,
and stay (SCALE_OUT.md, section 5). A replica that dies mid-request is retried once on
another; if that fails too, the answer is 503 ``overloaded`` with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from models.postprocess import PostprocessConfig
from server.engine import Limits, parse_task_ids
from server.exceptions import Overloaded
from server.metrics import Metrics
from server.schemas import BackboneInfo, DetectResponse, TaskInfo, TaskList, TaskVersions

log = logging.getLogger(__name__)
DEAD = (RayActorError, ActorDiedError, ActorUnavailableError)


class RemoteEngine:
    """``Engine.detect`` and ``backbone_info``, answered by an engine replica."""

    def __init__(self, engines: DeploymentHandle, limits: Limits) -> None:
        self.engines, self.limits = engines, limits

    async def detect(self, data: bytes, task_ids: str | list[str], post: PostprocessConfig) -> DetectResponse:
        specs = parse_task_ids(task_ids, self.limits.max_tasks)  # bad ids are refused here, before routing
        names = [f"{t}@{v}" if v else t for t, v in specs]
        routed = self.engines.options(multiplexed_model_id=min(t for t, _ in specs))
        for attempt in (1, 2):
            try:
                return await routed.detect.remote(data, names, post)
            except DEAD as e:
                log.warning("an engine replica died during a request (attempt %d): %s", attempt, e)
        raise Overloaded("an engine replica stopped while answering; retry shortly", retry_after=1)

    async def backbone_info(self) -> BackboneInfo:
        return await self.engines.backbone_info.remote()


class RemoteTasks:
    """``Tasks`` methods, answered by the store's writer; residency merged from the replicas."""

    def __init__(self, writer: DeploymentHandle, engines: DeploymentHandle) -> None:
        self.writer, self.engines = writer, engines

    async def _residency(self) -> tuple[dict[str, str], set[str]]:
        """Each task's best tier over the replicas, and the tasks some replica serves compiled."""
        order = {"device": 0, "host": 1}
        best: dict[str, str] = {}
        compiled: set[str] = set()
        for snap in await snapshots(self.engines):
            compiled |= set(snap["compiled"])
            for task_id, tier in snap["resident"].items():
                if task_id not in best or order[tier] < order[best[task_id]]:
                    best[task_id] = tier
        return best, compiled

    async def ask(self, method: str, *args: object) -> Any:
        """Calls the writer; while it restarts (Ray replaces it in seconds), answers 503 with Retry-After."""
        try:
            return await getattr(self.writer, method).remote(*args)
        except DEAD as e:
            log.warning("the store's writer stopped during %s: %s", method, e)
            raise Overloaded("the store's writer is restarting; retry shortly", retry_after=2) from None

    async def list(self) -> TaskList:
        found, seen = await self.ask("list"), await self._residency()
        return found.model_copy(update={"tasks": [_resident(t, *seen) for t in found.tasks]})

    async def get(self, task_id: str) -> TaskInfo:
        return _resident(await self.ask("get", task_id), *await self._residency())

    async def publish(self, task_id: str, weights: bytes, config: bytes) -> TaskInfo:
        return await self.ask("publish", task_id, weights, config)

    async def delete(self, task_id: str) -> None:
        await self.ask("delete", task_id)

    async def pin(self, task_id: str) -> TaskInfo:
        return await self.ask("pin", task_id, True)

    async def unpin(self, task_id: str) -> TaskInfo:
        return await self.ask("pin", task_id, False)

    async def versions(self, task_id: str) -> TaskVersions:
        return await self.ask("versions", task_id)

    async def rollback(self, task_id: str, version: int) -> TaskInfo:
        return await self.ask("rollback", task_id, version)


def _resident(info: TaskInfo, resident: dict[str, str], compiled: set[str]) -> TaskInfo:
    return info.model_copy(update={"residency": resident.get(info.id), "compiled": info.id in compiled})


async def snapshots(engines: DeploymentHandle, metrics: bool = False) -> list[dict[str, Any]]:
    """Every live replica's snapshot, with its metrics' text when ``metrics`` (replicas that do not
    answer within 5 s are left out)."""
    found = await engines.broadcast("snapshot", metrics).results_async(timeout_s=5, return_exceptions=True)
    return [s for s in found if isinstance(s, dict)]


SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{[^}]*\})?(?P<rest> .*)$")


INGRESS_ONLY = ("sidecar_request_body_bytes",)  # the ingress reads the bodies; a replica's gauge stays 0


def merge_metrics(
    texts: dict[str, str], own: str, own_families: tuple[str, ...] = ("sidecar_errors", *INGRESS_ONLY)
) -> str:
    """Prometheus texts of several registries as one: each replica's samples get ``replica="<pid>"``,
    and every family is written once (headers, then all its samples), as the text format requires.
    From ``own`` (the ingress's registry) only ``own_families`` are kept: it serves no images; from the
    replicas, all but ``INGRESS_ONLY``."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = defaultdict(list)
    for replica, text in [*texts.items(), ("", own)]:
        family = ""
        for line in text.splitlines():
            if line.startswith("# "):
                family = line.split()[2]
                if line.split()[1] in ("HELP", "TYPE") and len(headers.setdefault(family, [])) < 2:
                    if line not in headers[family]:
                        headers[family].append(line)
                continue
            found = SAMPLE.match(line)
            if found is None or (not replica and not family.startswith(own_families)):
                continue
            if replica and family.startswith(INGRESS_ONLY):
                continue
            labels = found["labels"][1:-1] if found["labels"] else ""
            if replica:
                labels = f'replica="{replica}"' + (f",{labels}" if labels else "")
            samples[family].append(f"{found['name']}{{{labels}}}{found['rest']}" if labels else line)
    return "".join("\n".join([*headers[f], *samples[f]]) + "\n" for f in headers)


@dataclass
class RemoteServices:
    """What the ingress app's routes reach: ``engine``, ``tasks``, its own ``metrics`` (errors)."""

    engine: RemoteEngine
    tasks: RemoteTasks
    metrics: Metrics
    engines: DeploymentHandle
    writer: DeploymentHandle

    def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def metrics_text(self) -> bytes:
        texts = {str(s["pid"]): s["metrics"] for s in await snapshots(self.engines, metrics=True)}
        return await asyncio.to_thread(lambda: merge_metrics(texts, self.metrics.render().decode()).encode())

    async def quarantined(self) -> dict[str, str]:
        return await self.tasks.ask("quarantined")
