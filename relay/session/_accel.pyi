import builtins
from collections.abc import Sequence
from typing import Any

# relay/session/_accel.c: each function's Python reference is named in its comment there.
# text_frame returns bytes; typed as its Python reference (frames._text_frame) is, which the
# relay runs in its place where the module was not built.
def fixed_append_size(frame: bytes, /) -> int: ...
def delta_to_the_end(frame: bytes, /) -> int: ...
def text_frame(payload: bytes, masked: bool, mask: int, /) -> bytes | bytearray: ...

# (0, type_start, type_end, audio_start, audio_end) | (2, ...) not an object | (3, key)
# duplicate | (4, byte) invalid | (5, ...) nested too deep: codec.read_scanned reads it.
def scan_event(frame: bytes, max_digits: int, /) -> tuple[Any, ...]: ...
def is_utf8(data: bytes, /) -> bool: ...

class Lane:
    """relay.session.lane.PyLane is the reference: the same signatures."""

    turn_pending: bool
    @property
    def bytes(self) -> int: ...
    def __init__(
        self,
        events: dict[str, int],
        chunks: dict[int, int],
        bounds: Sequence[float],
        max_frame: int = -1,
        max_audio: int = -1,
    ) -> None: ...
    def append(self, frame: builtins.bytes, /) -> int: ...
    def delta(self, kind: str, frame: builtins.bytes, /) -> int: ...
    def written(self, arrived: float, /) -> None: ...
    def drain(self) -> tuple[int, list[int], float]: ...

class MessageBudget:
    """The bytes of client messages a process holds while they arrive."""

    limit: int
    @property
    def small(self) -> int: ...
    @property
    def held(self) -> int: ...
    @property
    def parent(self) -> MessageBudget | None: ...
    def __init__(
        self, limit: int, small: int = 65536, parent: MessageBudget | None = None
    ) -> None: ...

class Splitter:
    """A connection's large text frames, filled past aiohttp's reader."""

    @property
    def queue(self) -> Any: ...
    @property
    def budget(self) -> MessageBudget | None: ...
    @property
    def masked(self) -> int: ...
    def __init__(
        self,
        queue: Any,
        masked: bool,
        large: int,
        max_size: int,
        budget: MessageBudget | None = None,
    ) -> None: ...
    # (True, payload): a large frame's message; (False, data): bytes for the reader;
    # (None, length): a frame the budget refused (nothing after it is read).
    def split(self, data: builtins.bytes, /) -> list[tuple[bool | None, Any]] | None: ...

MAX_FRAGMENTS: int
