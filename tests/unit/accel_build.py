"""Whether relay/session/_accel.c was built, for the tests of its C types and functions."""

from __future__ import annotations

import os

import pytest

NOT_BUILT = (
    "relay/session/_accel.c was not built: there was no C compiler at `pip install` "
    "(apt-get install gcc, then make venv)"
)


def not_built() -> None:
    """The C module did not import: in CI that fails the tests (.ci/run builds it: the relay
    CI tests is the one that ships); elsewhere the caller skips what needs it."""
    if os.environ.get("CI"):
        pytest.fail(NOT_BUILT, pytrace=False)
