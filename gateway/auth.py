"""Bearer API keys -> teams. Keys are configured as sha256 digests and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False, description="An API key issued to your team")
MISSING = "missing API key: send `Authorization: Bearer <key>`"
INVALID = "invalid API key"


class AuthError(Exception):
    """No usable key (401); ``detail`` says which."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


def team_for_key(key: str, team_of_hash: dict[str, str]) -> str | None:
    digest = hashlib.sha256(key.encode()).hexdigest()
    found = None
    for h, team in team_of_hash.items():  # no early exit: time does not depend on which key matched
        if hmac.compare_digest(h, digest):
            found = team
    return found


def authenticate(authorization: str | None, team_of_hash: dict[str, str]) -> str:
    """The team of an ``Authorization: Bearer <key>`` header value; AuthError otherwise.

    The one key lookup of the gateway: the routes' dependency and the upload gate (which runs
    before a body is read) both call it."""
    scheme, _, key = (authorization or "").strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthError(MISSING)
    team = team_for_key(key, team_of_hash)
    if team is None:
        raise AuthError(INVALID)
    return team


def require_team(request: Request,
                 creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The route dependency (``creds`` only documents the scheme; the header is read as sent)."""
    try:
        team = authenticate(request.headers.get("authorization"), request.app.state.services.settings.team_of_hash)
    except AuthError as e:
        raise HTTPException(401, e.detail, headers={"WWW-Authenticate": "Bearer"}) from None
    request.state.team = team
    return team


Team = Annotated[str, Depends(require_team)]
