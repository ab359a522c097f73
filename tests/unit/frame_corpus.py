"""Audio frames in the layouts the fast paths answer, and their near misses: what the C
versions (relay/session/_accel.c) are held to their Python references on."""

from __future__ import annotations

import base64

AUDIO = base64.b64encode(bytes(range(256)) * 3 + b"\x01").decode()  # ends in "=="
APPENDS = [
    '{"type":"input_audio_buffer.append","audio":"%s"}',
    '{"type": "input_audio_buffer.append", "audio": "%s"}',
    '{"event_id": "ev_1", "type": "input_audio_buffer.append", "audio": "%s"}',
    '{"event_id":"ev_1","type":"input_audio_buffer.append","audio":"%s"}',
    '{"type":"input_audio_buffer.append","event_id":"ev_1","audio":"%s"}',
    '{"type": "input_audio_buffer.append", "event_id": "ev_1", "audio": "%s"}',
]
DELTAS = [
    '{"type":"response.output_audio.delta","event_id":"e","response_id":"r","item_id":"i",'
    '"output_index":0,"content_index":0,"delta":"%s"}',
    '{"type":"response.output_audio.delta","delta":"%s"}',
]
# Bytes that change what a scan finds.
NEAR_MISSES = b'"\\}{=: ,a'


def frames_from(layouts: list[str]) -> list[bytes]:
    """Each layout with audio of several sizes and paddings, and its near misses."""
    out = []
    for layout in layouts:
        for audio in ("", "=", "==", "QQ==", "QUI=", "QUJD", AUDIO, AUDIO[:-1], AUDIO[:-2]):
            frame = (layout % audio).encode()
            out.append(frame)
            out.extend(frame[:cut] for cut in range(len(frame) - len(audio)))
            out.extend(frame[:-cut] for cut in range(1, 4))
            for at in range(0, len(frame), max(1, len(frame) // 97)):
                out.extend(frame[:at] + bytes((b,)) + frame[at + 1 :] for b in NEAR_MISSES)
            out.append(frame + b" ")
            out.append(frame[:-1] + b',"audio":"QQ=="}')
    return out
