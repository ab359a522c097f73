"""relay/session/_accel.c under AddressSanitizer and UndefinedBehaviorSanitizer.

Its inputs are hostile clients' frames. Here it is compiled with both sanitizers and fed
mutated frames (a quote, a backslash, a brace, padding or a space put in, taken out or
changed; truncations) and random masks, in a child process with the sanitizers' runtime
preloaded: a read or write out of bounds, or undefined behaviour, ends the child with the
sanitizer's report. Each answer is also compared with the Python reference.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "relay" / "session" / "_accel.c"

FUZZ = r"""
import base64, importlib.machinery, importlib.util, random, sys
spec = importlib.util.spec_from_loader(
    "relay.session._accel", importlib.machinery.ExtensionFileLoader("relay.session._accel", sys.argv[1])
)
accel = importlib.util.module_from_spec(spec)
spec.loader.exec_module(accel)
sys.modules["relay.session._accel"] = accel
from relay.session import codec, frames
from relay.session.lane import PyLane
assert codec.fixed_append_size is accel.fixed_append_size, "the sanitized build is not the one run"
rng = random.Random(int(sys.argv[2]))
bounds, delta = [0.001, 0.01, float("inf")], "response.output_audio.delta"
tallies = ({}, {}), ({}, {})
c_lane, py_lane = accel.Lane(*tallies[0], bounds, 1400, 1000), PyLane(*tallies[1], bounds, 1400, 1000)
seeds = [s.encode() for s in (
    '{"type":"input_audio_buffer.append","audio":"%s"}',
    '{"type": "input_audio_buffer.append", "event_id": "x", "audio": "%s"}',
    '{"event_id":"e","type":"input_audio_buffer.append","audio":"%s"}',
    '{"type":"response.output_audio.delta","delta":"%s"}')]
alphabet = b'"\\}{=: ,aQ'
# A seed with up to three bytes put in, taken out or changed, and now and then cut.
def mutated(seed, alphabet):
    frame = bytearray(seed)
    for _ in range(rng.randrange(4)):
        at = rng.randrange(len(frame) + 1)
        op = rng.randrange(3)
        if op == 0 and frame:
            frame[min(at, len(frame) - 1)] = rng.choice(alphabet)
        elif op == 1:
            frame[at:at] = bytes([rng.choice(alphabet)])
        else:
            del frame[at : at + rng.randrange(1, 5)]
    if rng.random() < 0.1:
        frame = frame[: rng.randrange(len(frame) + 1)]
    return bytes(frame)
for _ in range(int(sys.argv[3])):
    b = mutated(rng.choice(seeds) % base64.b64encode(rng.randbytes(rng.randrange(40))), alphabet)
    assert accel.fixed_append_size(b) == codec._fixed_append_size(b), b
    assert accel.delta_to_the_end(b) == codec._delta_to_the_end(b), b
    mask, masked = rng.getrandbits(32), rng.random() < 0.5
    assert accel.text_frame(b, masked, mask) == bytes(frames._text_frame(b, masked, mask)), b
    assert c_lane.append(b) == py_lane.append(b), b
    assert c_lane.delta(delta, b) == py_lane.delta(delta, b), b
    c_lane.written(rng.random())
assert tallies[0] == tallies[1] and c_lane.bytes == py_lane.bytes
c_lane.drain()
for size in (0, 1, 7, 8, 9, 125, 126, 127, 65535, 65536, 65537, 1 << 20):
    b = rng.randbytes(size)
    assert accel.text_frame(b, True, 0xDEADBEEF) == bytes(frames._text_frame(b, True, 0xDEADBEEF))
# The splitter on streams of frames, large and not, and on bytes that are no frames, cut
# into reads anywhere (its answers are held to aiohttp's reader in tests/unit/test_splitter.py).
for _ in range(int(sys.argv[3]) // 20):
    masked = rng.random() < 0.5
    splitter = accel.Splitter(None, masked, 16, 1 << 12)
    stream = bytearray()
    for _ in range(rng.randrange(1, 6)):
        payload = rng.randbytes(rng.choice((0, 5, 16, 17, 200, 70000)))
        stream += frames._text_frame(payload, masked, rng.getrandbits(32))
    if rng.random() < 0.3:
        stream[rng.randrange(len(stream))] = rng.randrange(256)
    if rng.random() < 0.1:
        stream = bytearray(rng.randbytes(rng.randrange(200)))
    at = 0
    while at < len(stream):
        step = rng.randrange(1, 300)
        splitter.split(bytes(stream[at : at + step]))
        at += step
# The same with budgets (a team's under the process's), small enough to refuse some frames:
# whatever was counted is given back once the splitters are gone.
process = accel.MessageBudget(rng.randrange(1, 1 << 16), small=rng.randrange(64))
team = accel.MessageBudget(rng.randrange(0, 1 << 15), small=rng.randrange(64), parent=process)
for _ in range(int(sys.argv[3]) // 20):
    splitters = [accel.Splitter(None, True, 16, 1 << 12, team) for _ in range(3)]
    for splitter in splitters:
        stream = bytearray()
        for _ in range(rng.randrange(1, 6)):
            payload = rng.randbytes(rng.choice((0, 5, 16, 17, 200, 3000)))
            fin = rng.random() < 0.7
            stream += bytes([0x81 if fin else 0x01]) + frames._text_frame(payload, True, 1)[1:]
        if rng.random() < 0.3:
            stream[rng.randrange(len(stream))] = rng.randrange(256)
        at = 0
        while at < len(stream):
            step = rng.randrange(1, 300)
            splitter.split(bytes(stream[at : at + step]))
            at += step
    del splitter, splitters
    assert (team.held, process.held) == (0, 0), (team.held, process.held)
# The event scan (held to the strict parse in tests/unit/test_scan_event.py) on mutated JSON.
def verdict(read, b):
    try:
        found = read(b)
    except codec.FrameError as exc:
        return exc.code
    return found[0], found[-1]
events = [s.encode() for s in (
    '{"type":"conversation.item.create","item":{"type":"message","content":[{"type":"input_text","text":"a\\nb"}]}}',
    '{"audio":"QUJD\\u0041","type":"input_audio_buffer.append","n":[1,-2.5e3,true,null,{"k":"\\ud83d\\ude00"}]}',
    '{"\\u0074ype":"x","a":{"b":1,"c":[[],{}]},"s":"\u00e9\U0001f600"}')]
for _ in range(int(sys.argv[3])):
    b = mutated(rng.choice(events), b'"\\}{][=:, aQu0e.-+tfn')
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        continue  # refused before it is judged (1007)
    assert verdict(codec.read_scanned, b) == verdict(codec.read_parsed, b), b
# The UTF-8 check on mutated text, cut anywhere.
text = "aé你😀\u0080\u07ff\u0800\uffff\U00010000\U0010ffff".encode()
for _ in range(int(sys.argv[3])):
    data = bytearray(text * rng.randrange(1, 4))
    for _ in range(rng.randrange(3)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    b = bytes(data[rng.randrange(len(data) + 1):])
    assert accel.is_utf8(b) == codec._is_utf8(b), b
print("clean")
"""


def _runtime(compiler: str, name: str) -> str | None:
    found = subprocess.run(
        [compiler, f"-print-file-name={name}"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


def test_the_c_scans_and_framing_are_clean_under_the_sanitizers(tmp_path: Path) -> None:
    compiler = shutil.which("gcc")
    runtimes = (
        [_runtime(compiler, "libasan.so"), _runtime(compiler, "libubsan.so")] if compiler else []
    )
    if compiler is None or None in runtimes:
        # Debian's gcc brings both runtimes (libgcc-12-dev); the relay's own build needs gcc too.
        reason = "gcc with its libasan and libubsan is not installed (apt-get install gcc)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    built = tmp_path / ("_accel" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(
        [
            compiler, "-shared", "-fPIC", "-g", "-O1", "-fno-omit-frame-pointer",
            "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-Wall", "-Wextra",
            "-Werror", f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", str(built),
        ],
        check=True,
    )  # fmt: skip
    env = {
        **os.environ,
        "LD_PRELOAD": ":".join(r for r in runtimes if r),
        # CPython's own allocations are not what this looks at, and it leaks at exit by design.
        "ASAN_OPTIONS": "detect_leaks=0",
        # Every object from malloc, so ASan sees the bounds of each `bytes` (pymalloc's pools
        # would hide a small frame's).
        "PYTHONMALLOC": "malloc",
        "UBSAN_OPTIONS": "print_stacktrace=1",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", FUZZ, str(built), "14", "40000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "clean", done.stderr[-4000:]
