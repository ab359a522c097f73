"""Team budgets: the UTC day and month windows, and what is decided on them. Pure.

A team's spend is the estimated cost of its sessions (`relay.ops.usage.cost_usd`), summed
per UTC day and UTC month by a spend book (`relay.edge.spend_book`: this process, or Redis
shared by every replica). Over either budget, new sessions are refused with 429
`budget_exceeded` and a Retry-After that runs to the window's reset; live sessions are ended
after their response in progress, or left to finish, as the team's limits say.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

from relay.errors import ClientRefused
from relay.ops.config import TeamLimits

Window = Literal["day", "month"]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Windows:
    """The windows an instant falls in: their keys and when each resets."""

    day: str
    month: str
    day_ends: datetime
    month_ends: datetime


def windows(now: datetime) -> Windows:
    day_start = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    month_start = day_start.replace(day=1)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    return Windows(
        day=day_start.strftime("%Y-%m-%d"),
        month=month_start.strftime("%Y-%m"),
        day_ends=day_start + timedelta(days=1),
        month_ends=next_month,
    )


@dataclass(frozen=True, slots=True)
class Spend:
    """USD spent in the current day and month windows."""

    day: float = 0.0
    month: float = 0.0


@dataclass(frozen=True, slots=True)
class Exceeded:
    window: Window
    limit: float
    spent: float
    resets_at: datetime
    retry_after_seconds: int


def exceeded(limits: TeamLimits, spend: Spend, now: datetime) -> Exceeded | None:
    """The budget ``spend`` has reached, if any. The month first: while it is spent, the
    day's reset would not let the team back in."""
    current = windows(now)
    checks: tuple[tuple[Window, float | None, float, datetime], ...] = (
        ("month", limits.max_usd_per_month, spend.month, current.month_ends),
        ("day", limits.max_usd_per_day, spend.day, current.day_ends),
    )
    for window, limit, spent, resets_at in checks:
        if limit is not None and spent >= limit:
            seconds = max(1, math.ceil((resets_at - now).total_seconds()))
            return Exceeded(window, limit, spent, resets_at, seconds)
    return None


_ADJECTIVE = {"day": "daily", "month": "monthly"}


def explain(over: Exceeded, *, live: bool = False) -> str:
    """Why, for a refused request or (``live``) an ended session, and until when."""
    then = over.resets_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    closed = "; the session is closed" if live else ""
    return (
        f"The team has spent its {_ADJECTIVE[over.window]} budget of ${over.limit:g} "
        f"(estimated ${over.spent:.2f}){closed}. New sessions are accepted from {then}."
    )


def refusal(over: Exceeded) -> ClientRefused:
    return ClientRefused(
        429, "budget_exceeded", explain(over), retry_after=str(over.retry_after_seconds)
    )


class SpendBook(Protocol):
    """Where spend is summed: this process, or Redis shared by every replica."""

    # Set whenever a team's spend grows (here or, read back, on another replica).
    changed: asyncio.Event

    def add(self, team: str, usd: float) -> None:
        """Count ``usd`` spent by ``team`` now (never blocks: shared books push later)."""
        ...

    def spent(self, team: str) -> Spend:
        """``team``'s spend in the current windows, as this process knows it."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class Budgets:
    """Budget decisions for every team, on a spend book."""

    limits: Mapping[str, TeamLimits]
    book: SpendBook
    clock: Callable[[], datetime] = utc_now

    def check(self, team: str) -> None:
        """Raise ClientRefused (429 budget_exceeded, Retry-After) while ``team`` is over."""
        over = self.over(team)
        if over is not None:
            raise refusal(over)

    def over(self, team: str) -> Exceeded | None:
        own = self.limits.get(team)
        if own is None or not own.has_budget:
            return None
        return exceeded(own, self.book.spent(team), self.clock())

    def ends_live_sessions(self, team: str) -> bool:
        own = self.limits.get(team)
        return own is not None and own.live_sessions_over_budget == "end"

    def describe(self) -> dict[str, dict[str, object]]:
        """Each team's spend and budgets, for /status."""
        described: dict[str, dict[str, object]] = {}
        for team, own in self.limits.items():
            spend = self.book.spent(team)
            described[team] = {
                "spent_usd": {"day": round(spend.day, 6), "month": round(spend.month, 6)},
                "budget_usd": {"day": own.max_usd_per_day, "month": own.max_usd_per_month},
                "over_budget": self.over(team) is not None,
            }
        return described
