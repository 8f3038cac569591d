"""``/docs`` (Swagger UI) and ``/redoc`` served with no outside network.

FastAPI's default pages load their JavaScript and CSS from a public CDN, so on a LAN
without internet they stay blank.  Here the same pages load the assets that the
``fastapi-offline`` package ships (``fastapi_offline/static``), served by this app under
``/docs-assets``; ReDoc is told not to fetch Google Fonts and Swagger not to call its
online validator, and a Content-Security-Policy keeps the pages' images and fonts on this
server (ReDoc's sidebar logo points at a CDN).  Create the app with ``docs_url=None, redoc_url=None`` and call
``add_offline_docs(app)``.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"
# what the pages may load besides their own inline script: nothing from elsewhere
CSP = "img-src 'self' data:; font-src 'self' data:"


def _local(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CSP
    return page


def add_offline_docs(app: FastAPI) -> None:
    static = files("fastapi_offline") / "static"
    app.mount(ASSETS, StaticFiles(directory=str(static)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger():
        return _local(get_swagger_ui_html(
            openapi_url=app.openapi_url, title=app.title + " - Swagger UI",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None}))

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        return _local(get_redoc_html(
            openapi_url=app.openapi_url, title=app.title + " - ReDoc",
            redoc_js_url=f"{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS}/favicon.png", with_google_fonts=False))
