"""Bearer API keys -> teams. Keys are configured as sha256 digests and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False, description="An API key issued to your team")


def team_for_key(key: str, team_of_hash: dict[str, str]) -> str | None:
    digest = hashlib.sha256(key.encode()).hexdigest()
    found = None
    for h, team in team_of_hash.items():  # no early exit: time does not depend on which key matched
        if hmac.compare_digest(h, digest):
            found = team
    return found


def require_team(request: Request,
                 creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise HTTPException(401, "missing API key: send `Authorization: Bearer <key>`",
                            headers={"WWW-Authenticate": "Bearer"})
    team = team_for_key(creds.credentials, request.app.state.services.settings.team_of_hash)
    if team is None:
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    request.state.team = team
    return team


Team = Annotated[str, Depends(require_team)]
