"""The playground: a static page at `/` and `/playground` that drives the gateway's public API.

Plain HTML/CSS/JS shipped in this package (`static/`), read once when the router is built; no build step,
no CDN, nothing fetched at run time. The page calls the same endpoints a client calls
(`/v1/models`, `/v1/images/generations`, `/v1/videos`), so it needs no route of its own beyond the files.
A strict Content-Security-Policy keeps it that way: the browser may load scripts, styles and media only
from this origin (plus `blob:`/`data:` for the generated image and video).

The API key, when the gateway requires one, is typed into the page and kept in the browser's
sessionStorage (or localStorage if the user ticks "remember"); the gateway never stores it for the page.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from diffdisagg.worker.gateway.errors import APIError

#: Files served under /playground/static/, with their media types. An allow-list, not a directory mount:
#: nothing else in the package can be reached through this route.
STATIC_FILES = {
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
}
INDEX = "index.html"
STATIC_PREFIX = "/playground/static"

_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
        "style-src 'self'; script-src 'self'; connect-src 'self'; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}


def _read(name: str) -> bytes:
    return (resources.files("diffdisagg.worker.gateway") / "static" / name).read_bytes()


def playground_router() -> APIRouter:
    """Routes: GET / and /playground (the page), GET /playground/static/<file> (its CSS and JS)."""
    files = {name: (_read(name), media) for name, media in STATIC_FILES.items()}
    index = _read(INDEX)
    router = APIRouter()

    async def page() -> Response:
        return Response(index, media_type="text/html; charset=utf-8", headers=_HEADERS)

    router.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    router.add_api_route("/playground", page, methods=["GET"], include_in_schema=False)

    @router.get(STATIC_PREFIX + "/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in files:
            raise APIError(404, f"no playground file {name!r}", code="not_found")
        body, media = files[name]
        return Response(body, media_type=media, headers=_HEADERS)

    return router
