"""Connections that never become sessions: slow, silent, idle and malformed ones."""

from __future__ import annotations

import asyncio
import resource
import time

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from relay.edge.connection import ClientSocket, RelayConnection
from relay.state import STATE
from tests.faults.test_upstream_faults import url
from tests.helpers import ALPHA_KEY, read_until, relay_config

KEY_IN_QUERY = "rk-guess-in-the-query-0123456789"


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, object], bytes]:
    """Send ``request`` raw; the status, JSON body and everything read until the close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    answer = await reader.read()  # the relay closes after an error answer
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), orjson.loads(body), answer


@pytest.mark.parametrize(
    "request_head",
    [
        f"GET /openai/v1/realtime?api_key={KEY_IN_QUERY}&pad={'x' * 20000} HTTP/1.1\r\n"
        "Host: relay\r\n\r\n",
        f"GET /healthz HTTP/1.1\r\nHost: relay\r\napi-key: {KEY_IN_QUERY}{'x' * 20000}\r\n\r\n",
    ],
    ids=["request-line", "header"],
)
async def test_oversized_request_head_gets_a_json_400_without_echo(
    simulator, start_relay, request_head
):
    relay = await start_relay(relay_config(simulator.url))
    with structlog.testing.capture_logs() as logs:
        status, body, raw = await exchange(relay.port, request_head.encode())
    assert status == 400
    assert body["error"]["code"] == "request_head_too_large"
    assert b"application/json" in raw and KEY_IN_QUERY[:12].encode() not in raw
    [line] = [e for e in logs if e["event"] == "request_head_too_large"]
    assert KEY_IN_QUERY[:12] not in repr(line)


async def test_a_request_head_too_large_in_all_is_refused_before_it_ends(simulator, start_relay):
    """Each line under `max_header_bytes`, but 2 MB in all: aiohttp held it (3.5 MiB a
    keyless connection). Past four lines' worth, the relay answers 431 and closes."""
    relay = await start_relay(relay_config(simulator.url))
    headers = "".join(f"x-pad-{i}: {'y' * 15000}\r\n" for i in range(10))
    unfinished = f"GET /openai/v1/realtime HTTP/1.1\r\nHost: relay\r\n{headers}".encode()
    with structlog.testing.capture_logs() as logs:
        status, body, _ = await exchange(relay.port, unfinished)  # its end never comes
    assert (status, body["error"]["code"]) == (431, "request_head_too_large")
    [line] = [e for e in logs if e["event"] == "request_head_too_large"]
    assert line["max_head_bytes"] == 4 * 16384 < line["bytes_received"]
    # A head just under the bound is served.
    three = "".join(f"x-pad-{i}: {'y' * 15000}\r\n" for i in range(3))
    fits = f"GET /healthz HTTP/1.1\r\nHost: relay\r\n{three}\r\n".encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(fits)
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    writer.close()
    # A body is no head: 200 KB in the same read as a short head is not refused as one.
    body = b"x" * 200_000
    post = b"POST /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n"
    post += b"Content-Length: 200000\r\n\r\n" + body
    status, answer, _ = await exchange(relay.port, post)
    assert (status, answer["error"]["code"]) == (405, "method_not_allowed")


async def test_malformed_request_gets_a_json_400(simulator, start_relay):
    relay = await start_relay(relay_config(simulator.url))
    with structlog.testing.capture_logs() as logs:
        status, body, raw = await exchange(relay.port, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert (status, body["error"]["code"]) == (400, "bad_request")
    assert any(e["event"] == "bad_request" for e in logs)


async def test_slow_header_client_is_closed_at_the_header_timeout(simulator, start_relay):
    timeout = 1.5
    relay = await start_relay(
        relay_config(simulator.url, server={"header_timeout_seconds": timeout})
    )
    request = b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    began = time.perf_counter()
    answer, sent = b"", 0
    while sent < len(request):
        writer.write(request[sent : sent + 1])  # one byte a second
        sent += 1
        try:
            answer = await asyncio.wait_for(reader.read(), 1.0)
            break  # the relay answered and closed
        except TimeoutError:
            continue
    took = time.perf_counter() - began
    writer.close()
    assert sent < len(request), "the whole request went through"
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"request_head_timeout"' in answer
    assert timeout <= took < timeout + 1.5


async def test_a_body_trickled_byte_by_byte_gets_408(simulator, start_relay):
    timeout = 1.5
    relay = await start_relay(
        relay_config(simulator.url, server={"header_timeout_seconds": timeout})
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(
        b"POST /openai/v1/realtime/calls?model=gpt-realtime HTTP/1.1\r\nHost: relay\r\n"
        + f"api-key: {ALPHA_KEY}\r\n".encode()
        + b"Content-Type: application/sdp\r\nContent-Length: 1000\r\n\r\n"
    )
    began, answer = time.perf_counter(), b""
    for _ in range(1000):
        writer.write(b"v")  # one byte a second
        try:
            answer = await asyncio.wait_for(reader.readuntil(b"}}"), 1.0)
            break
        except TimeoutError:
            continue
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"request_body_timeout"' in answer
    assert timeout <= time.perf_counter() - began < timeout + 1.5


async def test_silent_connection_is_closed_at_the_header_timeout(simulator, start_relay):
    relay = await start_relay(relay_config(simulator.url, server={"header_timeout_seconds": 0.5}))
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    began = time.perf_counter()
    assert await reader.read() == b""  # closed, nothing said
    assert 0.5 <= time.perf_counter() - began < 2.0
    writer.close()


IDLE_SOCKETS = 2000


@pytest.fixture
def enough_file_descriptors() -> None:
    """Each idle socket costs the test process two descriptors (both ends)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * IDLE_SOCKETS + 512
    if soft < needed:
        assert hard == resource.RLIM_INFINITY or hard >= needed, f"ulimit -Hn is {hard}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_idle_sockets_are_closed_on_time_while_a_session_is_served(
    simulator, start_relay, enough_file_descriptors
):
    # Half the sockets never send a byte (the header deadline closes them), half are idle
    # after a request (the keep-alive timeout closes them). Both timeouts are longer than
    # opening 2,000 sockets takes on a busy machine, so all are open at once.
    timeout = 15.0
    relay = await start_relay(
        relay_config(
            simulator.url,
            server={"keepalive_timeout_seconds": timeout, "header_timeout_seconds": timeout},
        )
    )
    request = b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"
    opening = asyncio.Semaphore(100)  # within the listen backlog
    idle = {"now": 0, "peak": 0, "total": 0}
    all_opened = asyncio.Event()

    async def idle_socket(with_request: bool) -> float:
        """How long after it became idle the relay closed it."""
        async with opening:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            if with_request:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
        idle_since = time.perf_counter()
        idle["now"] += 1
        idle["peak"] = max(idle["peak"], idle["now"])
        idle["total"] += 1
        if idle["total"] == IDLE_SOCKETS:
            all_opened.set()
        try:
            assert await reader.read() == b""  # closed by the relay, nothing said
            return time.perf_counter() - idle_since
        finally:
            idle["now"] -= 1
            writer.close()

    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
            await read_until(ws, "session.created")
            async with asyncio.TaskGroup() as tasks:
                sockets = [tasks.create_task(idle_socket(i % 2 == 0)) for i in range(IDLE_SOCKETS)]
                await all_opened.wait()
                assert idle["peak"] == IDLE_SOCKETS, "opening took longer than the timeouts"
                # All 2,000 are open and idle: the session is served meanwhile.
                await ws.send_str('{"type":"input_audio_buffer.clear"}')
                await read_until(ws, "input_audio_buffer.cleared")
            # Every idle socket was closed on time; the session outlived them all.
            await ws.send_str('{"type":"input_audio_buffer.clear"}')
            await read_until(ws, "input_audio_buffer.cleared")
    waits = [task.result() for task in sockets]
    # A silent socket's clock starts at its accept, an idle one's when its response was
    # written: this loop, busy with 2,000 sockets, can notice either up to ~1 s late.
    assert min(waits) >= timeout - 2.0
    assert max(waits) < timeout + 3.0, max(waits)
    await relay.app[STATE].idle.wait()


async def test_the_aiohttp_internals_the_connection_uses_are_there():
    """relay.edge.connection hooks into these; an aiohttp upgrade that moves them breaks it."""
    assert callable(RequestHandler.handle_error)
    assert callable(web.WebSocketResponse._close_transport)
    assert issubclass(RelayConnection, RequestHandler)
    assert issubclass(ClientSocket, web.WebSocketResponse)
    server = web.Server(lambda request: None, keepalive_timeout=1.0)  # type: ignore[arg-type,return-value]
    assert server._kwargs == {"keepalive_timeout": 1.0}
    assert server._loop is asyncio.get_running_loop()


async def test_a_body_sent_after_its_request_was_answered_is_no_head(simulator, start_relay):
    """Refused before its body was read, a request's body kept coming, and was counted as
    the next request's head: an unasked 431, a false `request_head_too_large` line and a
    reset."""
    relay = await start_relay(relay_config(simulator.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    size = 300_000
    writer.write(
        b"POST /openai/v1/realtime/calls HTTP/1.1\r\nHost: relay\r\n"
        b"Content-Type: application/sdp\r\nContent-Length: %d\r\n\r\n" % size
    )
    with structlog.testing.capture_logs() as logs:
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        for _ in range(size // 15_000):
            writer.write(b"v" * 15_000)  # the body, after its answer
            await writer.drain()
        writer.write_eof()
        rest = await reader.read()  # up to the relay's close: no second answer
    writer.close()
    assert rest == b""
    assert not [e for e in logs if e["event"] == "request_head_too_large"]


async def test_a_head_pipelined_behind_a_whole_one_is_bounded_and_timed(simulator, start_relay):
    """Bytes in the same read as a whole head were never counted, nor timed once it was
    answered: a `GET /healthz` with 200 KB of an unfinished second head behind it held its
    memory to the keep-alive timeout (75 s), 150 such connections 61 MiB."""
    relay = await start_relay(relay_config(simulator.url, server={"header_timeout_seconds": 1.0}))
    first = b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"
    pad = "".join(f"x-pad-{i}: {'y' * 15000}\r\n" for i in range(10)).encode()
    with structlog.testing.capture_logs() as logs:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(first + b"GET /healthz HTTP/1.1\r\nHost: relay\r\n" + pad)
        answers = await reader.read()  # the relay closes
        writer.close()
    assert answers.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 431" in answers
    assert [e["event"] for e in logs if e["event"].startswith("request_head")] == [
        "request_head_too_large"
    ]
    # Under the bound, an unfinished pipelined head meets the header timeout (408).
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(first + b"GET /healthz HTTP/1.1\r\nHost: relay\r\n")
    answers = await reader.read()
    writer.close()
    assert answers.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in answers
    # Whole heads pipelined, in one write: each is answered.
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(first * 3)
    for _ in range(3):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    writer.close()


@pytest.mark.parametrize("body", ["length", "chunked", "blank_lines"])
async def test_a_head_pipelined_behind_a_body_is_bounded(simulator, start_relay, body):
    """Behind a request with a body, an unfinished second head was neither counted nor
    timed: held to the keep-alive timeout (75 s). A body holding blank lines (multipart)
    then put the head's end past the body's: the next head went uncounted."""
    relay = await start_relay(relay_config(simulator.url))
    if body == "length":
        first = b"POST /healthz HTTP/1.1\r\nHost: relay\r\nContent-Length: 1\r\n\r\nX"
    elif body == "blank_lines":
        first = b"POST /healthz HTTP/1.1\r\nHost: relay\r\nContent-Length: 100000\r\n\r\n"
        first += b"a" * 99996 + b"\r\n\r\n"
    else:
        first = b"POST /healthz HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n"
        first += b"1\r\nX\r\n0\r\n\r\n"
    pad = "".join(f"x-pad-{i}: {'y' * 15000}\r\n" for i in range(5)).encode()  # 75 KB
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(first)
    head = await reader.readuntil(b"\r\n\r\n")  # its answer (405), the connection kept
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n" + pad)
    rest = await reader.read()
    writer.close()
    assert rest.startswith(b"HTTP/1.1 431")
    if body == "length":  # and in the same read as the body
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(first + b"GET /healthz HTTP/1.1\r\nHost: relay\r\n" + pad)
        answers = await reader.read()
        writer.close()
        assert answers.startswith(b"HTTP/1.1 405") and b"HTTP/1.1 431" in answers


async def test_a_head_whose_end_comes_in_the_next_read_leaves_no_deadline(simulator, start_relay):
    """A head whose blank line came in a read of its own left its deadline armed: an idle
    keep-alive connection got an unasked 408 at header_timeout_seconds."""
    relay = await start_relay(relay_config(simulator.url, server={"header_timeout_seconds": 0.5}))
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    for split in (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
    ):
        writer.write(split)
        await writer.drain()
        await asyncio.sleep(0.1)  # a read of its own for the rest
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"[len(split) :])
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        await asyncio.sleep(1.0)  # idle past the header timeout: the connection stays open
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.close()


CHUNKED_POST = (
    b"POST /healthz HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n"
)
UNFINISHED = b"GET /healthz HTTP/1.1\r\nHost: relay\r\nx-pad: " + b"y" * 8000 + b"\r\n"


@pytest.mark.parametrize(
    "first",
    [
        CHUNKED_POST,
        # An upgrade refused over HTTP (no key): aiohttp keeps what follows aside.
        b"GET /openai/v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: relay\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    ],
    ids=["chunked", "refused_upgrade"],
)
async def test_a_head_behind_a_chunked_body_or_a_refused_upgrade_is_timed(
    simulator, start_relay, first
):
    """In the same write as a chunked body's end or a refused upgrade, an unfinished head
    was taken for body: held to the keep-alive timeout (75 s), not header_timeout."""
    relay = await start_relay(relay_config(simulator.url, server={"header_timeout_seconds": 1.0}))
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(first + UNFINISHED)
    async with asyncio.timeout(10):  # the keep-alive timeout is 75 s: a hang fails here
        answers = await reader.read()
    writer.close()
    assert b"HTTP/1.1 408" in answers


async def test_a_431_comes_after_the_answer_to_a_chunked_post_before_it(simulator, start_relay):
    """The 431 went out first: between aiohttp taking the POST off its queue and handling
    it, nothing said a request was still to be answered."""
    relay = await start_relay(relay_config(simulator.url))
    pad = b"".join(b"x-pad-%d: %s\r\n" % (i, b"y" * 15000) for i in range(16))
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(CHUNKED_POST + b"GET /healthz HTTP/1.1\r\nHost: relay\r\n" + pad)
    answers = await reader.read()
    writer.close()
    assert answers.startswith(b"HTTP/1.1 405") and b"HTTP/1.1 431" in answers


async def _answers(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    """The status lines of ``count`` answers, each read whole."""
    statuses = []
    for _ in range(count):
        head = await reader.readuntil(b"\r\n\r\n")
        statuses.append(head.split(b"\r\n", 1)[0])
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    return statuses


@pytest.mark.parametrize("split", [None, 40, 80, 100])
async def test_a_request_behind_a_chunked_one_in_the_same_read_holds_no_deadline(
    simulator, start_relay, split
):
    """The walk stopped at a chunked request: the whole GET after it in the same read was
    counted as a head still arriving, and the idle keep-alive connection got an unasked 408
    at header_timeout_seconds (a proxy pipelining requests could pair it with the wrong
    one). Whether the two come in one write or two, split anywhere."""
    relay = await start_relay(relay_config(simulator.url, server={"header_timeout_seconds": 0.5}))
    sent = CHUNKED_POST + b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    for part in (sent,) if split is None else (sent[:split], sent[split:]):
        writer.write(part)
        await writer.drain()
        await asyncio.sleep(0.05)  # a read of its own for each part
    assert await _answers(reader, 2) == [b"HTTP/1.1 405 Method Not Allowed", b"HTTP/1.1 200 OK"]
    await asyncio.sleep(1.0)  # idle past the header timeout: the connection stays open
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
    assert await _answers(reader, 1) == [b"HTTP/1.1 200 OK"]
    writer.close()


async def test_a_body_behind_a_chunked_request_is_no_head(simulator, start_relay):
    """A Content-Length body whose head came in the same read as a chunked request was
    counted as a head: 431 at 64 KiB of a 200 KB body."""
    relay = await start_relay(relay_config(simulator.url))
    body = b"b" * 200_000
    head = b"POST /healthz HTTP/1.1\r\nHost: relay\r\nContent-Length: %d\r\n\r\n" % len(body)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    with structlog.testing.capture_logs() as logs:
        writer.write(CHUNKED_POST + head + body[:1000])
        await writer.drain()
        for at in range(1000, len(body), 20_000):
            await asyncio.sleep(0.01)  # reads of their own
            writer.write(body[at : at + 20_000])
            await writer.drain()
        assert await _answers(reader, 2) == [b"HTTP/1.1 405 Method Not Allowed"] * 2
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        assert await _answers(reader, 1) == [b"HTTP/1.1 200 OK"]
    writer.close()
    assert not [e for e in logs if e["event"].startswith("request_head")]


@pytest.mark.parametrize("count", [200, 3000])
async def test_pipelined_requests_the_parser_holds_back_are_no_head(simulator, start_relay, count):
    """aiohttp makes 32 requests of a read and holds the rest until they are handled: the
    held heads were counted as one head still arriving, past 64 KiB a 431 (sent after every
    answer, when nothing was counted any more) and a dropped connection."""
    relay = await start_relay(relay_config(simulator.url))
    one = b"GET /healthz HTTP/1.1\r\nHost: relay\r\nUser-Agent: " + b"u" * 700 + b"\r\n\r\n"
    if count > 200:
        one = b"GET /healthz HTTP/1.1\r\nHost: r\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    with structlog.testing.capture_logs() as logs:
        writer.write(one * count)
        await writer.drain()
        assert await _answers(reader, count) == [b"HTTP/1.1 200 OK"] * count
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        assert await _answers(reader, 1) == [b"HTTP/1.1 200 OK"]  # no 431 in between
    writer.close()
    assert not [e for e in logs if e["event"].startswith("request_head")]


async def test_empty_lines_are_timed_and_bounded_as_a_head(simulator, start_relay):
    """A connection that sent only an empty line was held to the keep-alive timeout (75 s,
    not header_timeout_seconds), and a stream of them was never refused (224 MB in 8 s,
    the loop busy skipping them). One CRLF after a request is a client's extra one."""
    relay = await start_relay(relay_config(simulator.url, server={"header_timeout_seconds": 0.5}))
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(b"\r\n")
    async with asyncio.timeout(5):  # the keep-alive timeout is 75 s: a hang fails here
        assert (await reader.read()).startswith(b"HTTP/1.1 408")
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(b"\r\n" * 40_000)
    async with asyncio.timeout(5):
        assert (await reader.read()).startswith(b"HTTP/1.1 431")
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(b"POST /healthz HTTP/1.1\r\nHost: r\r\nContent-Length: 1\r\n\r\nX\r\n")
    assert await _answers(reader, 1) == [b"HTTP/1.1 405 Method Not Allowed"]
    await asyncio.sleep(1.0)  # idle past the header timeout: the extra CRLF holds no deadline
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
    assert await _answers(reader, 1) == [b"HTTP/1.1 200 OK"]
    writer.close()


REFUSED_UPGRADE = (
    b"GET /openai/v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: relay\r\n"
    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
H2C_OFFER = (
    b"POST /healthz HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nContent-Length: %d\r\n\r\n"
)


@pytest.mark.parametrize("first", ["refused_upgrade", "h2c_offer"])
async def test_requests_after_an_upgrade_aiohttp_does_not_take_hold_no_deadline(
    simulator, start_relay, first
):
    """After a refused WebSocket upgrade aiohttp parses what followed it past the walk, and
    after an h2c offer (curl's) it serves the request as HTTP: the requests and bodies
    behind either were counted as a head still arriving (an unasked 408 as the answer to a
    pooled client's next request; a 431 behind a body of 200 KB)."""
    relay = await start_relay(relay_config(simulator.url, server={"header_timeout_seconds": 0.5}))
    body = b"b" * 200_000
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    if first == "refused_upgrade":
        post = b"POST /healthz HTTP/1.1\r\nHost: relay\r\nContent-Length: %d\r\n\r\n" % len(body)
        writer.write(REFUSED_UPGRADE + b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n" + post)
        writer.write(body)
        expected = [b"HTTP/1.1 401 Unauthorized", b"HTTP/1.1 200 OK"]
        expected.append(b"HTTP/1.1 405 Method Not Allowed")
    else:
        writer.write(H2C_OFFER % len(body))
        await writer.drain()
        await asyncio.sleep(0.05)  # the body in reads of its own, after the answer
        writer.write(body)
        expected = [b"HTTP/1.1 405 Method Not Allowed"]
    assert await _answers(reader, len(expected)) == expected
    await asyncio.sleep(1.0)  # idle past the header timeout: the connection stays open
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
    assert await _answers(reader, 1) == [b"HTTP/1.1 200 OK"]
    writer.close()


async def test_a_chunk_line_past_the_head_bound_gets_a_400(simulator, start_relay):
    """A chunk extension is served up to the head bound (aiohttp takes any length); past
    it, the walk cannot follow the body: a JSON 400 after the answer, where the connection
    was dropped with none."""
    relay = await start_relay(relay_config(simulator.url))
    head = b"POST /healthz HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(head + b"1;" + b"e" * 20_000 + b"\r\nX\r\n0\r\n\r\n")
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
    assert await _answers(reader, 2) == [b"HTTP/1.1 405 Method Not Allowed", b"HTTP/1.1 200 OK"]
    writer.write(head + b"1;" + b"e" * 70_000 + b"\r\nX\r\n0\r\n\r\n")
    answers = await reader.read()
    writer.close()
    assert answers.startswith(b"HTTP/1.1 405") and b"HTTP/1.1 400 Bad Request" in answers


@pytest.mark.parametrize(
    "body",
    [
        b"Content-Length: 6\r\n\r\nab\r\n\r\n",
        b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    ],
    ids=["length", "chunked"],
)
async def test_a_declined_upgrade_with_a_body_leaves_the_bound_on(simulator, start_relay, body):
    """aiohttp reads an upgrade's body before it switches; declined, the walk took the body
    for the next head and fell a request behind: after it, a head was neither timed nor
    bounded (held to the keep-alive timeout, 75 s, and 310 KiB of it kept)."""
    relay = await start_relay(relay_config(simulator.url, server={"header_timeout_seconds": 0.5}))
    upgrade = (
        b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(upgrade + body + b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
    assert await _answers(reader, 2) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"]
    pad = b"".join(b"x-pad-%d: %s\r\n" % (i, b"y" * 15000) for i in range(6))  # 90 KB
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n" + pad)
    async with asyncio.timeout(5):  # the keep-alive timeout is 75 s: a hang fails here
        assert (await reader.read()).startswith(b"HTTP/1.1 431")
    writer.close()


@pytest.mark.parametrize("late", [b"ab\r\n\r\ncd", b"d"], ids=["body", "last_byte"])
async def test_a_declined_upgrade_whose_body_ends_after_its_answer_is_closed(
    simulator, start_relay, late
):
    """Answered before its body had all come, a declined upgrade left aiohttp switched
    once the body was read, parsing nothing more: the requests after it went unanswered and
    a head after them neither timed nor bounded, held to the keep-alive timeout (75 s; 150
    connections +95 MiB). The connection is closed instead."""
    relay = await start_relay(relay_config(simulator.url, server={"header_timeout_seconds": 0.5}))
    body = b"ab\r\n\r\ncd"
    head = b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body[: len(body) - len(late)])
    assert await _answers(reader, 1) == [b"HTTP/1.1 200 OK"]
    writer.write(late + b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
    async with asyncio.timeout(5):  # the keep-alive timeout is 75 s: a hang fails here
        assert await reader.read() == b""
    writer.close()
