"""A fake Entra token endpoint and a hand-driven clock, for tests of Entra credentials.

The endpoint speaks the App Service managed-identity protocol (api-version 2019-08-01),
which azure-identity's ManagedIdentityCredential uses over plain HTTP when IDENTITY_ENDPOINT
and IDENTITY_HEADER are set: so tests run azure-identity's real code against 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

IDENTITY_HEADER = "fake-identity-header-value"
PATH = "/msi/token"


class FakeTime:
    """A clock and a sleep moved by hand: the code under test asks to sleep, the test sees
    for how long (``next_sleep``) and lets that time pass (``wake``)."""

    def __init__(self, now: float) -> None:
        self.now = now
        self._asked: asyncio.Queue[tuple[float, asyncio.Future[None]]] = asyncio.Queue()
        self._pending: tuple[float, asyncio.Future[None]] | None = None

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._asked.put_nowait((delay, future))
        await future

    async def next_sleep(self) -> float:
        """Wait until the code asks to sleep; return for how long (it stays asleep)."""
        self._pending = await self._asked.get()
        return self._pending[0]

    def wake(self) -> None:
        """Let the pending sleep's time pass and wake the sleeper."""
        assert self._pending is not None, "nobody is asleep"
        delay, future = self._pending
        self._pending = None
        self.now += delay
        if not future.done():
            future.set_result(None)

    async def pass_sleep(self) -> float:
        """``next_sleep`` then ``wake``; returns the delay that passed."""
        delay = await self.next_sleep()
        self.wake()
        return delay


class FakeIdentityEndpoint:
    """Issues distinct tokens; counts requests; can fail (HTTP 500) or hang until released.

    Tokens carry ``refresh_in`` (0 by default) so azure-identity's own cache never answers
    in the endpoint's place: every get_token reaches here, as in production once a token is
    past its ``refresh_on``. ``refresh_in=None`` leaves it out, as App Service does.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        lifetime: float = 3600.0,
        refresh_in: int | None = 0,
    ) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.refresh_in = refresh_in
        self.failing = False
        self.failure_message = "identity endpoint failing"
        self.requests: list[dict[str, str]] = []
        self.bad_headers = 0
        self.issued: list[str] = []
        self._gate: asyncio.Event | None = None
        self._waiters: dict[int, asyncio.Event] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(PATH, self._handle)
        return app

    def hang(self) -> None:
        """Hold every request from now on until ``release``."""
        self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    async def requests_reached(self, count: int) -> None:
        """Return once the endpoint has received ``count`` requests."""
        if len(self.requests) < count:
            await self._waiters.setdefault(count, asyncio.Event()).wait()

    async def _handle(self, request: web.Request) -> web.Response:
        if request.headers.get("X-IDENTITY-HEADER") != IDENTITY_HEADER:
            self.bad_headers += 1
            return _json({"error": "missing or wrong X-IDENTITY-HEADER"}, status=401)
        self.requests.append(dict(request.query))
        if waiter := self._waiters.pop(len(self.requests), None):
            waiter.set()
        if self._gate is not None:
            await self._gate.wait()
        if self.failing:
            return _json({"statusCode": 500, "message": self.failure_message}, status=500)
        return _json(self._token(request.query["resource"]))

    def _token(self, resource: str) -> dict[str, Any]:
        token = f"fake-entra-token-{len(self.issued) + 1}-{secrets.token_hex(8)}"
        self.issued.append(token)
        body: dict[str, Any] = {
            "access_token": token,
            "expires_on": str(math.ceil(self.clock() + self.lifetime)),
            "resource": resource,
            "token_type": "Bearer",
        }
        if self.refresh_in is not None:
            body["refresh_in"] = self.refresh_in
        return body


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


class FakeClientCredentialsEndpoint:
    """Microsoft Entra ID's token endpoint for the client-credentials grant
    (`POST /{tenant}/oauth2/v2.0/token`), which azure-identity's ClientSecretCredential
    calls over HTTPS: it issues tokens for the client secrets in ``accepted`` and answers
    others as Entra does (401 `invalid_client`, AADSTS7000215). ``used`` lists the secret
    each request presented."""

    def __init__(self, *accepted: str, lifetime: int = 3599) -> None:
        self.accepted = set(accepted)
        self.lifetime = lifetime
        self.used: list[str] = []
        self.issued: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        form = await request.post()
        secret = str(form.get("client_secret", ""))
        self.used.append(secret)
        if form.get("grant_type") != "client_credentials" or secret not in self.accepted:
            return _json(
                {
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided.",
                },
                status=401,
            )
        token = f"fake-entra-token-{len(self.issued) + 1}-{secrets.token_hex(8)}"
        self.issued.append(token)
        # refresh_in 0: azure-identity's cache never answers in the endpoint's place.
        return _json(
            {
                "token_type": "Bearer",
                "expires_in": self.lifetime,
                "refresh_in": 0,
                "access_token": token,
            }
        )
