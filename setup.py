"""The one C extension (relay/session/_accel.c); everything else is in pyproject.toml.

Optional: where it does not build (no C compiler), the relay runs its Python reference
versions of the same functions, more slowly."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "relay.session._accel",
            ["relay/session/_accel.c"],
            optional=True,
            extra_compile_args=["-Wall", "-Wextra"],
        )
    ]
)
