"""The failed-authentication brake in Redis: one count per address for every relay process
and host, so workers and replicas do not each grant an address its own guesses.

Failures are counted in a window that opens at an address's first failure; at the limit
the address is blocked for `auth_block_seconds` (a key that expires by itself). When Redis
cannot be reached, the process's own brake (`AuthThrottle`) stands in: the brake is never
simply off.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from relay.edge.admission import AuthThrottle, auth_blocked
from relay.ops.config import AdmissionConfig, LimitsConfig

_log = structlog.get_logger("relay.edge.admission")

# KEYS: the address's failure counter, its block flag. ARGV: window ms, failures allowed,
# block ms. Returns the failures counted in the window (0 once it blocked), or minus the
# block's milliseconds left when it was blocked already (not counted).
_FAILED = """
local blocked = redis.call('PTTL', KEYS[2])
if blocked > 0 then return -blocked end
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if n >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  redis.call('DEL', KEYS[1])
  return 0
end
return n
"""


@dataclass(slots=True)
class RedisAuthThrottle:
    """An `AuthBrake` shared through Redis."""

    client: aioredis.Redis
    config: AdmissionConfig
    limits: LimitsConfig
    fallback: AuthThrottle

    def update(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self.fallback.update(limits)

    def _keys(self, address: str) -> tuple[str, str]:
        prefix = self.config.key_prefix
        return f"{prefix}:authfail:{address}", f"{prefix}:authblock:{address}"

    async def check(self, address: str) -> None:
        try:
            async with asyncio.timeout(self.config.redis_timeout_seconds):
                remaining_ms = int(await self.client.pttl(self._keys(address)[1]))
        except (RedisError, OSError, TimeoutError) as exc:
            self._unreachable("check", exc)
            await self.fallback.check(address)
            return
        if remaining_ms > 0:
            raise auth_blocked(math.ceil(remaining_ms / 1000))

    async def failed(self, address: str) -> None:
        limits = self.limits
        try:
            async with asyncio.timeout(self.config.redis_timeout_seconds):
                counted = await self.client.eval(
                    _FAILED,
                    2,
                    *self._keys(address),
                    int(limits.auth_failure_window_seconds * 1000),
                    limits.auth_failures_allowed,
                    int(limits.auth_block_seconds * 1000),
                )
        except (RedisError, OSError, TimeoutError) as exc:
            self._unreachable("failed", exc)
            await self.fallback.failed(address)
            return
        if int(counted) < 0:
            raise auth_blocked(math.ceil(-int(counted) / 1000))

    def _unreachable(self, op: str, exc: BaseException) -> None:
        _log.warning("auth_brake_redis_unreachable", op=op, error=type(exc).__name__)
