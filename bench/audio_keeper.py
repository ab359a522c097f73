"""Audio replay's costs, measured (`python -m bench.audio_keeper`): the pump hook per append,
kept references against decoding at append, joining a replay's base64 against decoding and
re-encoding it, and memory.

One process, no sockets: perf_counter over many calls (distinct frames, so cache-cold: in
the pump the codec has just read the frame), tracemalloc for memory.
"""

from __future__ import annotations

import base64
import binascii
import time
import tracemalloc
from collections.abc import Callable

import orjson

from relay.session.audio_keeper import AudioKeeper
from relay.session.codec import ClientFrame, read_client_frame

MANUAL = {"audio": {"input": {"turn_detection": None}}}
_HEAD = len(b'{"type":"input_audio_buffer.append","audio":"')


def frames(chunk_ms: int, seconds: float) -> list[bytes]:
    """Appends of ``chunk_ms`` of 24 kHz PCM16, as the SDKs build them, each its own object."""
    raw = bytes(range(256)) * (chunk_ms * 48 // 256 + 1)
    audio = base64.b64encode(raw[: chunk_ms * 48]).decode()
    count = int(seconds * 1000 / chunk_ms)
    return [
        orjson.dumps({"type": "input_audio_buffer.append", "audio": audio}) for _ in range(count)
    ]


def per_call(run: Callable[[list[bytes], list[ClientFrame]], None], sent: list[bytes]) -> float:
    """Nanoseconds a frame, the best of five runs (the machine is shared)."""
    read = [read_client_frame(f) for f in sent]
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        run(sent, read)
        best = min(best, time.perf_counter() - began)
    return best / len(sent) * 1e9


def hook_off(sent: list[bytes], read: list[ClientFrame]) -> None:
    keeper: AudioKeeper | None = None
    for frame, (kind, _, size) in zip(sent, read, strict=True):
        if keeper is not None and kind.startswith("input_audio_buffer."):
            keeper.client_event(kind, frame, size)


def hook_references(sent: list[bytes], read: list[ClientFrame]) -> None:
    keeper: AudioKeeper | None = AudioKeeper(120.0)
    for frame, (kind, _, size) in zip(sent, read, strict=True):
        if keeper is not None and kind.startswith("input_audio_buffer."):
            keeper.client_event(kind, frame, size)


def decode_each(sent: list[bytes], read: list[ClientFrame]) -> None:
    held = [binascii.a2b_base64(f[_HEAD:-2], strict_mode=True) for f in sent]
    assert len(held) == len(read)


def main() -> None:
    for chunk_ms in (20, 100):
        sent = frames(chunk_ms, 60.0)
        print(f"{chunk_ms} ms appends ({chunk_ms * 48} bytes of audio, {len(sent[0])} of frame):")
        print(f"  hook, continuity off or replay = text: {per_call(hook_off, sent):.0f} ns")
        print(f"  hook, replay = audio (references):      {per_call(hook_references, sent):.0f} ns")
        print(f"  decoding each append instead:            {per_call(decode_each, sent):.0f} ns")
        keeper = AudioKeeper(120.0)
        for frame in sent:
            keeper.client_event("input_audio_buffer.append", frame, chunk_ms * 48)
        keeper.client_event("input_audio_buffer.commit", b"{}", 0)
        keeper.observe("input_audio_buffer.committed", {"item_id": "u1"}, MANUAL)
        pieces = keeper.items["u1"].pieces
        join_ms = decode_ms = float("inf")
        for _ in range(5):
            began = time.perf_counter()
            audio = keeper.audio_of("u1")
            join_ms = min(join_ms, (time.perf_counter() - began) * 1000)
            began = time.perf_counter()
            raw = b"".join(
                binascii.a2b_base64(f[s:e], strict_mode=True) for (f, s, e, _, _), _, _ in pieces
            )
            decoded = base64.b64encode(raw).decode()
            decode_ms = min(decode_ms, (time.perf_counter() - began) * 1000)
        assert audio == decoded
        print(f"  replaying 60 s: joined as it came {join_ms:.1f} ms; decoded and re-encoded "
              f"{decode_ms:.1f} ms")  # fmt: skip

    sent = frames(100, 60.0)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    references_held = list(sent)  # what keeping references holds: the frames themselves
    held = tracemalloc.get_traced_memory()[0] - before + sum(len(f) + 33 for f in sent)
    del references_held
    before = tracemalloc.get_traced_memory()[0]
    decoded_held = [binascii.a2b_base64(f[_HEAD:-2]) for f in sent]
    decoded_bytes = tracemalloc.get_traced_memory()[0] - before
    del decoded_held
    tracemalloc.stop()
    print(f"memory for 60 s kept (100 ms appends): references {held / 60 / 1024:.1f} KiB/s, "
          f"decoded {decoded_bytes / 60 / 1024:.1f} KiB/s")  # fmt: skip


if __name__ == "__main__":
    main()
