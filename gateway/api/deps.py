from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.core.services import Services


def get_services(request: Request) -> Services:
    return request.app.state.services


Svc = Annotated[Services, Depends(get_services)]


def model_positions(manifest: dict) -> int | None:
    """A stored checkpoint's position limit (``max_position_embeddings``), native or HF upload."""
    model = manifest.get("model") or manifest.get("hf_config") or {}
    value = model.get("max_position_embeddings") if isinstance(model, dict) else None
    return value if isinstance(value, int) and value > 0 else None
