"""API docs served offline: Swagger UI and ReDoc pages whose scripts, styles and icon come from
the app itself (the assets ``fastapi-offline`` ships), never from a CDN. Shared by the gateway
and the standalone generation server; the protocol package does not import it."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/docs-assets"


def serve_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """``docs_url`` (Swagger UI) and ``redoc_url`` over ``app.openapi_url``, assets under ``ASSETS_URL``.
    Build the app with ``docs_url=None, redoc_url=None`` so FastAPI's CDN pages are not added too."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")
    oauth2 = f"{docs_url}/oauth2-redirect"

    def url(request: Request, path: str) -> str:
        return request.scope.get("root_path", "") + path

    @app.get(docs_url, include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=url(request, app.openapi_url), title=f"{app.title} - Swagger UI",
                                   swagger_js_url=url(request, f"{ASSETS_URL}/swagger-ui-bundle.js"),
                                   swagger_css_url=url(request, f"{ASSETS_URL}/swagger-ui.css"),
                                   swagger_favicon_url=url(request, f"{ASSETS_URL}/favicon.png"),
                                   oauth2_redirect_url=url(request, oauth2))

    @app.get(oauth2, include_in_schema=False)
    async def swagger_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url=url(request, app.openapi_url), title=f"{app.title} - ReDoc",
                              redoc_js_url=url(request, f"{ASSETS_URL}/redoc.standalone.js"),
                              redoc_favicon_url=url(request, f"{ASSETS_URL}/favicon.png"), with_google_fonts=False)
