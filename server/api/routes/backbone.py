"""``GET /v1/backbone``: what this server runs."""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import EngineDep
from server.schemas import BackboneInfo

router = APIRouter(tags=["backbone"])


@router.get("/v1/backbone", response_model=BackboneInfo)
async def backbone_info(engine: EngineDep) -> BackboneInfo:
    return await engine.backbone_info()
