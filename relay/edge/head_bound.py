"""Where a connection's request heads begin and end in the bytes it sent: the part of a
head still arriving, which the request-head bound (`connection.RelayConnection`) counts and
times.

aiohttp's parser says which requests it made from a read, not where in the bytes they
were, so the bytes are walked here: a head ends at its first blank line (RFC 9112 2.1;
aiohttp's request parser takes CRLF only); what follows is its body, of its Content-Length
(from the parsed request) or chunked (walked chunk by chunk to its last chunk and trailers,
RFC 9112 7.1: a body's own blank lines or `0` lines are data, not an end); then the next
head. Empty lines before a request line are skipped to find its end, as the parser skips
them, but count as a head still arriving (a connection that sends only empty lines meets
the deadline and the bound), all but one CRLF right after a request: a client's extra one
after a body (RFC 9112 2.2).

aiohttp switches protocols for a WebSocket upgrade only (and CONNECT), once the request's
body (if any) has come: what follows is kept until the upgrade is taken or declined;
declined, the parser reads it as HTTP, and so does the walk. Another upgrade (curl's h2c
offer) is served as a request, and the rest of the read its body ends in is dropped, as
the parser drops it.

The parser stops making requests while 32 wait to be handled and holds the rest of the
read (its reading paused meanwhile). A whole head past the last request it made is such
a held request, not a head still arriving: its bytes are kept here until the parser makes
it (up to `MAX_HELD`), and nothing is counted meanwhile.
"""

from __future__ import annotations

import re
from collections.abc import Container, Sequence

# A request's body length when nothing after its head is HTTP: a request the parser refused
# (it is answered and the connection closed).
UPGRADE = -1
_HEAD_END = b"\r\n\r\n"
# The most bytes kept while the parser holds requests back. It reads on once fewer than 32
# wait, so what it holds grows with what a client pipelines (1,000 requests of 1 KB after
# a declined upgrade: 1 MiB); past this much in flight, the connection is refused (400).
MAX_HELD = 2 << 20
_HEX = b"0123456789abcdefABCDEF"
# What follows a request's body (`HeadBound._walking`).
_PLAIN, _SWITCHES, _DROPS_REST = 0, 1, 2


class Unframed(ValueError):
    """A chunked body whose framing the walk cannot follow (the parser refuses it too), or
    a chunk line past the bound; or more requests held back than `MAX_HELD`."""


class ChunkWalk:
    """A chunked body (RFC 9112 7.1), walked across reads to where it ends."""

    __slots__ = ("_left", "_line", "_trailers", "_max_line")

    def __init__(self, max_line: int) -> None:
        self._left = 0  # chunk data and its CRLF still to come
        self._line = bytearray()  # a size or trailer line begun in an earlier read
        self._trailers = False  # past the last chunk (size 0)
        self._max_line = max_line

    def walk(self, buf: bytes, at: int) -> int | None:
        """Where in ``buf`` the body ends (past its trailers' blank line), reading from
        ``at``; None when all of it is the body's and more is to come."""
        size = len(buf)
        while at < size:
            if self._left:
                step = min(self._left, size - at)
                self._left -= step
                at += step
                continue
            if self._line.endswith(b"\r") and buf[at] == 0x0A:  # a CRLF split over two reads
                line = bytes(self._line[:-1])
                self._line.clear()
                at += 1
            else:
                end = buf.find(b"\r\n", at)
                if end < 0:
                    self._line += buf[at:]  # a bytearray: a line trickled in costs no copies
                    if len(self._line) > self._max_line:
                        raise Unframed("a chunk size or trailer line is too long")
                    return None
                line = bytes(self._line) + buf[at:end] if self._line else buf[at:end]
                self._line.clear()
                at = end + 2
            if len(line) > self._max_line:
                raise Unframed("a chunk size or trailer line is too long")
            if self._trailers:
                if not line:
                    return at  # the blank line after the trailers
                continue
            digits = line.split(b";", 1)[0]
            if not digits or digits.strip(_HEX):
                raise Unframed("a chunk size is not hexadecimal")
            length = int(digits, 16)
            if length:
                self._left = length + 2  # its data, then CRLF
            else:
                self._trailers = True
        return None


class HeadBound:
    """A connection's bytes walked request by request (see the module's docstring).
    `pending` is the part of a head still arriving."""

    __slots__ = (
        "received", "pos", "body_end", "pending", "upgrading", "_chunks", "_walking",
        "_just_ended", "_kept", "_max_line",
    )  # fmt: skip

    def __init__(self, max_line: int) -> None:
        self.received = 0  # bytes read from the connection
        self.pos = 0  # where the walk stands: a head's start, or inside a body
        self.body_end = 0  # the end of the last Content-Length body
        self.pending = 0
        # Walked to an upgrade's head: until it is taken (frames follow) or declined (the
        # parser reads on as HTTP), what follows is kept, not walked (`hold`).
        self.upgrading = False
        self._chunks: ChunkWalk | None = None
        # The request whose body is being walked, and what comes after it: `_PLAIN`, or
        # `_SWITCHES` (an upgrade aiohttp takes once the body has come, which it reads first:
        # what follows is kept, `upgrading`), or `_DROPS_REST` (an upgrade it does not take:
        # it drops what the read the body ends in holds after it). None between requests.
        self._walking: int | None = None
        # `pos` is where a request ended: one empty line there is a client's extra CRLF
        # after a body (RFC 9112 2.2), not a head begun. Others count, and a connection
        # that sends only empty lines meets the header deadline and the bound.
        self._just_ended = False
        # The bytes from offset `received - len(_kept)` on: the last three read (a head's
        # end may straddle two reads), or, while the parser holds requests back, every
        # byte from `pos` on.
        self._kept = b""
        self._max_line = max_line

    def read(
        self,
        data: bytes,
        lengths: Sequence[int | None],
        upgrades: Container[int] = (),
        ignored_upgrades: Container[int] = (),
    ) -> bool:
        """``data`` was read (b"": the parser made requests from what it held), and the
        parser made requests with these body lengths (None: chunked; `UPGRADE`: none, and
        nothing after it is HTTP), in order; those at ``upgrades`` (indexes) switch
        protocols once their body has come, those at ``ignored_upgrades`` asked for an
        upgrade the parser does not take. False once a request switched: what follows is
        kept (`hold`) until the upgrade is taken or declined. Raises Unframed."""
        seen = self._kept + data if data else self._kept
        base = self.received - len(self._kept)
        self.received += len(data)
        pos, index = self.pos, 0
        self.upgrading = False
        while True:
            if self._chunks is not None:
                end = self._chunks.walk(seen, max(pos - base, 0))
                if end is None:
                    pos = self.received
                    break
                self._chunks = None
                pos = base + end
            elif pos < self.body_end:
                pos = min(self.body_end, self.received)
                if pos < self.body_end:
                    break
            if self._walking is not None:  # its body is done: the request ended at `pos`
                after, self._walking, self._just_ended = self._walking, None, True
                if after == _SWITCHES:
                    return self._upgrade(seen, base, pos)
                if after == _DROPS_REST:
                    pos = self.received
                    break
            if index == len(lengths):
                break
            length = lengths[index]
            after = (
                _SWITCHES
                if index in upgrades
                else _DROPS_REST
                if index in ignored_upgrades
                else _PLAIN
            )
            index += 1
            end = seen.find(_HEAD_END, _past_empty_lines(seen, pos - base))
            if end < 0:  # not where it should be: what came is taken as its (a gap)
                self.pos, self.pending, self._kept = self.received, 0, seen[-3:]
                self._just_ended = False
                return length != UPGRADE
            pos = base + end + 4
            if length == UPGRADE:
                return self._upgrade(seen, base, pos)
            self._walking = after
            if length is None:
                self._chunks = ChunkWalk(self._max_line)
            else:
                self.body_end = pos + length
        if self._chunks is not None or pos < self.body_end:
            self.pos, self.pending, self._kept = pos, 0, b""  # in a body
            return True
        start = pos - base
        if self._just_ended and start >= 0 and len(seen) - start >= 2:
            self._just_ended = False
            if seen.startswith(b"\r\n", start):
                pos, start = pos + 2, start + 2  # a client's extra CRLF after a body
        self.pos = pos
        at = _past_empty_lines(seen, start)
        if seen.find(_HEAD_END, at) >= 0:
            # A whole head the parser holds back: kept until it makes its request.
            self.pending, self._kept = 0, seen[at:]
            if len(self._kept) > MAX_HELD:
                # Requests in flight past any client's pipelining, or a walk that lost its
                # way: nothing here would bound them.
                raise Unframed("more requests in flight than a connection may pipeline")
            return True
        self.pending = self.received - pos
        self._kept = seen[-3:]
        return True

    def _upgrade(self, seen: bytes, base: int, pos: int) -> bool:
        self.pos, self.pending, self._kept = pos, 0, seen[pos - base :]
        self.upgrading, self._walking, self._just_ended = True, None, False
        return False

    def hold(self, data: bytes) -> None:
        """``data`` came while an upgrade is decided: the parser keeps it aside, to parse as
        HTTP if the upgrade is declined (then `read(b"", ...)` walks it), and stops reading
        past its `read_bufsize` (64 KiB) meanwhile: no bound needed here."""
        self._kept += data
        self.received += len(data)

    def forget(self) -> None:
        """The upgrade was taken, or the connection is gone: nothing more to walk."""
        self._kept = b""
        self._chunks = None
        self.upgrading = False


_EMPTY_LINES = re.compile(rb"[\r\n]*")


def _past_empty_lines(seen: bytes, start: int) -> int:
    """Where to look for the end of a head that starts at ``start`` in ``seen`` (negative:
    in an earlier read, so from the first byte kept): past the empty lines before its
    request line, which the parser skips."""
    if start < 0:
        return 0
    return _EMPTY_LINES.match(seen, start).end()  # type: ignore[union-attr]
