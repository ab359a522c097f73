"""Configuration of the simulated Azure realtime upstream."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SimulatorOptions:
    """What the simulator accepts and how it paces its replies.

    Attributes:
        api_keys: accepted ``api-key`` header values; also accepted as
            ``Authorization: Bearer <key>``, as Azure's v1 endpoint does.
        bearer_tokens: accepted Microsoft Entra bearer tokens.
        speed: audio pacing; 1.0 is real time, 2.0 twice as fast, 0 as fast as possible.
        chunk_ms: mean milliseconds of audio per ``response.output_audio.delta`` (their
            sizes vary around it, as the service's do).
        reply_text: fixed assistant reply; ``None`` builds a deterministic reply from the input.
        max_session_seconds: a session's lifetime (``session.expires_at``); at its end the
            session gets an ``error`` event ``session_expired`` and close 1001, as Azure's
            (60 minutes in Azure's current docs).
        tool_trigger: a phrase that, in the user's message (text or transcript), makes the
            model call the first function tool; naming a tool calls that tool regardless.
    """

    api_keys: frozenset[str] = frozenset()
    bearer_tokens: frozenset[str] = frozenset()
    speed: float = 1.0
    chunk_ms: int = 100
    reply_text: str | None = None
    max_session_seconds: float = 3600.0
    tool_trigger: str | None = None

    def __post_init__(self) -> None:
        if self.speed < 0:
            raise ValueError("speed must be >= 0")
        if self.chunk_ms <= 0:
            raise ValueError("chunk_ms must be > 0")
        if self.max_session_seconds <= 0:
            raise ValueError("max_session_seconds must be > 0")

    def __repr__(self) -> str:
        # Credentials never reach logs or tracebacks, only their count.
        return (
            f"SimulatorOptions(api_keys=<{len(self.api_keys)} redacted>, "
            f"bearer_tokens=<{len(self.bearer_tokens)} redacted>, speed={self.speed!r}, "
            f"chunk_ms={self.chunk_ms!r}, reply_text={self.reply_text!r}, "
            f"max_session_seconds={self.max_session_seconds!r}, "
            f"tool_trigger={self.tool_trigger!r})"
        )
