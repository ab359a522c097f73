"""Secrets out of text: the one filter every log line passes (see `logsetup`). Pure.

Two nets. Patterns catch a credential by where it sits, including keys the relay has never
seen (a wrong guess): values of credential-like URL query parameters, of `api-key` /
`Authorization`-like headers and JSON/dict fields, bearer tokens, the key subprotocol, JWTs
(Entra tokens) and minted client secrets (`ek_…`). Known values catch a secret wherever it
ends up: the relay's upstream keys, Entra client secrets, tokens and minted client secrets
are registered when they are read or received, and the key a request presented is
registered for that request's task only (`in_this_request`).
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
# Secrets learnt while running (tokens, minted client secrets): the most recent ones are
# matched exactly; the patterns cover their shapes anyway.
MAX_RECENT = 64

# Every pattern below needs one of these words: text without any skips the patterns.
_WORDS = ("key", "token", "secret", "sig", "passw", "auth", "credential", "cookie", "bearer")
_TRIGGERS = (*_WORDS, "eyj", "ek_")
_NAME = r"[\w.-]*?(?i:key|token|secret|sig|passw|auth|credential|cookie)[\w.-]*"
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
        if any(secret in text for secret in self._known()):
            return True
        lowered = text.lower()
        return any(word in lowered for word in _TRIGGERS)

    def clean(self, text: str) -> str:
        for secret in _request_secrets.get():
            if secret in text:
                text = text.replace(secret, REDACTED)
        if len(text) < MIN_SECRET_LENGTH:
            return text
        for secret in self._known():
            if secret in text:
                text = text.replace(secret, REDACTED)
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
        return any(secret in data for secret in self._known_bytes())

    def clean_known(self, value: Any) -> Any:
        """``value`` with the relay's own secrets replaced, strings in containers (keys
        included) too; nothing else changed (no patterns: the text is the service's, not a
        log line)."""
        if isinstance(value, str):
            for secret in self._known():
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {self.clean_known(k): self.clean_known(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.clean_known(v) for v in value]
        return value

    def _known_bytes(self) -> tuple[bytes, ...]:
        known = self._known()
        if self._encoded[0] is not known:
            self._encoded = (known, tuple(s.encode() for s in known))
        return self._encoded[1]

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
            self._stale = False
        return self._all


SECRETS = SecretFilter()
"""The process's filter: `logsetup` runs every log line through it."""
