"""relay.session.setup.StartedSession: what set-up hands the bridge is not kept after."""

from __future__ import annotations

from relay.session.setup import StartedSession


def test_the_greeting_and_the_session_are_handed_over_once() -> None:
    session = {"type": "realtime", "instructions": "x"}
    started = StartedSession(b'{"type":"session.created"}', session, [b'{"type":"x"}'])
    assert started.take_greeting() == (b'{"type":"session.created"}', b'{"type":"x"}')
    assert started.take_session() is session
    # Nothing left to outlive a later session.updated (or to send twice).
    assert started.take_greeting() == ()
    assert started.take_session() == {}
