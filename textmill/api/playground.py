"""GET /: the playground, a page for looking at what the model does token by token.

Plain files in textmill/api/static/ (no build step, no CDN: the page works on a machine with
no internet), shipped as package data. The page talks to the public API only (/v1/models,
/v1/completions), so it can show nothing a client could not get; it asks for the API key
itself, which is why these paths are open (auth.OPEN_PATHS) while /v1/* is not.
"""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
          "css": "text/css; charset=utf-8"}
# URL path -> file in static/. Listed one by one: nothing else in the package is served.
ASSETS = {"/": "index.html", "/playground/app.js": "app.js", "/playground/render.js": "render.js",
          "/playground/style.css": "style.css"}
PAGE_PATHS = frozenset(ASSETS)

router = APIRouter(include_in_schema=False)


def _asset_route(name: str):
    media_type = _TYPES[name.rsplit(".", 1)[1]]

    async def asset() -> Response:
        # Read per request (a few KB): an upgraded package is served without a restart, and
        # no-cache makes the browser ask again rather than keep an old page beside a new API.
        body = (resources.files("textmill.api") / "static" / name).read_bytes()
        return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return asset


for _path, _name in ASSETS.items():
    router.add_api_route(_path, _asset_route(_name), methods=["GET"])
