"""Inside the relay process, for `bench.memory_profile`: snapshots on signals.

`python -c "import bench.memory_probe as p; p.install(); ..."` runs this before the relay's
own `main` (the relay is not changed for it). Then:

- SIGUSR1 (the baseline, before any measured session): a full collection; with
  ``BENCH_TRACEMALLOC=<frames>``, tracemalloc starts, with that many frames per traceback;
  the set of live objects is kept so the census below can tell per-session objects from
  those that were already there;
- SIGUSR2 (with the sessions open): a full collection, the tracemalloc snapshot (what was
  allocated since the baseline and is still alive) to ``$BENCH_PROBE_DIR/sessions.snap``,
  and the census (`census`) of what each live `Bridge` holds, as JSON to ``census.json``.

Each writes ``<name>.done`` last: the driver waits for it. Signal handlers run on the loop's
thread between bytecodes, so the loop is stopped while they look.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import tracemalloc
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

# Objects no session owns even when a session reaches them.
_SHARED_TYPES = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.CodeType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
)

_baseline: list[Any] = []
_baseline_ids: set[int] = set()


def install() -> None:
    signal.signal(signal.SIGUSR1, lambda *_: _safely("baseline", _take_baseline))
    signal.signal(signal.SIGUSR2, lambda *_: _safely("sessions", _take_sessions))


def _out() -> Path:
    return Path(os.environ["BENCH_PROBE_DIR"])


def _safely(name: str, job: Callable[[], None]) -> None:
    try:
        job()
    except Exception as exc:  # the relay goes on; the driver reads why
        (_out() / f"{name}.error").write_text(f"{type(exc).__name__}: {exc}")
    (_out() / f"{name}.done").write_text("")


def _snapshot(name: str) -> None:
    gc.collect()
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(str(_out() / f"{name}.snap"))


def _take_baseline() -> None:
    gc.collect()
    # The relay froze its start-up objects (gc.freeze), which gc.get_objects leaves out:
    # unfreeze to list them, then freeze again, as the relay would.
    gc.unfreeze()
    _baseline[:] = gc.get_objects()
    gc.freeze()
    _baseline_ids.clear()
    _baseline_ids.update(map(id, _baseline))
    _baseline_ids.add(id(_baseline))
    # Tracing from here (the relay's start-up under tracemalloc takes minutes): the sessions'
    # snapshot then holds what was allocated since, and is still alive.
    frames = int(os.environ.get("BENCH_TRACEMALLOC", "0"))
    if frames:
        tracemalloc.start(frames)


def _take_sessions() -> None:
    _snapshot("sessions")
    bridges = [o for o in gc.get_objects() if type(o).__name__ == "Bridge"]
    gc.unfreeze()
    result = census(bridges, _baseline_ids)
    gc.freeze()
    (_out() / "census.json").write_bytes(orjson.dumps(result))


def _attr(obj: Any, *names: str) -> Any:
    for name in names:
        if obj is None:
            return None
        obj = getattr(obj, name, None)
    return obj


def _roots(bridge: Any) -> list[tuple[str, Any]]:
    """A session's parts, by category, in the order their sizes are counted. An object
    reachable from several parts counts in the first; a part's traversal stops at the
    others' roots."""
    client, upstream = bridge.client, bridge.upstream
    request = _attr(client, "_req")
    protocol = _attr(request, "_protocol")
    response = _attr(upstream, "_response")
    connection = _attr(response, "_connection")
    group = bridge.tasks
    pumps = list(_attr(group, "_tasks") or ())
    # The connection's task (aiohttp's RequestHandler.start), which awaits the request's.
    handler = _attr(request, "_task") or _attr(protocol, "_task_handler")
    return [
        # A task's context (structlog's bound variables) is reached through the task.
        ("aiohttp's connection + request tasks, frames", (handler, _attr(handler, "get_coro")())),
        ("pump tasks + frames, TaskGroup", (group, pumps, [t.get_coro() for t in pumps])),
        ("meter (SessionMeter)", bridge.meter),
        ("session dict in force", bridge.session),
        ("greeting kept", bridge.greeting),
        ("translator / renewal", (bridge.translator, bridge.renewal)),
        ("client reader queue", _attr(client, "_reader")),
        ("client writer", _attr(client, "_writer")),
        ("client WebSocketResponse", client),
        ("client request + headers", request),
        ("client connection protocol", protocol),
        ("client transport", _attr(protocol, "transport")),
        ("upstream reader queue", _attr(upstream, "_reader")),
        ("upstream writer", _attr(upstream, "_writer")),
        ("upstream ClientWebSocketResponse", upstream),
        ("upstream ClientResponse", response),
        ("upstream connection + protocol", connection),
        ("upstream transport", _attr(upstream, "_writer", "transport")),
        ("policy (per team, shared)", bridge.policy),
        ("Bridge itself", bridge),
    ]


def census(bridges: Iterable[Any], baseline: set[int]) -> dict[str, Any]:
    """Bytes (sys.getsizeof, summed over objects made since the baseline) reachable from
    each part of each bridge, by category; and the type counts per category."""
    bridges = list(bridges)
    seen: set[int] = set(baseline)
    sizes: dict[str, int] = {}
    counts: dict[str, dict[str, int]] = {}
    large: dict[str, int] = {}
    for bridge in bridges:
        roots = _roots(bridge)
        root_ids = {id(obj) for _, obj in roots if obj is not None}
        for name, obj in roots:
            stop = root_ids - {id(obj)}
            size, by_type = _deep_size(obj, seen, stop, large, name)
            sizes[name] = sizes.get(name, 0) + size
            tally = counts.setdefault(name, {})
            for kind, n in by_type.items():
                tally[kind] = tally.get(kind, 0) + n
    return {"bridges": len(bridges), "bytes": sizes, "types": counts, "large": large}


def _deep_size(
    root: Any, seen: set[int], stop: set[int], large: dict[str, int], part: str
) -> tuple[int, dict[str, int]]:
    total = 0
    by_type: dict[str, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        key = id(obj)
        if key in seen or key in stop or isinstance(obj, _SHARED_TYPES):
            continue
        seen.add(key)
        size = sys.getsizeof(obj, 0)
        total += size
        kind = type(obj).__name__
        if size >= 1024:  # objects of 1 KiB and more, by part, type and size
            where = f"{part}: {kind} of {size} bytes"
            large[where] = large.get(where, 0) + 1
        by_type[kind] = by_type.get(kind, 0) + 1
        stack.extend(gc.get_referents(obj))
    return total, by_type
