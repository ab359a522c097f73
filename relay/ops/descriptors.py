"""File descriptors: the limit raised at start-up, and the headroom a new session needs.

A session holds two descriptors (the client's connection and the upstream's), so a relay at
the common default soft limit of 1,024 runs out at about 480 sessions. Out of descriptors, it
fails silently: libuv (under uvloop) accepts each new connection it cannot keep and closes it
at once, so clients see the server disconnect, /healthz and /metrics too, and nothing is
logged. So the relay
- raises its soft limit to the hard limit at start-up, as Go's runtime and nginx's
  `worker_rlimit_nofile` do, and logs what it has (`raise_limit`);
- refuses a new session or call while fewer than `RESERVED` descriptors are free, and reports
  itself not ready meanwhile (`DescriptorWatch`): the reserve keeps health checks, scrapes and
  the sessions being set up working.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay.ops.process_collector import open_descriptors

# Free descriptors kept for health checks, scrapes, the upstream connections of sessions being
# set up, and the relay's own (Redis, Entra, logs).
RESERVED = 64
# Where the hard limit is unlimited: Linux's default ceiling (fs.nr_open).
_UNLIMITED_SOFT = 1 << 20
# Where the kernel does not give the count as the directory's size (before Linux 6.2): how
# long a listing is trusted, two descriptors added for each session let in since.
_LISTING_SECONDS = 0.1
_FD_DIRECTORY = "/proc/self/fd"


@dataclass(frozen=True, slots=True)
class DescriptorLimit:
    soft: int  # RLIM_INFINITY (-1) when unlimited
    hard: int
    was: int  # the soft limit before `raise_limit`

    @property
    def sessions(self) -> int | None:
        """About how many sessions the limit allows (None: no limit)."""
        if self.soft == resource.RLIM_INFINITY:
            return None
        return max(0, (self.soft - RESERVED) // 2)


def raise_limit() -> DescriptorLimit:
    """Raise this process's soft descriptor limit to its hard limit (which only root may
    raise); children (the workers) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DescriptorLimit(soft, hard, soft)
    wanted = _UNLIMITED_SOFT if hard == resource.RLIM_INFINITY else hard
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):  # above fs.nr_open: keep what there is
            return DescriptorLimit(soft, hard, soft)
        return DescriptorLimit(wanted, hard, soft)
    return DescriptorLimit(soft, hard, soft)


class DescriptorWatch:
    """Whether this process has the descriptors for one more session, with `RESERVED` to
    spare. About 2 us a check where the kernel counts them (Linux 6.2 and later)."""

    def __init__(
        self,
        *,
        reserved: int = RESERVED,
        fd_directory: str = _FD_DIRECTORY,
        limit: Callable[[], int] = lambda: resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reserved = reserved
        self._directory = fd_directory
        self._limit = limit
        self._clock = clock
        try:
            self._sized: bool | None = os.stat(fd_directory).st_size > 0
        except OSError:  # no /proc (not Linux): not watched
            self._sized = None
        self._listed = 0
        self._listed_at = -_LISTING_SECONDS

    def exhausted(self) -> bool:
        limit = self._limit()
        if limit == resource.RLIM_INFINITY or self._sized is None:
            return False
        room = limit - self.reserved
        if self._sized:
            return os.stat(self._directory).st_size >= room
        # A listing costs about 0.2 ms at 1,000 descriptors: between listings, count two for
        # each check that let a session in (closed sessions are not subtracted), and list
        # again before refusing.
        if self._clock() - self._listed_at >= _LISTING_SECONDS or self._listed >= room:
            self._listed = open_descriptors(self._directory)
            self._listed_at = self._clock()
        if self._listed >= room:
            return True
        self._listed += 2
        return False
