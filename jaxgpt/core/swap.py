"""Replacing a whole directory at once: readers see the old contents or the new, never a mix.

The new contents are built in a sibling folder (same filesystem), then exchanged with the target
by ``renameat2(RENAME_EXCHANGE)`` where Linux offers it, else by two renames (between which the
target is briefly absent, never half-written). The old contents are deleted last.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def staging_dir(target: str | os.PathLike, purpose: str = "partial") -> Path:
    """A sibling of ``target`` to build its new contents in: ``.<name>.<purpose>``."""
    target = Path(target)
    return target.parent / f".{target.name}.{purpose}"


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def replace_dir(staged: Path, target: Path) -> None:
    """Makes ``staged`` the new ``target`` in one step; whatever ``target`` held before is removed."""
    if not target.exists():
        os.replace(staged, target)
        return
    if _exchange(staged, target):
        shutil.rmtree(staged)  # now holds the old contents
        return
    old = staging_dir(target, "old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(staged, target)
    shutil.rmtree(old)
