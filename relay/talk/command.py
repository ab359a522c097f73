"""`relay talk IN.wav`: the command line, a progress display, and the closing summary."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from relay.talk.client import Listener, TalkOptions, TalkResult
    from relay.talk.turn import Said

# What `make run` serves (config/local.toml): its address, demo key and deployment.
DEFAULT_URL = "ws://127.0.0.1:8080"
DEFAULT_KEY = "rk-local-demo"
DEFAULT_DEPLOYMENT = "gpt-realtime"
INSTALL_HINT = "relay talk needs the `talk` extra: pip install 'realtime-relay[talk]'"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    talk = commands.add_parser(
        "talk",
        help="say a WAV file (or a text) to a relay; write the spoken reply to a WAV file",
        description="Stream a WAV file to a relay at real-time pace, print both transcripts "
        "as they stream and write the reply's audio to a WAV file. The defaults reach the "
        "relay `make run` starts.",
    )
    talk.add_argument(
        "wav", nargs="?", type=Path, metavar="IN.wav", help="any rate, width, channels"
    )
    talk.add_argument("--text", help="send this text message instead of a WAV file")
    talk.add_argument("--out", type=Path, default=Path("reply.wav"), help="default: reply.wav")
    talk.add_argument("--url", default=DEFAULT_URL, help=f"relay address (default: {DEFAULT_URL})")
    talk.add_argument(
        "--key", help=f"relay key (default: $RELAY_KEY, else the demo key {DEFAULT_KEY})"
    )
    talk.add_argument("--deployment", default=DEFAULT_DEPLOYMENT, help="default: %(default)s")
    talk.add_argument(
        "--fast", action="store_true", help="send audio as fast as the relay takes it"
    )
    talk.set_defaults(func=run)


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if (args.wav is None) == (args.text is None):
        # Command-line usage errors go to stderr, as argparse's own do (not a log line).
        sys.stderr.write("relay talk: give a WAV file or --text, one of the two\n")
        return 2
    try:
        from rich.console import Console

        from relay.talk.audio import WavError, read_wav
        from relay.talk.client import TalkError, TalkOptions
    except ImportError:
        sys.stderr.write(f"relay talk: {INSTALL_HINT}\n")  # rich itself may be missing
        return 2
    console = Console(highlight=False, soft_wrap=True)
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        audio = read_wav(args.wav) if args.wav is not None else b""
    except WavError as exc:
        errors.print(f"relay talk: {exc}", markup=False)
        return 2
    options = TalkOptions(
        url=args.url,
        key=args.key or environ.get("RELAY_KEY") or DEFAULT_KEY,
        deployment=args.deployment,
        audio=audio,
        text=args.text,
        fast=args.fast,
    )
    try:
        result = asyncio.run(_talk(options, console))
    except TalkError as exc:
        errors.print(f"relay talk: {exc}", markup=False)
        return 1
    from relay.talk.audio import write_wav

    write_wav(args.out, bytes(result.turn.reply_audio))
    _summary(console, result, args.out)
    return 0


async def _talk(options: TalkOptions, console: Console) -> TalkResult:
    from rich.live import Live

    from relay.talk.audio import seconds
    from relay.talk.client import talk

    display = _Display(console, upload_seconds=seconds(len(options.audio)))
    with Live(display, console=console, transient=True, refresh_per_second=10):
        return await talk(options, display.listener())


class _Display:
    """Progress bars for the upload and the reply, and the transcript lines still streaming
    below them; finished lines are printed above, where they stay."""

    def __init__(self, console: Console, upload_seconds: float) -> None:
        from rich.progress import BarColumn, Progress, TextColumn

        self.console = console
        self.progress = Progress(
            TextColumn("{task.description:>6}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            console=console,
        )
        self.upload = self.progress.add_task(
            "you", total=upload_seconds or None, detail=f"0.0 / {upload_seconds:.1f} s"
        )
        self.reply = self.progress.add_task("reply", total=None, detail="waiting")
        self.upload_seconds = upload_seconds
        self.streaming: dict[str, tuple[str, str]] = {}

    def __rich__(self) -> RenderableType:
        from rich.console import Group
        from rich.text import Text

        lines = [
            Text.assemble((f"{role}: ", "bold"), text) for role, text in self.streaming.values()
        ]
        return Group(self.progress, *lines)

    def listener(self) -> Listener:
        from relay.talk.client import Listener

        return Listener(
            uploaded=self.uploaded, said=self.said, replied=self.replied, error=self.error
        )

    def uploaded(self, sent: float) -> None:
        self.progress.update(
            self.upload, completed=sent, detail=f"{sent:.1f} / {self.upload_seconds:.1f} s"
        )

    def replied(self, seconds: float) -> None:
        self.progress.update(self.reply, completed=seconds, detail=f"{seconds:.1f} s of audio")

    def said(self, said: Said) -> None:
        key = f"{said.role}:{said.key}"
        if said.final:
            self.streaming.pop(key, None)
            self.console.print(f"[bold]{said.role}:[/bold] ", said.text, sep="", markup=True)
        else:
            role, text = self.streaming.get(key, (said.role, ""))
            self.streaming[key] = (role, text + said.text)

    def error(self, error: dict[str, object]) -> None:
        self.console.print(f"error from the relay: {error.get('code')}: {error.get('message')}")


def _summary(console: Console, result: TalkResult, out: Path) -> None:
    turn = result.turn
    first = turn.first_audio_seconds
    tokens = turn.tokens
    console.print(
        f"reply: {out} ({turn.reply_seconds:.1f} s of 24 kHz audio)\n"
        f"time to first audio: {'-' if first is None else f'{first * 1000:.0f} ms'} · "
        f"audio chunks: {result.audio_chunks_out} sent, {turn.audio_chunks_in} received · "
        f"tokens: {tokens['input_tokens']} in, {tokens['output_tokens']} out "
        f"({tokens['total_tokens']} total)",
        markup=False,
    )
