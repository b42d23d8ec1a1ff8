"""``GET /v1/backbone``: what this server runs."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.schemas import BackboneInfo

router = APIRouter(tags=["backbone"])


@router.get("/v1/backbone", response_model=BackboneInfo)
async def backbone_info(request: Request) -> BackboneInfo:
    state = request.app.state
    backbone = state.backbone
    return BackboneInfo(
        name=backbone.name,
        fingerprint=backbone.fingerprint,
        weights_source=backbone.weights_source,
        taps=backbone.feature_spec.to_dict(),
        preprocess=backbone.preprocess.to_dict(),
        runtime=state.settings.runtime,
        provider=state.runtime.provider,
        device=str(state.engine.device),
        shared_image_passes=state.engine.backbone_image_passes,
    )
