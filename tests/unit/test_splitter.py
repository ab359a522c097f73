"""The splitter (`_accel.Splitter`, through `frames.feed`) against its oracle, aiohttp's own
reader: the same byte stream, cut into the same reads, must put the same messages on the
queue in the same order, and the same error where the reader refuses the stream."""

from __future__ import annotations

import asyncio
import os
import random
import struct
from typing import Any

import pytest
from aiohttp._websocket.helpers import websocket_mask
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from aiohttp.base_protocol import BaseProtocol
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.session import frames
from tests.unit.accel_build import NOT_BUILT, not_built

try:
    from relay.session import _accel
except ImportError:
    not_built()
    pytest.skip(NOT_BUILT + "; without it nothing is split", allow_module_level=True)

LARGE = 64  # small, so that the corpora hold many large frames
MAX_SIZE = 1 << 17  # frames of 64 KiB and more have the long header


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool, rsv: int = 0) -> bytes:
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    flag = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head += bytes([flag | n])
    elif n < 65536:
        head += bytes([flag | 126]) + struct.pack("!H", n)
    else:
        head += bytes([flag | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    body = bytearray(payload)
    websocket_mask(key, body)
    return head + key + body


def stream(rng: random.Random, masked: bool) -> bytes:
    """Text and binary messages small and large, fragmented ones with control frames
    between their fragments, pings and pongs."""
    out = []
    for _ in range(rng.randrange(1, 12)):
        size = rng.choice((0, 5, LARGE - 1, LARGE, LARGE + 1, 300, 70000, MAX_SIZE - 1))
        payload = rng.randbytes(size)
        pick = rng.random()
        if pick < 0.45:
            out.append(frame(1, payload, masked=masked))
        elif pick < 0.55:
            out.append(frame(2, payload, masked=masked))
        elif pick < 0.75:  # a fragmented text message
            cuts = sorted(rng.sample(range(len(payload) + 1), min(2, len(payload) + 1)))
            pieces = [payload[: cuts[0]], payload[cuts[0] : cuts[-1]], payload[cuts[-1] :]]
            for i, piece in enumerate(pieces):
                out.append(frame(0 if i else 1, piece, fin=i == 2, masked=masked))
                if rng.random() < 0.5:
                    out.append(frame(9, b"ping", masked=masked))
        else:
            out.append(frame(rng.choice((9, 10)), payload[:100], masked=masked))
    return b"".join(out)


def reads(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(0, 12))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def received(queue: WebSocketDataQueue) -> tuple[list[tuple[Any, ...]], Any]:
    messages = [(m.type, m.data, m.extra, size) for m, size in queue._buffer]
    exc = queue.exception()
    return messages, None if exc is None else (type(exc), str(exc))


def through(
    chunks: list[bytes], masked: bool, split: bool, budget: Any = None
) -> tuple[list[Any], Any]:
    protocol = BaseProtocol(asyncio.get_event_loop())
    queue = WebSocketDataQueue(protocol, 1 << 30, loop=asyncio.get_event_loop())
    reader = WebSocketReader(queue, MAX_SIZE, compress=False, decode_text=False)
    splitter = _accel.Splitter(queue, masked, LARGE, MAX_SIZE, budget) if split else None
    for chunk in chunks:
        eof, _ = frames.feed(reader, chunk, splitter)
        if eof:
            break
    return received(queue)


@pytest.mark.parametrize("masked", [True, False], ids=["client", "upstream"])
@pytest.mark.parametrize("seed", range(300))
async def test_the_queue_gets_what_aiohttps_reader_alone_gives_it(seed, masked):
    rng = random.Random(seed)
    data = stream(rng, masked)
    chunks = reads(data, rng)
    alone = through(chunks, masked, split=False)
    assert through(chunks, masked, split=True) == alone
    assert alone[1] is None and alone[0]
    # Counted in a budget that has room, the same; every message is whole at the end, so
    # nothing is held.
    budget = _accel.MessageBudget(1 << 40)
    assert through(chunks, masked, split=True, budget=budget) == alone
    assert budget.held == 0


async def test_large_text_frames_are_filled_past_the_reader():
    payloads = [b"a" * (LARGE - 1), b"b" * LARGE, b"c" * 70000]
    data = b"".join(frame(1, p, masked=True) for p in payloads)
    parts = _accel.Splitter(None, True, LARGE, MAX_SIZE).split(data)
    assert parts is not None
    assert [p for is_message, p in parts if is_message] == payloads[1:]
    assert [p for is_message, p in parts if not is_message] == [data[: 2 + 4 + LARGE - 1]]
    # A header cut across reads leaves its frame to the reader (the corpora above check
    # that the reader then gets every byte of it).
    splitter = _accel.Splitter(None, True, LARGE, MAX_SIZE)
    big = frame(1, payloads[2], masked=True)
    assert splitter.split(big[:3]) is None
    assert splitter.split(big[3:]) is None


@pytest.mark.parametrize(
    "bad",
    [
        frame(1, b"x" * MAX_SIZE, masked=True),  # at the limit: the reader refuses it
        frame(1, b"x" * 100, masked=True, rsv=0x40),  # compressed, on a connection without
        bytes([0x81, 0xFF]) + b"\xff" * 8 + b"key!",  # a length past 2**63
        frame(0, b"x" * 100, masked=True),  # a continuation of nothing
    ],
)
async def test_a_stream_the_reader_refuses_is_refused_the_same(bad):
    data = frame(1, b"ok" * 40, masked=True) + bad + frame(1, b"after" * 30, masked=True)
    chunks = reads(data, random.Random(len(bad)))
    assert through(chunks, True, split=True) == through(chunks, True, split=False)


def through_refusing_wrong_masks(chunks: list[bytes], masked: bool) -> tuple[list[Any], Any]:
    """The oracle: aiohttp's reader, which takes frames masked either way, up to the first
    frame masked otherwise than ``masked`` says (RFC 6455 5.1), refused there."""
    data = b"".join(chunks)
    cut = first_wrongly_masked(data, masked)
    if cut is None:
        return through(chunks, masked, split=False)
    prefix, taken = [], 0
    for chunk in chunks:
        prefix.append(chunk[: cut - taken])
        taken += len(prefix[-1])
    messages, exc = through([c for c in prefix if c], masked, split=False)
    if exc is not None:
        return messages, exc  # the reader failed first
    return messages, (frames.WronglyMasked, str(frames.WronglyMasked(masked)))


def first_wrongly_masked(data: bytes, masked: bool) -> int | None:
    """Where the first whole frame header masked otherwise than ``masked`` starts."""
    pos = 0
    while pos + 2 <= len(data):
        second = data[pos + 1]
        short = second & 0x7F
        extended = 2 if short == 126 else 8 if short == 127 else 0
        need = 2 + extended + (4 if second & 0x80 else 0)
        if pos + need > len(data):
            return None
        if bool(second & 0x80) != masked:
            return pos
        length = int.from_bytes(data[pos + 2 : pos + 2 + extended]) if extended else short
        pos += need + length
    return None


async def test_a_frame_masked_wrongly_is_refused_which_the_reader_takes():
    """A client's unmasked frame reached the upstream, an upstream's masked one the client:
    RFC 6455 5.1 says the connection MUST be failed."""
    for masked in (True, False):
        data = frame(1, b"ok" * 40, masked=masked) + frame(1, b"x" * 100, masked=not masked)
        chunks = reads(data + frame(1, b"after" * 30, masked=masked), random.Random(3))
        alone = through(chunks, masked, split=False)
        assert len(alone[0]) == 3 and alone[1] is None  # aiohttp's reader takes it
        messages, refused = through(chunks, masked, split=True)
        assert messages == alone[0][:1]
        assert refused == (frames.WronglyMasked, str(frames.WronglyMasked(masked)))
        assert through(chunks, masked, split=True) == through_refusing_wrong_masks(chunks, masked)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(1, 599), max_size=6))
def test_any_bytes_give_the_same_as_the_reader(data, cuts):
    points = sorted({c for c in cuts if c < len(data)})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    chunks = [c for c in chunks if c]
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        alone = through_refusing_wrong_masks(chunks, True)
        assert through(chunks, True, split=True) == alone
        budget = _accel.MessageBudget(0)
        assert through(chunks, True, split=True, budget=budget) == alone
        assert budget.held == 0  # a message cut short is given back with its splitter
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def test_a_message_is_held_from_its_first_header_until_it_is_whole():
    budget = _accel.MessageBudget(0)
    splitter = _accel.Splitter(None, True, LARGE, MAX_SIZE, budget)
    first, middle, last = (frame(1, b"a" * 300, fin=False, masked=True),
                           frame(0, b"b" * 70000, fin=False, masked=True),
                           frame(0, b"c" * 5, masked=True))  # fmt: skip
    ping = frame(9, b"ping", masked=True)
    splitter.split(first[:8])  # the header: its whole length is reserved at once
    assert budget.held == 300
    splitter.split(first[8:] + ping + middle)
    assert budget.held == 70300  # a ping between fragments holds nothing of its own
    splitter.split(last[:-1])
    assert budget.held == 70305
    splitter.split(last[-1:])
    assert budget.held == 0
    # A large frame filled past the reader, and an empty final frame.
    big = frame(1, b"d" * 70000, masked=True)
    splitter.split(big[:-1])
    assert budget.held == 70000
    assert splitter.split(big[-1:]) == [(True, b"d" * 70000)]
    assert budget.held == 0
    splitter.split(frame(1, b"", masked=True))
    assert budget.held == 0
    # Gone mid-message: given back.
    splitter.split(first)
    assert budget.held == 300
    del splitter
    assert budget.held == 0


def test_a_frame_past_the_budget_is_refused_and_nothing_after_it_is_read():
    budget = _accel.MessageBudget(1000, small=100)
    other = _accel.Splitter(None, True, LARGE, MAX_SIZE, budget)
    other.split(frame(1, b"x" * 600, masked=True)[:20])  # another connection holds 600
    splitter = _accel.Splitter(None, True, LARGE, MAX_SIZE, budget)
    before = frame(1, b"ok", masked=True)
    refused = frame(1, b"y" * 401, masked=True)
    parts = splitter.split(before + refused + before)
    assert parts == [(False, before), (None, 401)]
    assert budget.held == 600
    assert splitter.split(before) == []
    # What fits is taken; a frame too big for the connection is aiohttp's to refuse (1009),
    # not counted.
    fits = _accel.Splitter(None, True, LARGE, MAX_SIZE, budget)
    assert fits.split(frame(1, b"z" * 400, masked=True)) == [(True, b"z" * 400)]
    assert budget.held == 600
    fits.split(frame(1, b"z" * MAX_SIZE, masked=True)[:20])
    assert budget.held == 600
    # A limit lowered below what is held refuses every data frame until it is given back.
    budget.limit = 500
    lowered = _accel.Splitter(None, True, LARGE, MAX_SIZE, budget)
    assert lowered.split(frame(1, b"a" * 101, masked=True)) == [(None, 101)]
    del other
    assert budget.held == 0


def test_small_messages_go_on_past_the_bound_up_to_twice_it():
    budget = _accel.MessageBudget(1000, small=100)
    holder = _accel.Splitter(None, True, LARGE, MAX_SIZE, budget)
    holder.split(frame(1, b"x" * 1000, masked=True)[:20])
    assert budget.held == 1000  # full
    live = _accel.Splitter(None, True, LARGE, MAX_SIZE, budget)
    audio = frame(1, b"a" * 100, masked=True)
    assert live.split(audio + audio) == [(True, b"a" * 100)] * 2
    assert budget.held == 1000
    # A fragmented message is small while its fragments add up to 100 or less.
    parts = live.split(
        frame(1, b"b" * 60, fin=False, masked=True) + frame(0, b"c" * 41, masked=True)
    )
    assert parts is not None and parts[-1] == (None, 41)
    # But not without end: small messages half-sent stop at twice the bound.
    halves = [_accel.Splitter(None, True, LARGE, MAX_SIZE, budget) for _ in range(11)]
    for half in halves[:9]:
        half.split(frame(1, b"h" * 100, masked=True)[:8])
    assert budget.held == 1960  # 1,000, the fragment's 60 above, and 9 x 100
    assert halves[9].split(frame(1, b"h" * 41, masked=True)) == [(None, 41)]
    halves[10].split(frame(1, b"h" * 40, masked=True)[:8])
    assert budget.held == 2000


async def test_a_refused_frame_ends_the_reading_with_1013():
    protocol = BaseProtocol(asyncio.get_event_loop())
    queue = WebSocketDataQueue(protocol, 1 << 30, loop=asyncio.get_event_loop())
    reader = WebSocketReader(queue, MAX_SIZE, compress=False, decode_text=False)
    budget = _accel.MessageBudget(100, small=0)
    splitter = frames.splitter(queue, masked=True, max_size=MAX_SIZE, budget=budget)
    data = frame(1, b"ok", masked=True) + frame(1, b"n" * 101, masked=True)
    assert frames.feed(reader, data, splitter) == (True, b"")
    messages, error = received(queue)
    assert [m[1] for m in messages] == [b"ok"]
    assert error == (frames.MessageBufferFull, str(frames.MessageBufferFull()))
    assert queue.exception().code == 1013


def test_a_teams_budget_bounds_its_part_of_the_process():
    process = _accel.MessageBudget(1000, small=10)
    alpha = _accel.MessageBudget(400, small=10, parent=process)
    beta = _accel.MessageBudget(0, small=10, parent=process)  # no bound of its own
    held = _accel.Splitter(None, True, LARGE, MAX_SIZE, alpha)
    held.split(frame(1, b"a" * 300, masked=True)[:8])
    assert (alpha.held, process.held) == (300, 300)
    # Past alpha's 400, though the process has room: refused.
    more = _accel.Splitter(None, True, LARGE, MAX_SIZE, alpha)
    assert more.split(frame(1, b"a" * 101, masked=True)) == [(None, 101)]
    # Beta takes what the process has left, and no more.
    other = _accel.Splitter(None, True, LARGE, MAX_SIZE, beta)
    other.split(frame(1, b"b" * 700, masked=True)[:8])
    assert (beta.held, process.held) == (700, 1000)
    last = _accel.Splitter(None, True, LARGE, MAX_SIZE, alpha)
    assert last.split(frame(1, b"a" * 11, masked=True)) == [(None, 11)]
    assert last.budget is alpha and alpha.parent is process
    del held, other
    assert (alpha.held, beta.held, process.held) == (0, 0, 0)
    with pytest.raises(TypeError):
        _accel.MessageBudget(1, parent=alpha)  # one level: a team's budget under the process's


def test_a_message_in_more_than_max_fragments_is_refused():
    """Each fragment costs the reader as much as a whole message: one client sending a
    message in millions of 1-byte fragments held the event loop 80-290 ms at a time. Past
    MAX_FRAGMENTS frames (control frames between them do not count) it is refused."""
    assert frames.MAX_FRAGMENTS == _accel.MAX_FRAGMENTS
    first = frame(1, b"a", fin=False, masked=True)
    more = frame(0, b"b", fin=False, masked=True)
    ping = frame(9, b"", masked=True)
    last = frame(0, b"c", masked=True)
    whole = first + (more + ping) * (_accel.MAX_FRAGMENTS - 2) + last
    splitter = _accel.Splitter(None, True, LARGE, MAX_SIZE)
    assert splitter.split(whole) is None  # at the cap: all of it to the reader
    over = _accel.Splitter(None, True, LARGE, MAX_SIZE)
    parts = over.split(first + more * (_accel.MAX_FRAGMENTS - 1) + more)
    assert parts is not None and parts[-1] == (None, -1)
    assert over.split(frame(1, b"later", masked=True)) == []  # nothing more is read
