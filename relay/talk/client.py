"""The talking itself: one WebSocket to the relay, audio up in small chunks, the reply down.

The key goes in the `api-key` header. The client also offers the `realtime` subprotocol, as
browsers do, so a relay that refuses it answers with an `error` event (its JSON error code)
instead of a bare HTTP status.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp
import orjson

from relay.talk.audio import RATE, SAMPLE_BYTES
from relay.talk.turn import Said, Turn

REALTIME_PATH = "/openai/v1/realtime"
# How long server VAD gets to hear the end of the speech, in trailing silence, at most.
MAX_TRAILING_SILENCE_SECONDS = 3.0
# How long the server then has to say so.
VAD_VERDICT_SECONDS = 5.0


class TalkError(Exception):
    """Talking failed in a way the user can act on; the message says how."""


@dataclass(frozen=True, slots=True)
class TalkOptions:
    url: str
    key: str
    deployment: str
    # 24 kHz mono PCM16 to say, or a text message to send instead.
    audio: bytes = b""
    text: str | None = None
    fast: bool = False
    chunk_ms: int = 40
    reply_timeout_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class Listener:
    """What the display is told as the talk goes."""

    uploaded: Callable[[float], None]  # seconds of audio sent so far
    said: Callable[[Said], None]
    replied: Callable[[float], None]  # seconds of reply audio so far
    error: Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class TalkResult:
    turn: Turn
    audio_chunks_out: int


def realtime_url(base: str, deployment: str) -> str:
    """The realtime endpoint under ``base`` (a relay's address, or a full realtime URL)."""
    parts = urlsplit(base)
    if parts.scheme not in ("ws", "wss", "http", "https") or not parts.netloc:
        raise TalkError(f"--url {base!r}: expected ws://host:port or wss://host:port")
    path = parts.path.rstrip("/")
    if not path.endswith("/realtime"):
        path += REALTIME_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, urlencode({"model": deployment}), ""))


async def talk(options: TalkOptions, listener: Listener) -> TalkResult:
    url = realtime_url(options.url, options.deployment)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            ws = await http.ws_connect(
                url,
                headers={"api-key": options.key},
                protocols=("realtime",),
                max_msg_size=0,
                autoping=True,
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise TalkError(
                f"the relay at {options.url} refused the connection: HTTP {exc.status}"
            ) from exc
        except aiohttp.ClientConnectionError as exc:
            raise TalkError(
                f"cannot reach a relay at {options.url} ({exc.__class__.__name__}): "
                "is it running? `make run` starts one"
            ) from exc
        async with ws:
            return await _Conversation(ws, options, listener).run()


class _Conversation:
    def __init__(
        self, ws: aiohttp.ClientWebSocketResponse, options: TalkOptions, listener: Listener
    ) -> None:
        self.ws = ws
        self.options = options
        self.listener = listener
        self.turn = Turn()
        self.chunks_out = 0
        self.loop = asyncio.get_running_loop()
        self.changed = asyncio.Event()  # set on every server event
        self.receiver_done = asyncio.Event()

    async def run(self) -> TalkResult:
        first = await self._receive()
        if first.get("type") == "error":  # the relay refused the session
            self.turn.errors.append(first.get("error") or {})
            await self.ws.receive()  # its close frame, for the code
            raise self._closed("refused the session")
        if first.get("type") != "session.created":
            raise TalkError(f"the relay sent {first.get('type')!r} before session.created")
        self.turn.feed(first, self.loop.time())
        try:
            await self._converse()
        except BaseExceptionGroup as group:
            raise _first(group, TalkError) from None
        return TalkResult(self.turn, self.chunks_out)

    async def _converse(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            receiving = tasks.create_task(self._receive_all(), name="talk receive")
            try:
                async with asyncio.timeout(self.options.reply_timeout_seconds):
                    await self._send()
                    await self._until(lambda: self.turn.complete)
            except TimeoutError:
                raise TalkError(
                    f"no complete reply within {self.options.reply_timeout_seconds:g} s"
                ) from None
            finally:
                receiving.cancel()

    async def _send(self) -> None:
        if self.options.text is not None:
            await self._send_text(self.options.text)
        else:
            await self._send_audio()
        self.turn.uploaded = True

    async def _send_text(self, text: str) -> None:
        self.listener.said(Said("user", "text", text, final=True))
        content = [{"type": "input_text", "text": text}]
        item = {"type": "message", "role": "user", "content": content}
        await self._send_event({"type": "conversation.item.create", "item": item})
        self.turn.committed(self.loop.time())
        await self._send_event({"type": "response.create"})

    async def _send_audio(self) -> None:
        audio, chunk = self.options.audio, RATE * SAMPLE_BYTES * self.options.chunk_ms // 1000
        started = self.loop.time()
        for offset in range(0, len(audio), chunk):
            await self._append(audio[offset : offset + chunk], started)
            self.listener.uploaded(min(offset + chunk, len(audio)) / (RATE * SAMPLE_BYTES))
        if not self.turn.server_vad:
            self.turn.committed(self.loop.time())
            await self._send_event({"type": "input_audio_buffer.commit"})
            await self._send_event({"type": "response.create"})
            return
        # Server VAD ends the turn once it hears silence after the speech.
        silence, sent = bytes(chunk), 0.0
        while self.turn.needs_silence and sent < MAX_TRAILING_SILENCE_SECONDS:
            await self._append(silence, started)
            sent += self.options.chunk_ms / 1000
        try:  # sent fast, the silence can be ahead of the server's verdict
            async with asyncio.timeout(VAD_VERDICT_SECONDS):
                await self._until(lambda: not self.turn.needs_silence)
        except TimeoutError:
            raise TalkError(
                "server VAD did not hear the end of the speech "
                f"(after {MAX_TRAILING_SILENCE_SECONDS:.0f} s of silence)"
            ) from None

    async def _append(self, pcm16: bytes, started: float) -> None:
        if not self.options.fast:  # real-time pace, like a microphone
            due = started + self.chunks_out * self.options.chunk_ms / 1000
            await asyncio.sleep(max(0.0, due - self.loop.time()))
        audio = base64.b64encode(pcm16).decode("ascii")
        await self._send_event({"type": "input_audio_buffer.append", "audio": audio})
        self.chunks_out += 1

    async def _send_event(self, event: dict[str, Any]) -> None:
        try:
            await self.ws.send_frame(orjson.dumps(event), aiohttp.WSMsgType.TEXT)
        except ConnectionResetError:
            # The relay closed the socket: the receiving task learns why.
            async with asyncio.timeout(5):
                await self.receiver_done.wait()
            raise self._closed("closed the connection") from None

    async def _receive(self) -> dict[str, Any]:
        message = await self.ws.receive()
        if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            event: dict[str, Any] = orjson.loads(message.data)
            return event
        raise self._closed("closed the connection")

    def _closed(self, what: str) -> TalkError:
        why = ""
        if self.turn.errors:
            last = self.turn.errors[-1]
            why = f": {last.get('code')}: {last.get('message')}"
        return TalkError(f"the relay {what} (close code {self.ws.close_code}){why}")

    async def _receive_all(self) -> None:
        try:
            await self._receive_events()
        finally:
            self.receiver_done.set()

    async def _receive_events(self) -> None:
        while True:
            event = await self._receive()
            said = self.turn.feed(event, self.loop.time())
            if said is not None:
                self.listener.said(said)
            if event.get("type") == "error":
                self.listener.error(event.get("error") or {})
            elif event.get("type") in ("response.output_audio.delta", "response.audio.delta"):
                self.listener.replied(self.turn.reply_seconds)
            self.changed.set()

    async def _until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self.changed.clear()
            await self.changed.wait()


def _first(group: BaseExceptionGroup[BaseException], kind: type[TalkError]) -> BaseException:
    """The first ``kind`` error in a (nested) group; the group itself when it has none."""
    found: BaseException | None = group.subgroup(kind)
    if found is None:
        return group
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found
