"""Small JSON records in Redis with a deadline per call, shared by the WebRTC books: a Redis
failure becomes one clear 503 and one log line, never a hang."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from relay.errors import ClientRefused

_log = structlog.get_logger("relay.edge.webrtc")


@dataclass(frozen=True, slots=True)
class RedisRecords:
    client: aioredis.Redis
    prefix: str
    timeout: float
    # What the records are, for the refusal ("client secrets"), and the store's name in
    # codes and logs ("secret_store").
    what: str
    name: str

    async def put(self, key: str, record: list[Any], ttl: int) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.set(f"{self.prefix}:{key}", orjson.dumps(record), ex=ttl)
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._unavailable("record", exc) from exc

    async def get(self, key: str) -> list[Any] | None:
        try:
            async with asyncio.timeout(self.timeout):
                record = await self.client.get(f"{self.prefix}:{key}")
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._unavailable("check", exc) from exc
        return None if record is None else list(orjson.loads(record))

    def _unavailable(self, op: str, exc: BaseException) -> ClientRefused:
        _log.error(f"{self.name}_unreachable", op=op, error=type(exc).__name__)
        return ClientRefused(
            503, f"{self.name}_unavailable", f"The relay cannot {op} {self.what} now."
        )
