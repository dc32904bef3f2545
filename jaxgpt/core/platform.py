"""The platform a program is compiled for: JAX's backend, or a compile plan's target on a machine without it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

_platform_override: list[str] = []


def compile_platform() -> str:
    """The platform being compiled for: the plan's target while one is set, else JAX's default backend."""
    return _platform_override[-1] if _platform_override else jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    _platform_override.append(platform)
    try:
        yield
    finally:
        _platform_override.pop()
