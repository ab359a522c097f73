"""Secrets out of text: the one filter every log line passes (see `logsetup`). Pure.

Two nets. Patterns catch a credential by where it sits, including keys the relay has never
seen (a wrong guess): values of credential-like URL query parameters, of `api-key` /
`Authorization`-like headers and JSON/dict fields, bearer tokens, the key subprotocol, JWTs
(Entra tokens), minted client secrets (`ek_…`) and relay keys as `relay keys new` makes them
(`rk-…`). Known values catch a secret wherever it ends up, whole or cut short (from its first
`FRAGMENT` characters): the relay's upstream keys, Entra client secrets, tokens, managed
identity headers and minted client secrets are registered when they are read or received,
and the key a request presented is registered for that request's task only
(`in_this_request`).
"""

from __future__ import annotations

import re
from collections import deque
from contextvars import ContextVar
from typing import Any

REDACTED = "[REDACTED]"
# Shorter values are not registered: replacing them everywhere would garble logs, and a
# credential that short is not one the relay accepts or holds.
MIN_SECRET_LENGTH = 8
# A known secret this long is also caught cut short (a close reason cut at 123 bytes): from
# its first FRAGMENT characters to the end of the key-like run there.
FRAGMENT = 16
_KEYLIKE_RUN = r"[\w.~+/=%-]*"
# Secrets learnt while running (tokens, minted client secrets): the most recent ones are
# matched exactly; the patterns cover their shapes anyway.
MAX_RECENT = 64

# Every pattern below needs one of these words: text without any skips the patterns.
_WORDS = ("key", "token", "secret", "sig", "passw", "auth", "credential", "cookie", "bearer")
_TRIGGERS = (*_WORDS, "eyj", "ek_", "rk-")
# A name is bounded on both sides of its word: unbounded, a long run of a word with no `=`
# or quote after it (a client's 16 KB query) cost the patterns quadratic backtracking, 0.15
# to 0.5 s a line on the event loop.
_NAME = r"[\w.-]{0,64}?(?i:key|token|secret|sig|passw|auth|credential|cookie)[\w.-]{0,64}"
_HEADER = r"(?i:api-key|authorization|cookie|ocp-apim-subscription-key)"
_PATTERNS = (
    # ?api_key=... &sig=... in a URL or a request line
    re.compile(rf"([?&;]{_NAME}=)[^&\s'\"#<>]*"),
    # "client_secret": "...", 'access_token': '...' in JSON or a repr
    re.compile(rf"([\"']{_NAME}[\"']\s*:\s*[\"'])[^\"']*"),
    # api-key: ..., 'Authorization': 'Bearer ...' in raw HTTP or a headers repr
    re.compile(rf"({_HEADER}[\"']?\s*[:=]\s*[\"']?)[^\"'\r\n,}}\\]*"),
    re.compile(r"(\b(?i:bearer)\s+)[\w.~+/=-]+"),
    re.compile(r"(openai-insecure-api-key\.)[^\s,'\"]+"),
    re.compile(r"()\beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*"),  # a JWT (Entra tokens)
    re.compile(r"()\bek_[\w-]{8,}"),  # a realtime client secret
    re.compile(r"()\brk-[\w-]{20,}"),  # a relay key as `relay keys new` makes them
)


def _keep_prefix(match: re.Match[str]) -> str:
    return match.group(1) + REDACTED


_request_secrets: ContextVar[tuple[str, ...]] = ContextVar("request_secrets", default=())


class SecretFilter:
    """Removes credentials from strings; knows the relay's own secret values."""

    def __init__(self) -> None:
        self._static: set[str] = set()
        self._recent: deque[str] = deque(maxlen=MAX_RECENT)
        # Client secrets the relay minted, apart: any client can mint many, and they must
        # not push the relay's own tokens out of `_recent`.
        self._minted: deque[str] = deque(maxlen=MAX_RECENT)
        self._all: tuple[str, ...] = ()
        # What finds a known secret in text (itself, or its first FRAGMENT characters), and
        # the pattern that takes a fragment's whole run out.
        self._needles: tuple[str, ...] = ()
        self._runs: re.Pattern[str] | None = None
        self._encoded: tuple[tuple[str, ...], tuple[bytes, ...]] = ((), ())
        self._stale = False

    def register(self, *values: str | None) -> None:
        """Secrets held for the process's life (keys and client secrets from the env)."""
        for value in values:
            if value and len(value) >= MIN_SECRET_LENGTH and value not in self._static:
                self._static.add(value)
                self._stale = True

    def register_recent(self, value: str | None, *, minted: bool = False) -> None:
        """A secret learnt while running: an Entra token, or (``minted``) a client secret
        the relay minted."""
        held = self._minted if minted else self._recent
        if value and len(value) >= MIN_SECRET_LENGTH and value not in held:
            held.append(value)
            self._stale = True

    def in_this_request(self, value: str | None) -> None:
        """A secret the current request presented: matched in its task (and tasks it
        starts) only, so a guessed key is never remembered past its request."""
        if value and len(value) >= MIN_SECRET_LENGTH:
            _request_secrets.set((*_request_secrets.get(), value))

    def suspect(self, text: str) -> bool:
        """Whether ``text`` may hold a secret: `clean` would change it, or might. One pass
        over a whole log line's text is cheaper than `clean` on each of its values."""
        if any(secret in text for secret in _request_secrets.get()):
            return True
        if any(needle in text for needle in self._needles_now()):
            return True
        lowered = text.lower()
        return any(word in lowered for word in _TRIGGERS)

    def clean(self, text: str) -> str:
        for secret in _request_secrets.get():
            if secret in text:
                text = text.replace(secret, REDACTED)
        if len(text) < MIN_SECRET_LENGTH:
            return text
        text = self._without_known(text)
        lowered = text.lower()
        for word in _TRIGGERS:
            if word in lowered:
                break
        else:
            return text
        for pattern in _PATTERNS:
            text = pattern.sub(_keep_prefix, text)
        return text

    def known_in(self, data: bytes) -> bool:
        """Whether ``data`` holds one of the relay's own secrets as it is (an upstream that
        quotes the credential it was sent)."""
        return any(needle in data for needle in self._needle_bytes())

    def clean_known(self, value: Any) -> Any:
        """``value`` with the relay's own secrets replaced, strings in containers (keys
        included) too; nothing else changed (no patterns: the text is the service's, not a
        log line)."""
        if isinstance(value, str):
            return self._without_known(value)
        if isinstance(value, dict):
            return {self.clean_known(k): self.clean_known(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.clean_known(v) for v in value]
        return value

    def _without_known(self, text: str) -> str:
        """``text`` with the relay's own secrets replaced: whole, then cut short or run on."""
        needles = self._needles_now()
        if not any(needle in text for needle in needles):
            return text
        for secret in self._all:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if self._runs is not None:
            text = self._runs.sub(REDACTED, text)
        return text

    def _needle_bytes(self) -> tuple[bytes, ...]:
        needles = self._needles_now()
        if self._encoded[0] is not needles:
            self._encoded = (needles, tuple(s.encode() for s in needles))
        return self._encoded[1]

    def _needles_now(self) -> tuple[str, ...]:
        self._known()
        return self._needles

    def clean_value(self, value: Any) -> Any:
        """``value`` as safe to render: strings cleaned, containers walked, anything else
        a JSON renderer would not take turned into a cleaned string (its repr would be
        rendered otherwise, and a repr can carry headers)."""
        if isinstance(value, str):
            return self.clean(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, dict):
            return {k: self.clean_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.clean_value(v) for v in value]
        return self.clean(str(value))

    def _known(self) -> tuple[str, ...]:
        if self._stale:
            # Longest first: a secret that contains another is replaced whole.
            every = {*self._static, *self._recent, *self._minted}
            self._all = tuple(sorted(every, key=len, reverse=True))
            fragments = {secret[:FRAGMENT] for secret in every if len(secret) > FRAGMENT}
            self._needles = tuple(
                {secret for secret in every if len(secret) <= FRAGMENT} | fragments
            )
            self._runs = (
                re.compile("|".join(re.escape(f) + _KEYLIKE_RUN for f in sorted(fragments)))
                if fragments
                else None
            )
            self._stale = False
        return self._all


SECRETS = SecretFilter()
"""The process's filter: `logsetup` runs every log line through it."""
