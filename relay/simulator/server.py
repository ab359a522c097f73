"""The simulator's aiohttp application: authentication, the two endpoints, and start-up.

``GET /openai/v1/realtime?model=<deployment>`` speaks the GA protocol;
``GET /openai/realtime?api-version=<v>&deployment=<deployment>`` speaks the beta/preview
protocol. ``?intent=transcription`` opens a transcription-only session instead (no
deployment: the preview path refuses one), and ``?call_id=`` attaches a sideband socket to a
WebRTC call this simulator answered (`calls`). Like Azure, credentials are checked first,
then the query, and every refusal is an HTTP error with a JSON body before any WebSocket
upgrade.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from types import TracebackType
from typing import Any, Literal

import orjson
import structlog
from aiohttp import WSCloseCode, web

from relay.session.dialect import is_preview_api_version
from relay.simulator.calls import CALLS_KEY
from relay.simulator.connection import Connection
from relay.simulator.engine import Engine
from relay.simulator.ids import IdFactory, next_seed
from relay.simulator.options import SimulatorOptions
from relay.simulator.schema import BETA, GA, Dialect

# The API accepts 15 MiB of audio per append, about 20 MiB of JSON, and sends whole audio
# items back (`conversation.item.retrieved`): room for both, as the relay's default.
MAX_MSG_SIZE = 32 * 1024 * 1024
API_KEY_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
    "provide a valid key for an active subscription and use a correct regional API endpoint "
    "for your resource."
)
TOKEN_DENIED = (
    "Unauthorized. Access token is missing, invalid, audience is incorrect "
    "(https://cognitiveservices.azure.com), or have expired."
)

OPTIONS_KEY = web.AppKey("simulator_options", SimulatorOptions)
_SimulatorSockets = set[web.WebSocketResponse[Literal[False]]]
SOCKETS_KEY: web.AppKey[_SimulatorSockets] = web.AppKey("simulator_sockets", _SimulatorSockets)

log = structlog.get_logger(__name__)


def create_simulator_app(options: SimulatorOptions) -> web.Application:
    """Build the simulated Azure realtime service as an aiohttp application."""
    app = web.Application()
    app[OPTIONS_KEY] = options
    app[SOCKETS_KEY] = set()
    app.router.add_get("/openai/v1/realtime", _ga_endpoint)
    app.router.add_get("/openai/realtime", _preview_endpoint)
    from relay.simulator import webrtc  # imports this module

    webrtc.add_routes(app)
    app.on_shutdown.append(_close_sockets)
    return app


def http_error(status: int, code: str, message: str) -> web.Response:
    """An Azure-style JSON error response."""
    return web.Response(
        status=status,
        body=orjson.dumps({"error": {"code": code, "message": message}}),
        content_type="application/json",
        headers={"apim-request-id": str(uuid.uuid4())},
    )


def _matches(presented: str, accepted: frozenset[str]) -> bool:
    given = presented.encode()
    # Compare against every key in constant time, without stopping early.
    return sum(hmac.compare_digest(given, key.encode()) for key in accepted) > 0


def authenticate(request: web.Request, options: SimulatorOptions) -> web.Response | None:
    """Return a 401 response unless the request carries an accepted credential.

    Accepted: ``api-key`` header (or ``?api-key=``) from ``api_keys``, or
    ``Authorization: Bearer`` with one of ``api_keys`` or ``bearer_tokens``.
    """
    api_key = request.headers.get("api-key") or request.query.get("api-key")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" else ""
    if api_key and _matches(api_key, options.api_keys):
        return None
    if bearer and _matches(bearer, options.api_keys | options.bearer_tokens):
        return None
    via = "api-key" if api_key or not bearer else "bearer"
    log.info("simulator.auth_failed", path=request.path, credential=via, peer=request.remote)
    return http_error(401, "401", API_KEY_DENIED if via == "api-key" else TOKEN_DENIED)


async def _ga_endpoint(request: web.Request) -> web.StreamResponse:
    options = request.app[OPTIONS_KEY]
    denied = authenticate(request, options)
    if denied is not None:
        return denied
    if "api-version" in request.query:
        return http_error(
            400, "BadRequest", "api-version query parameter is not allowed when using /v1 path"
        )
    intent = _intent(request)
    if isinstance(intent, web.Response):
        return intent
    call_id = request.query.get("call_id")
    if call_id is not None:
        return await _attach(request, call_id)
    model = request.query.get("model", "")
    if not model and not intent:
        return http_error(400, "BadRequest", "Missing required query parameter: model")
    return await _serve(request, GA, model, options, transcription=intent)


async def _preview_endpoint(request: web.Request) -> web.StreamResponse:
    options = request.app[OPTIONS_KEY]
    denied = authenticate(request, options)
    if denied is not None:
        return denied
    if not request.query.get("api-version"):
        return http_error(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        )
    intent = _intent(request)
    if isinstance(intent, web.Response):
        return intent
    deployment = request.query.get("deployment")
    if intent and deployment:
        return http_error(
            400, "BadRequest", "The deployment query parameter is not allowed for transcription."
        )
    if not deployment and not intent:
        return http_error(400, "BadRequest", "Missing required query parameter: deployment")
    # The path and api-version decide the dialect (protocol.md §9): a preview version speaks
    # the beta schema; 2025-08-28, what openai-python's AzureOpenAI sends here, GA events.
    dialect = BETA if is_preview_api_version(request.query["api-version"]) else GA
    return await _serve(request, dialect, deployment or "", options, transcription=intent)


def _intent(request: web.Request) -> bool | web.Response:
    """True for a transcription session, False for a conversation; or a refusal."""
    intent = request.query.get("intent")
    if intent is None:
        return False
    if intent != "transcription":
        return http_error(400, "BadRequest", f"Invalid value for intent: {intent!r}.")
    return True


def _prepared_socket(request: web.Request) -> web.WebSocketResponse[Literal[False]] | None:
    ws: web.WebSocketResponse[Literal[False]] = web.WebSocketResponse(
        compress=False, max_msg_size=MAX_MSG_SIZE, decode_text=False
    )
    return ws if ws.can_prepare(request).ok else None


async def _attach(request: web.Request, call_id: str) -> web.StreamResponse:
    call = request.app[CALLS_KEY].calls.get(call_id)
    if call is None:
        return http_error(404, "call_not_found", f"Call '{call_id}' not found.")
    ws = _prepared_socket(request)
    if ws is None:
        return http_error(400, "BadRequest", "Expected a WebSocket upgrade request.")
    await ws.prepare(request)
    sockets = request.app[SOCKETS_KEY]
    sockets.add(ws)
    bound = log.bind(call_id=call_id, deployment=call.model)
    bound.info("simulator.sideband_attached", peer=request.remote)
    try:
        await call.attach(ws)
    finally:
        sockets.discard(ws)
        bound.info("simulator.sideband_detached", close_code=ws.close_code)
    return ws


async def _serve(
    request: web.Request,
    dialect: Dialect,
    model: str,
    options: SimulatorOptions,
    *,
    transcription: bool = False,
) -> web.StreamResponse:
    ws = _prepared_socket(request)
    if ws is None:
        return http_error(400, "BadRequest", "Expected a WebSocket upgrade request.")
    await ws.prepare(request)
    engine = Engine(
        dialect,
        model=model,
        options=options,
        ids=IdFactory(next_seed()),
        now=time.time(),
        transcription=transcription,
    )
    connection = Connection(
        ws, engine, speed=options.speed, max_session_seconds=options.max_session_seconds
    )
    sockets = request.app[SOCKETS_KEY]
    sockets.add(ws)
    # The service's session id, named as the relay's logs name it (its own is `session_id`);
    # the caller's x-ms-client-request-id (the relay sends its session id) ties the two.
    bound = log.bind(
        dialect=dialect.name,
        deployment=model,
        upstream_session_id=engine.session["id"],
        client_request_id=request.headers.get("x-ms-client-request-id"),
    )
    bound.info("simulator.connected", peer=request.remote)
    try:
        await connection.run()
    finally:
        sockets.discard(ws)
        bound.info("simulator.disconnected", close_code=ws.close_code, **connection.stats())
    return ws


async def _close_sockets(app: web.Application) -> None:
    sockets = app[SOCKETS_KEY]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"Server shutdown")


class RunningSimulator:
    """A simulator listening on a TCP port; ``url`` is what an Azure ``endpoint`` would be."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port

    @property
    def app(self) -> web.Application:
        """The simulator's application (its calls, its secrets), for tests."""
        return self._runner.app

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop_listening(self) -> None:
        """Refuse new connections; open ones carry on (a backend going away)."""
        await _stop_accepting(self._runner)
        for site in list(self._runner.sites):
            await site.stop()

    async def close(self) -> None:
        """Close every simulator socket (1001) and stop listening."""
        await _stop_accepting(self._runner)
        await self._runner.cleanup()

    async def __aenter__(self) -> RunningSimulator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def _stop_accepting(runner: web.AppRunner) -> None:
    """Stop taking connections, then let those accepted a moment before join the server.

    asyncio's selector loop (Python 3.11) makes an accepted connection's transport one loop
    pass after the accept; a `Server.close()` in between fails it, and its socket is left
    open until collected (python/cpython#109564: a `ResourceWarning` in whatever runs then).
    So reading the listening sockets stops first, then three passes: the transports are
    made, aiohttp's handlers get them, and each handler waits for its request, where the
    runner's shutdown closes it (a handler that has not started yet would be waited for,
    for the whole shutdown timeout). uvloop makes the transport in the accept: nothing to
    wait for."""
    loop = asyncio.get_running_loop()
    if not isinstance(loop, asyncio.SelectorEventLoop):
        return
    for site in runner.sites:
        server: Any = getattr(site, "_server", None)  # aiohttp's TCPSite: its asyncio.Server
        for sock in server.sockets if server is not None else ():
            loop.remove_reader(sock.fileno())
    for _ in range(3):
        await asyncio.sleep(0)  # loop passes, not a wait for anything (see above)


SIMULATOR_BACKLOG = 4096


async def start_simulator(
    options: SimulatorOptions, host: str = "127.0.0.1", port: int = 0
) -> RunningSimulator:
    """Serve the simulator on ``host:port`` (port 0 picks a free one)."""
    # No access log: request lines can carry ``?api-key=``, and credentials are never logged.
    runner = web.AppRunner(create_simulator_app(options), access_log=None)
    await runner.setup()
    try:
        # Azure takes a reconnect storm's handshakes: aiohttp's backlog of 128 dropped the
        # relay's dials past it (each retried after 1 s, then 3 s, then timed out).
        site = web.TCPSite(runner, host, port, backlog=SIMULATOR_BACKLOG)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return RunningSimulator(runner, host, runner.addresses[0][1])
