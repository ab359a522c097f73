"""Budget windows and decisions, and the in-process spend book, with an injected clock."""

from datetime import UTC, datetime

import pytest

from relay.edge.budget import Budgets, Spend, exceeded, windows
from relay.edge.spend_book import MemorySpend
from relay.errors import ClientRefused
from relay.ops.config import TeamLimits


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


class Clock:
    def __init__(self, now: str):
        self.now = at(now)

    def __call__(self) -> datetime:
        return self.now


def test_windows_are_utc_days_and_months():
    w = windows(at("2026-12-31T23:59:30"))
    assert (w.day, w.month) == ("2026-12-31", "2026-12")
    assert w.day_ends == at("2027-01-01T00:00:00") == w.month_ends
    w = windows(datetime.fromisoformat("2026-02-28T23:30:00-05:00"))  # 04:30 UTC on 1 March
    assert (w.day, w.month) == ("2026-03-01", "2026-03")
    assert w.month_ends == at("2026-04-01T00:00:00")


def test_decisions_and_retry_after():
    limits = TeamLimits(max_usd_per_day=10, max_usd_per_month=100)
    now = at("2026-11-30T22:00:00")
    assert exceeded(limits, Spend(9.99, 50), now) is None
    over = exceeded(limits, Spend(10, 50), now)
    assert over is not None and over.window == "day" and over.retry_after_seconds == 7200
    # Both spent: only the month's reset lets the team back in.
    over = exceeded(limits, Spend(10, 100), at("2026-11-15T00:00:00"))
    assert over is not None and over.window == "month"
    assert over.retry_after_seconds == 16 * 86400
    assert exceeded(TeamLimits(), Spend(1e9, 1e9), now) is None


def test_budgets_refuse_with_429_until_the_window_resets():
    clock = Clock("2026-11-30T12:00:00")
    book = MemorySpend(clock=clock)
    budgets = Budgets({"a": TeamLimits(max_usd_per_day=1.0), "b": TeamLimits()}, book, clock=clock)
    book.add("a", 0.6)
    budgets.check("a")
    book.add("a", 0.4)
    with pytest.raises(ClientRefused) as info:
        budgets.check("a")
    refusal = info.value
    assert (refusal.status, refusal.code, refusal.retry_after) == (429, "budget_exceeded", "43200")
    assert "daily budget of $1" in refusal.message and "2026-12-01T00:00:00Z" in refusal.message
    book.add("b", 500)
    budgets.check("b")  # no budget: never refused
    assert budgets.describe()["a"] == {
        "spent_usd": {"day": 1.0, "month": 1.0},
        "budget_usd": {"day": 1.0, "month": None},
        "over_budget": True,
    }
    clock.now = at("2026-12-01T00:00:00")  # a new day, and a new month
    budgets.check("a")
    assert book.spent("a") == Spend(0.0, 0.0)


def test_the_book_says_when_spend_grows():
    book = MemorySpend(clock=Clock("2026-11-30T12:00:00"))
    book.add("a", 0)
    assert not book.changed.is_set()
    book.add("a", 0.01)
    assert book.changed.is_set()


def test_live_sessions_setting():
    budgets = Budgets(
        {
            "end": TeamLimits(max_usd_per_day=1),
            "finish": TeamLimits(max_usd_per_day=1, live_sessions_over_budget="finish"),
        },
        MemorySpend(),
    )
    assert budgets.ends_live_sessions("end") and not budgets.ends_live_sessions("finish")
