"""GET /playground: a page to talk to the relay from a browser, shipped with the package.

Plain HTML and JavaScript, no build step. The page connects to the relay's realtime endpoint
like any browser client (the key as the `openai-insecure-api-key.` subprotocol) and keeps the
key in the tab's memory only. Served with a Content-Security-Policy that lets it load its own
files and connect to its own origin, nothing else.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

# The page's own files: name -> content type. Nothing else under /playground is served.
_FILES = {
    "index.html": "text/html",
    "playground.js": "text/javascript",
    "capture-worklet.js": "text/javascript",
    "playground.css": "text/css",
}
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",  # also what AudioWorklet modules load under
        "style-src 'self'",
        "connect-src 'self'",  # CSP 3: 'self' covers ws:// and wss:// to the same host
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
PLAYGROUND_FILES = web.AppKey("playground_files", dict[str, bytes])


def add_routes(app: web.Application) -> None:
    here = resources.files(__name__)
    app[PLAYGROUND_FILES] = {name: here.joinpath(name).read_bytes() for name in _FILES}
    app.router.add_get("/playground", _page)
    app.router.add_get("/playground/{name}", _file)


async def _page(request: web.Request) -> web.Response:
    return _serve(request, "index.html")


async def _file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _FILES:
        raise web.HTTPNotFound()
    return _serve(request, name)


def _serve(request: web.Request, name: str) -> web.Response:
    body = request.app[PLAYGROUND_FILES][name]
    return web.Response(body=body, content_type=_FILES[name], charset="utf-8", headers=_HEADERS)
