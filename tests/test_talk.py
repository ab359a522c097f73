"""`relay talk` against the relay `make run` starts (config/local.toml), as a user runs it."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from relay.cli import main
from tests.processes import free_port

ROOT = Path(__file__).parent.parent
HELLO = ROOT / "examples" / "hello.wav"
needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None and not os.environ.get("CI"),
    reason="needs espeak-ng to synthesise speech (apt-get install espeak-ng; .ci/run installs "
    "it, and in CI its absence fails the test instead)",
)


async def relay_talk(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "talk", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=45)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def read_reply(path: Path) -> tuple[int, np.ndarray]:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (1, 2)
        return wav.getframerate(), np.frombuffer(wav.readframes(wav.getnframes()), "<i2")


def assert_real_reply(path: Path) -> None:
    rate, samples = read_reply(path)
    assert rate == 24000
    assert len(samples) / rate > 0.5
    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))
    assert rms > 300, f"the reply is (nearly) silent: RMS {rms:.0f}"


async def test_the_shipped_sample_gets_a_spoken_reply(local_relay, tmp_path):
    out = tmp_path / "reply.wav"
    url = f"ws://127.0.0.1:{local_relay.port}"
    code, stdout, stderr = await relay_talk(str(HELLO), "--url", url, "--out", str(out))
    assert code == 0, stderr
    lines = stdout.splitlines()
    # The simulator's transcript of the speech VAD heard (3.0 s), and its reply quoting it.
    assert "user: Hello, this is 3.0 seconds of simulated speech." in lines
    assert "assistant: You said: Hello, this is 3.0 seconds of simulated speech." in lines
    assert lines[-2].startswith(f"reply: {out} (")
    assert lines[-1].startswith("time to first audio: ")
    assert "audio chunks: " in lines[-1] and "tokens: " in lines[-1]
    assert_real_reply(out)


@needs_espeak
async def test_espeak_speech_at_another_rate_gets_a_spoken_reply(local_relay, tmp_path):
    speech = tmp_path / "speech.wav"
    espeak = await asyncio.create_subprocess_exec(
        "espeak-ng", "-v", "en-us", "-w", str(speech), "Please read me the news headlines"
    )
    assert await espeak.wait() == 0
    with wave.open(str(speech), "rb") as wav:
        assert wav.getframerate() != 24000  # espeak-ng writes 22050 Hz: talk resamples
    out = tmp_path / "reply.wav"
    url = f"ws://127.0.0.1:{local_relay.port}"
    code, stdout, stderr = await relay_talk(str(speech), "--fast", "--url", url, "--out", str(out))
    assert code == 0, stderr
    assert any(line.startswith("user: Hello, this is ") for line in stdout.splitlines())
    assert any(line.startswith("assistant: You said: ") for line in stdout.splitlines())
    assert_real_reply(out)


async def test_text_instead_of_audio(local_relay, tmp_path):
    out = tmp_path / "reply.wav"
    url = f"ws://127.0.0.1:{local_relay.port}"
    code, stdout, stderr = await relay_talk("--text", "Hi there", "--url", url, "--out", str(out))
    assert code == 0, stderr
    assert "user: Hi there" in stdout.splitlines()
    assert "assistant: You said: Hi there" in stdout.splitlines()
    assert_real_reply(out)


async def test_a_wrong_key_shows_the_relays_error_code(local_relay, tmp_path, capsys):
    url = f"ws://127.0.0.1:{local_relay.port}"
    args = ["talk", str(HELLO), "--url", url, "--key", "rk-wrong", "--out", str(tmp_path / "r.wav")]
    assert await asyncio.to_thread(main, args) == 1
    err = capsys.readouterr().err
    assert (
        "refused the session (close code 4401): invalid_api_key: The relay key is not valid." in err
    )
    assert "rk-wrong" not in err
    assert not (tmp_path / "r.wav").exists()


def test_no_relay_running_says_so(tmp_path, capsys):
    url = f"ws://127.0.0.1:{free_port()}"
    assert main(["talk", str(HELLO), "--url", url, "--out", str(tmp_path / "r.wav")]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach a relay at {url}" in err and "is it running?" in err


@pytest.mark.parametrize(
    ("content", "says"),
    [(None, "no such file"), (b"not audio at all", "not a PCM WAV file"), (b"", "not a PCM WAV")],
)
def test_an_unreadable_wav_says_why(tmp_path, capsys, content, says):
    path = tmp_path / "in.wav"
    if content is not None:
        path.write_bytes(content)
    assert main(["talk", str(path), "--out", str(tmp_path / "r.wav")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"relay talk: {path}: ") and says in err


def test_a_wav_or_a_text_not_both(capsys):
    assert main(["talk", str(HELLO), "--text", "hi"]) == 2
    assert main(["talk"]) == 2
    assert capsys.readouterr().err.count("give a WAV file or --text") == 2


# --- failures after the session started, against a scripted server ---------------------


def scripted_server(script):
    from aiohttp import web

    async def handler(request):
        ws = web.WebSocketResponse(protocols=("realtime",))
        await ws.prepare(request)
        await ws.send_str(
            '{"type":"session.created","session":{"audio":{"input":{"turn_detection":null}}}}'
        )
        await script(ws)
        return ws

    app = web.Application()
    app.router.add_get("/openai/v1/realtime", handler)
    return app


def listener(seen):
    from relay.talk.client import Listener

    return Listener(
        uploaded=lambda s: None,
        said=seen.append,
        replied=lambda s: None,
        error=lambda e: seen.append(e),
    )


async def test_a_session_closed_midway_says_how(start_fake):
    from relay.talk.client import TalkError, TalkOptions, talk

    async def close_on_commit(ws):
        async for message in ws:
            if '"input_audio_buffer.commit"' in message.data:
                error = {"type": "server_error", "code": "upstream_disconnected", "message": "gone"}
                await ws.send_json({"type": "error", "error": error})
                await ws.close(code=1011, message=b"upstream lost")

    server = await start_fake(scripted_server(close_on_commit))
    seen: list = []
    options = TalkOptions(
        url=f"ws://127.0.0.1:{server.port}", key="k", deployment="d", audio=bytes(4800), fast=True
    )
    with pytest.raises(
        TalkError, match=r"closed the connection \(close code 1011\): upstream_disconnected: gone"
    ):
        await talk(options, listener(seen))
    assert seen == [{"type": "server_error", "code": "upstream_disconnected", "message": "gone"}]


async def test_no_reply_times_out(start_fake):
    from relay.talk.client import TalkError, TalkOptions, talk

    async def silent(ws):
        async for _ in ws:
            pass

    server = await start_fake(scripted_server(silent))
    options = TalkOptions(
        url=f"ws://127.0.0.1:{server.port}", key="k", deployment="d", text="hi",
        reply_timeout_seconds=0.2,
    )  # fmt: skip
    with pytest.raises(TalkError, match="no complete reply within 0.2 s"):
        await talk(options, listener([]))
