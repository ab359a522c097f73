"""Noticing that the config file changed on disk, for `[server] watch_config`.

Polls the file's identity (device, inode, modification time, size) through every symlink.
A Kubernetes ConfigMap volume updates by pointing a `..data` symlink at a new directory, so
the file's own mtime may not change but the inode behind the path does. A file that is
missing or unreadable for a moment (mid-update) is waited out, not reported.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

# Often enough for an operator; a stat every two seconds costs nothing.
POLL_SECONDS = 2.0
Signature = tuple[int, int, int, int]


def signature(path: str | Path) -> Signature | None:
    try:
        st = os.stat(path)  # follows symlinks: the file the path leads to now
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def watch_file(
    path: str | Path,
    on_change: Callable[[], Awaitable[Any]],
    *,
    poll_seconds: float = POLL_SECONDS,
) -> Coroutine[Any, Any, None]:
    """A coroutine calling ``on_change`` (and awaiting it) each time the file at ``path`` is
    another one than now: the file as it is when this is called, not when the coroutine
    first runs."""
    return _watch(path, on_change, poll_seconds, signature(path))


async def _watch(
    path: str | Path,
    on_change: Callable[[], Awaitable[Any]],
    poll_seconds: float,
    last: Signature | None,
) -> None:
    while True:
        await asyncio.sleep(poll_seconds)
        now = signature(path)
        if now is not None and now != last:
            last = now
            await on_change()
