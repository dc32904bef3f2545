"""JSON description files (a run's ``jaxgpt.json``, a dataset's ``meta.json``): written whole, read back checked."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jaxgpt.core.errors import UserError


def write_json(path: str | os.PathLike, value: Any, end: str = "") -> None:
    """``value`` as indented JSON (then ``end``) in a temporary file, then a rename: never half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + end)
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, key: str, kind: type, lacks: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``, whose ``key`` must hold a ``kind``; else one UserError, ``{path} {lacks}; {fix}``
    (or ``{path} is damaged (...); {fix}`` for text that is not JSON), never a traceback."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path} is damaged ({err}); {fix}") from None
    if not isinstance(value, dict) or not isinstance(value.get(key), kind):
        raise UserError(f"{path} {lacks}; {fix}")
    return value
