"""Config fields that carry their own command-line help, so a dataclass is its own documentation."""

from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its one-line help (``jaxgpt.core.cli`` turns it into ``--name``);
    ``cli=False`` hides it."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})
