"""Profiling the relay under load with py-spy, and reading the profile.

`Recorder` attaches ``py-spy record --format raw`` (folded stacks, one line per distinct
stack: ``frame;frame;... count``) to the path's processes for the measured window. The
folded file opens in speedscope or inferno/flamegraph.pl as it is. `summarize` turns it into
five views:

- *self by package*: the innermost frame's package (asyncio, aiohttp, relay, ...), system
  calls, or other native code;
- *self*: the innermost frame of each sample (where the CPU actually is, any code);
- *attributed to relay code*: each sample charged to the innermost frame in the relay's own
  package above the event loop's dispatch, i.e. that function's own lines plus the library
  calls it makes directly;
- *relay lines*: the same, by line, with the function that line was calling;
- *inclusive relay*: every relay function above the loop, counted once per sample.

Run alone: ``python -m bench.profile FOLDED [--own relay/]``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
TOP = 15
VIEWS = ("self_by_package", "attributed_to_relay_code", "relay_lines", "inclusive_relay", "self")
# The event loop's dispatch frames (asyncio's; uvloop's are native and never appear).
_LOOP_FILES = frozenset({"asyncio/events.py", "asyncio/base_events.py"})
_LOOP_FUNCTIONS = frozenset({"_run", "_run_once", "run_forever", "run_until_complete"})
# uvloop's and the C task's dispatch, as native frames show them.
_NATIVE_DISPATCH = frozenset(
    {"Handle__run", "TimerHandle__run", "task_step_impl", "uv_run", "uv__io_poll"}
)
_SYSCALLS = frozenset(
    {"write", "read", "send", "recv", "sendto", "recvfrom", "sendmsg", "recvmsg", "writev",
     "readv", "epoll_wait", "epoll_pwait", "epoll_ctl", "__libc_write", "__libc_read"}
)  # fmt: skip


class Recorder:
    """``py-spy record`` on a process (and its children) for a number of seconds."""

    def __init__(self, output: Path, *, rate: int = 200, native: bool = True) -> None:
        self.output = output
        self.rate = rate
        # Native frames too (C extensions, uvloop, libc): shows the time in system calls,
        # which would otherwise be charged to the Python line that made them.
        self.native = native
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))

    def available(self) -> bool:
        return Path(self.binary).exists()

    def __call__(self, pids: list[int], seconds: float) -> None:
        if not pids:
            return
        command = [
            self.binary, "record", "--pid", str(pids[0]), "--duration", str(max(1, round(seconds))),
            "--rate", str(self.rate), "--format", "raw", "--subprocesses",
            "--output", str(self.output), *(["--native"] if self.native else []),
        ]  # fmt: skip
        log = self.output.with_suffix(".log").open("wb")
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 30.0) -> bool:
        if self.proc is None:
            return False
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        return self.output.exists()


def _frame_key(frame: str) -> tuple[str, str]:
    """(function label, file) for a py-spy frame ``name (file:line)``."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), ""
    file = match["file"]
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in file:
            file = file.split(marker, 1)[1]
            if marker == "/lib/python3.":
                file = file.split("/", 1)[-1]
            break
    else:
        file = re.sub(r"^.*?/(relay|bench)/", r"\1/", file)
    return f"{match['name']} ({file})", file


def read_folded(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _package(label: str, file: str) -> str:
    """What a leaf frame belongs to: a Python package ("aiohttp", "relay", "asyncio"), the
    system calls, or other native code (CPython, uvloop, libuv, C extensions)."""
    if file.startswith("libc.so"):
        name = label.split(" ")[0]
        return "(system calls)" if name in _SYSCALLS else "(native: libc)"
    if file.endswith((".c", ".h")) or ".so" in file or file.startswith("0x") or not file:
        return "(native: CPython, uvloop, C extensions)"
    return file.split("/", 1)[0].removesuffix(".py")


def _after_loop(keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The frames above the event loop's dispatch: what the callback or task is doing.

    Without this, every sample would be charged to whoever called ``asyncio.run``.
    """
    for index in range(len(keys) - 1, -1, -1):
        label, file = keys[index]
        name = label.split(" ")[0].rsplit(".", 1)[-1]
        if (file in _LOOP_FILES and name in _LOOP_FUNCTIONS) or name in _NATIVE_DISPATCH:
            return keys[index + 1 :]
    return keys


def _hot_line(frames: list[str], keys: list[tuple[str, str]], own: str) -> str:
    """The innermost relay line above the loop, and what it was calling."""
    above = len(keys) - len(_after_loop(keys))
    for index in range(len(keys) - 1, above - 1, -1):
        if keys[index][1].startswith(own):
            match = _FRAME.match(frames[index].strip())
            line = f":{match['line']}" if match and match["line"] else ""
            callee = keys[index + 1][0] if index + 1 < len(keys) else "(its own code)"
            return f"{keys[index][1]}{line} {keys[index][0].split(' ')[0]} -> {callee}"
    return "(no relay frame: event loop, aiohttp I/O)"


def summarize(path: Path, own: str = "relay/") -> dict[str, list[tuple[str, float]]]:
    stacks = read_folded(path)
    total = sum(count for _, count in stacks) or 1
    selfs: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    attributed: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    for frames, count in stacks:
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        keys = [_frame_key(frame) for frame in frames]
        if not keys:
            continue
        lines[_hot_line(frames, keys, own)] += count
        selfs[keys[-1][0]] += count
        packages[_package(*keys[-1])] += count
        mine = [label for label, file in _after_loop(keys) if file.startswith(own)]
        attributed[mine[-1] if mine else "(no relay frame: event loop, aiohttp I/O)"] += count
        for label in set(mine):
            inclusive[label] += count

    def top(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(label, round(100 * n / total, 1)) for label, n in counter.most_common(TOP)]

    return {
        "samples": [("total", float(total))],
        "self_by_package": top(packages),
        "self": top(selfs),
        "attributed_to_relay_code": top(attributed),
        "inclusive_relay": top(inclusive),
        "relay_lines": top(lines),
    }


def format_summary(summary: dict[str, list[tuple[str, float]]]) -> str:
    lines = [f"samples: {int(summary['samples'][0][1])}"]
    for view in VIEWS:
        lines.append(f"\n{view.replace('_', ' ')} (% of samples):")
        lines += [f"  {pct:5.1f}  {label}" for label, pct in summary[view]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("folded", type=Path)
    parser.add_argument("--own", default="relay/", help="path prefix of the code to attribute to")
    args = parser.parse_args(argv)
    print(format_summary(summarize(args.folded, args.own)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
