"""The request-head bound's walk over a connection's bytes (relay.edge.head_bound), without
sockets: for any requests, split into reads anywhere, and the parser making requests as it
does (once their head is whole, or later from what it held back), the bytes counted as a
head still arriving are exactly those of the head at the end of what came."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.edge.head_bound import UPGRADE, ChunkWalk, HeadBound, Unframed

MAX_LINE = 16384


@dataclass
class Request:
    raw: bytes
    head_start: int  # past empty lines before its request line (offsets in the request)
    head_end: int
    length: int | None  # as the parser reports it: None for chunked, UPGRADE


def get(path: str = "/healthz", lead: bytes = b"") -> Request:
    head = f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode()
    return Request(lead + head, len(lead), len(lead) + len(head), 0)


def with_length(body: bytes, lead: bytes = b"") -> Request:
    head = f"POST /healthz HTTP/1.1\r\nHost: relay\r\nContent-Length: {len(body)}\r\n\r\n"
    raw = lead + head.encode()
    return Request(raw + body, len(lead), len(raw), len(body))


def chunked(chunks: list[bytes], trailers: list[bytes] = (), ext: bytes = b"") -> Request:  # type: ignore[assignment]
    head = b"POST /healthz HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x%s\r\n%s\r\n" % (len(c), ext, c) for c in chunks if c)
    body += b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"
    return Request(head + body, 0, len(head), None)


def upgrade() -> Request:
    head = b"GET /openai/v1/realtime HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n\r\n"
    return Request(head, 0, len(head), UPGRADE)


def feed(requests: list[Request], partial: bytes, cuts: list[int], holds: set[int]) -> HeadBound:
    """Feed the requests then ``partial`` (a head still arriving), cut at ``cuts``; the
    parser makes each request once its head is whole, except that it holds back every
    request after a read in ``holds`` (by index) until the end, where it makes them from
    what it held (a read of b""). Checks the count after each read."""
    stream = b"".join(r.raw for r in requests) + partial
    # Where each head's bytes start (its empty lines before it included: they count, but
    # for one CRLF right after a request, a client's extra one), and where its head ends.
    starts, ends, offset = [], [], 0
    for r in requests:
        starts.append((offset, bool(offset) and r.raw.startswith(b"\r\n")))
        ends.append(offset + r.head_end)
        offset += len(r.raw)
    starts.append((offset, bool(offset) and partial.startswith(b"\r\n")))
    ends.append(len(stream) + 1)
    bound = HeadBound(MAX_LINE)
    made = 0
    held = False
    points = sorted({c for c in cuts if 0 < c < len(stream)} | {len(stream)})
    last = 0
    for read, point in enumerate(points):
        data = stream[last:point]
        last = point
        lengths = []
        while not held and made < len(requests) and ends[made] <= point:
            lengths.append(requests[made].length)
            made += 1
            if requests[made - 1].length == UPGRADE:
                break
        if read in holds:
            held = True
        if not bound.read(data, lengths):
            assert requests[made - 1].length == UPGRADE
            return bound
        assert bound.pending == _expected(point, starts, ends, made)
    if held:
        lengths = [r.length for r in requests[made:]]
        made = len(requests)
        if bound.read(b"", lengths):
            assert bound.pending == _expected(len(stream), starts, ends, made)
    return bound


def _expected(point: int, starts: list[tuple[int, bool]], ends: list[int], made: int) -> int:
    if any(end <= point for end in ends[made:-1]):
        return 0  # a whole head the parser holds back
    for (start, extra_crlf), end in zip(starts, ends, strict=True):
        if start <= point < end:
            got = point - start
            if extra_crlf and got >= 2:
                return got - 2  # a client's extra CRLF after a request
            return got  # (one byte of it: not known yet)
    return 0


def test_a_chunked_post_then_a_get_in_one_read_leaves_nothing_counted():
    """The probe's first finding: the walk stopped at the chunked request, and the GET
    after it was counted as a head still arriving (an unasked 408 on an idle connection)."""
    bound = HeadBound(MAX_LINE)
    post, then = chunked([b"X"]), get()
    assert bound.read(post.raw + then.raw, [None, 0])
    assert bound.pending == 0


def test_a_body_after_a_chunked_post_is_no_head():
    """The probe's second: a Content-Length body after a chunked request in the same read
    was counted as a head (a false 431)."""
    bound = HeadBound(MAX_LINE)
    post, big = chunked([b"X"]), with_length(b"b" * 200_000)
    head = big.raw[: big.head_end + 1000]
    assert bound.read(post.raw + head, [None, 200_000])
    assert bound.pending == 0
    for at in range(len(head), len(big.raw), 20_000):
        assert bound.read(big.raw[at : at + 20_000], [])
        assert bound.pending == 0


def test_heads_held_back_by_the_parser_are_not_counted():
    """The probe's third: 3,000 small GETs in one read, of which the parser makes 32 and
    holds the rest: the rest are whole requests, not a head of 100 KB still arriving."""
    bound = HeadBound(MAX_LINE)
    requests = [get() for _ in range(3000)]
    assert bound.read(b"".join(r.raw for r in requests), [0] * 32)
    assert bound.pending == 0
    for _ in range(2968 // 16):
        assert bound.read(b"", [0] * 16)
        assert bound.pending == 0
    assert bound.read(b"", [0] * (2968 % 16))
    assert bound.pending == 0
    assert bound.read(b"GET / HTTP/1.1\r\nHo", [])
    assert bound.pending == len(b"GET / HTTP/1.1\r\nHo")


@pytest.mark.parametrize("cut", range(1, 40))
def test_a_chunk_line_split_anywhere(cut):
    body = b"3;name=value\r\nabc\r\n0\r\nx-trailer: 1\r\n\r\nGET"
    walk = ChunkWalk(MAX_LINE)
    first = walk.walk(body[:cut], 0)
    if first is not None:
        assert first == body.index(b"GET")
        return
    assert walk.walk(body[cut:], 0) == body.index(b"GET") - cut


@pytest.mark.parametrize(
    "body", [b"x\r\n", b"0x1\r\nX\r\n", b"+1\r\nX\r\n", b"1 \r\nX\r\n", b";ext\r\n"]
)
def test_a_chunk_size_the_parser_refuses_is_unframed(body):
    with pytest.raises(Unframed):
        ChunkWalk(MAX_LINE).walk(body, 0)


def test_a_chunk_line_past_the_bound_is_unframed():
    walk = ChunkWalk(100)
    with pytest.raises(Unframed):
        walk.walk(b"1;" + b"e" * 60, 0)
        walk.walk(b"e" * 60, 0)


def test_empty_lines_before_a_request_line_are_no_head():
    """Some clients send CRLF after a body; the parser skips empty lines before a request
    line, so they hold no deadline."""
    bound = HeadBound(MAX_LINE)
    post = with_length(b"X")
    assert bound.read(post.raw + b"\r\n", [1])
    assert bound.pending == 0


def test_an_upgrade_ends_the_walk():
    bound = HeadBound(MAX_LINE)
    up = upgrade()
    assert not bound.read(get().raw + up.raw + b"\x81\x80frames", [0, 0], upgrades={1})
    assert bound.pos == len(get().raw) + len(up.raw) and bound.upgrading


def test_what_follows_a_declined_upgrade_is_walked_as_http():
    """A refused upgrade (401) with a GET behind it: aiohttp parses the GET from what it
    kept aside, past the walk, and the GET's bytes were counted as a head once counting
    resumed (an unasked 408 at header_timeout_seconds; a 431 behind a POST of 200 KB)."""
    bound = HeadBound(MAX_LINE)
    post = with_length(b"p" * 200_000)
    assert not bound.read(upgrade().raw + get().raw + post.raw[:1000], [0], upgrades={0})
    bound.hold(post.raw[1000:100_000])
    assert bound.read(b"", [0, 200_000])  # declined: the parser made these from the tail
    assert bound.pending == 0
    assert bound.read(post.raw[100_000:] + b"GET / HT", [])
    assert bound.pending == len(b"GET / HT")


_bodies = st.binary(max_size=300).map(lambda b: b + b"\r\n\r\n" * (len(b) % 3))
_requests = st.one_of(
    st.builds(get, lead=st.sampled_from([b"", b"\r\n", b"\r\n\r\n"])),
    st.builds(with_length, _bodies, lead=st.sampled_from([b"", b"\r\n"])),
    st.builds(
        chunked,
        st.lists(st.one_of(_bodies, st.just(b"\r\n0\r\n\r\n")), max_size=4),
        st.lists(st.sampled_from([b"x-a: 1", b"x-b: 22"]), max_size=2),
        st.sampled_from([b"", b";a=b"]),
    ),
)


@settings(max_examples=400, deadline=None)
@given(
    requests=st.lists(_requests, max_size=6),
    partial=st.sampled_from([b"", b"GET /x HTTP/1.1\r\nHost: r", b"\r\nGET /y HTTP/1.1\r\n\r"]),
    cuts=st.lists(st.integers(min_value=1, max_value=3000), max_size=12),
    holds=st.sets(st.integers(min_value=0, max_value=12), max_size=2),
)
def test_any_requests_split_anywhere(requests, partial, cuts, holds):
    bound = feed(requests, partial, cuts, holds)
    assert bound.received == sum(len(r.raw) for r in requests) + len(partial)


def test_bytes_past_a_held_request_are_bounded():
    """While the parser holds requests back it reads no more; bytes that keep coming past a
    whole head it never makes are a walk that lost its way, not a queue: refused, not kept
    without end."""
    bound = HeadBound(MAX_LINE)
    assert bound.read(get().raw * 2, [0])
    assert bound.pending == 0
    with pytest.raises(Unframed):
        for _ in range(40):
            bound.read(b"x" * 65536, [])


def test_empty_lines_count_but_one_after_a_request():
    """A connection that sent only empty lines kept no deadline: held to the keep-alive
    timeout (75 s, not header_timeout_seconds), and a stream of them was never refused
    (224 MB in 8 s, the loop busy skipping them byte by byte). They count as a head; only
    one CRLF right after a request (a client's extra one after a body) does not."""
    bound = HeadBound(MAX_LINE)
    assert bound.read(b"\r\n", [])
    assert bound.pending == 2
    bound = HeadBound(MAX_LINE)
    assert bound.read(with_length(b"X").raw + b"\r", [1])
    assert bound.pending == 1  # perhaps the extra CRLF: not known yet
    assert bound.read(b"\n", [])
    assert bound.pending == 0
    assert bound.read(b"\r\n" * 40_000, [])
    assert bound.pending == 80_000


def test_an_upgrade_the_parser_does_not_take_drops_the_rest_of_its_read():
    """aiohttp switches protocols for WebSocket only; for another upgrade (curl's h2c offer)
    it serves the request and drops what the read its body ended in held after it. The walk
    stopped at such a request: its body, and what came after it, counted as a head (an
    unasked 408, or 431 on a 200 KB body)."""
    h2c = b"POST /x HTTP/1.1\r\nHost: r\r\nUpgrade: h2c\r\nContent-Length: 5\r\n\r\n"
    bound = HeadBound(MAX_LINE)
    assert bound.read(h2c + b"hel", [5], ignored_upgrades={0})
    assert bound.pending == 0
    assert bound.read(b"lo" + get().raw, [])  # dropped by the parser, with the body's end
    assert bound.pending == 0
    assert bound.read(b"GET / HTTP/1.1\r\n", [])
    assert bound.pending == len(b"GET / HTTP/1.1\r\n")


@pytest.mark.parametrize("body", ["chunked", "length"])
def test_an_upgrade_switches_after_its_body(body):
    """aiohttp reads a WebSocket upgrade's body before it switches: the walk stopped at the
    head, and once the upgrade was declined walked the body as the next head. A blank line
    in it (every chunked body ends in one) put the walk a request behind the parser for the
    rest of the connection: heads held 75 s and never bounded (310 KiB each, 150
    connections +117 MiB), and a false 400 or 431 on requests the parser took."""
    head = b"GET /healthz HTTP/1.1\r\nHost: r\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    if body == "chunked":
        raw, length = head + b"Transfer-Encoding: chunked\r\n\r\n4\r\nab\r\n\r\n0\r\n\r\n", None
    else:
        raw, length = head + b"Content-Length: 6\r\n\r\nab\r\n\r\n", 6
    bound = HeadBound(MAX_LINE)
    assert not bound.read(raw + get().raw, [length], upgrades={0})
    assert bound.read(b"", [0])  # declined: the parser made the GET from what it kept
    assert bound.pending == 0
    for _ in range(3):
        assert bound.read(b"x-pad: " + b"y" * 30_000 + b"\r\n", [])
    assert bound.pending == 3 * 30_009
