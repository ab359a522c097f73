"""What the running relay was built from, for `relay_build_info` and its start-up line."""

from __future__ import annotations

import os
import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# The image's build sets it (deploy/Dockerfile: --build-arg RELAY_BUILD_COMMIT=...).
COMMIT_ENV = "RELAY_BUILD_COMMIT"


@cache
def build_version() -> str:
    try:
        return version("realtime-relay")
    except PackageNotFoundError:
        return "unknown"


@cache
def build_commit() -> str:
    """The commit from the environment (images), else from the checkout (development)."""
    commit = os.environ.get(COMMIT_ENV, "").strip()
    if commit:
        return commit[:40]
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else "unknown"


@cache
def frame_scans() -> str:
    """ "c" when the per-frame scans run in relay/session/_accel.c, "python" when it was not
    built (no C compiler at install): the same answers, more CPU per frame."""
    try:
        import relay.session._accel  # noqa: F401
    except ImportError:
        return "python"
    return "c"
