"""Client authentication: find the relay key in a request, and the team it belongs to.

Pure functions over headers, query and offered subprotocols; no I/O. Keys are compared by
their SHA-256 hash in constant time, so neither the stored hashes nor the timing say
anything about a key. Relay keys are random tokens, not passwords: a fast hash is right.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from relay.ops.config import TeamConfig

# Browsers cannot set headers on a WebSocket, so OpenAI's browser clients send the key as a
# subprotocol; the server must then select `realtime` or the browser aborts the handshake.
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
REALTIME_SUBPROTOCOL = "realtime"
# Subprotocols that carry a credential: selecting one would echo it in the response.
_CREDENTIAL_SUBPROTOCOLS = (KEY_SUBPROTOCOL_PREFIX, "openai-organization.", "openai-project.")
Owner = TypeVar("Owner")


def hash_key(key: str) -> str:
    """The form a relay key is stored in: ``sha256:<hex>``. A presented key's bytes that
    are not UTF-8 (aiohttp keeps them as surrogate escapes) are hashed as they came: no
    key matches them, so they are a wrong key, counted by the brake (not a 500)."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key() -> str:
    """A fresh relay key: 256 random bits, URL-safe, recognisable by its prefix."""
    return "rk-" + secrets.token_urlsafe(32)


def find_key(
    headers: Mapping[str, str], query: Mapping[str, str], subprotocols: Iterable[str]
) -> str | None:
    """The relay key the client presented, from the first place that has one."""
    if key := headers.get("api-key", "").strip():
        return key
    scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for protocol in subprotocols:
        if protocol.startswith(KEY_SUBPROTOCOL_PREFIX) and len(protocol) > len(
            KEY_SUBPROTOCOL_PREFIX
        ):
            return protocol[len(KEY_SUBPROTOCOL_PREFIX) :]
    if key := query.get("api-key", "").strip():
        return key
    # Azure's browser rtclient sends `?Authorization=Bearer <token>`.
    scheme, _, token = query.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


@dataclass(frozen=True, slots=True)
class KeyRing(Generic[Owner]):
    """Key hashes and whom they belong to, checked all at once in constant time."""

    entries: tuple[tuple[bytes, Owner], ...]

    @classmethod
    def from_teams(cls, teams: Iterable[TeamConfig]) -> KeyRing[TeamConfig]:
        return KeyRing(tuple((h.encode("ascii"), team) for team in teams for h in team.keys))

    @classmethod
    def of(cls, hashes: Iterable[str], owner: Owner) -> KeyRing[Owner]:
        return KeyRing(tuple((h.encode("ascii"), owner) for h in hashes))

    def identify(self, key: str) -> Owner | None:
        return self.identify_hash(hash_key(key).encode("ascii"))

    def identify_hash(self, presented: bytes) -> Owner | None:
        found: Owner | None = None
        # No early exit: every stored hash is compared whatever matches.
        for stored, owner in self.entries:
            if hmac.compare_digest(presented, stored):
                found = owner
        return found


def offered_subprotocols(header: str) -> list[str]:
    return [p.strip() for p in header.split(",") if p.strip()]


def offers_only_credentials(offered: Iterable[str]) -> bool:
    """Whether a client offered subprotocols, every one of them a credential: the relay can
    select none of them, and a browser (or Node's `ws`) that offered some and saw none
    selected aborts the handshake."""
    offered = list(offered)
    return bool(offered) and all(p.startswith(_CREDENTIAL_SUBPROTOCOLS) for p in offered)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> str:
    """The client's address: the peer, or, when the peer is a trusted proxy, the nearest
    address in X-Forwarded-For (every line of it, in order: a proxy may add its own line
    after the client's) that is not a trusted proxy (the rightmost untrusted hop). A hop
    that is not an address ends the search at the peer: nothing left of it can be believed,
    and a client must not pick the brake's key (or its size)."""
    if not peer or not trusted or not _trusted(_hop_address(peer), trusted):
        return peer or "unknown"
    hops = [hop.strip() for line in forwarded_for for hop in line.split(",") if hop.strip()]
    for hop in reversed(hops):
        address = _hop_address(hop)
        if address is None:
            return peer
        if not _trusted(address, trusted):
            return str(address)
    return peer


def _hop_address(hop: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A hop's IP address: bare, or with the port some gateways add (`203.0.113.5:41234`,
    `[2001:db8::1]:443`, as Azure Application Gateway writes them); None if it is none."""
    if hop.startswith("["):
        host, bracket, _ = hop[1:].partition("]")
        hop = host if bracket else hop
    elif hop.count(":") == 1:
        hop = hop.partition(":")[0]
    try:
        return ipaddress.ip_address(hop)
    except ValueError:
        return None


def _trusted(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None, trusted: Sequence[Network]
) -> bool:
    return address is not None and any(address in network for network in trusted)
