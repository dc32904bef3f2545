"""Config fields that carry their own command-line help, so a dataclass is its own documentation."""

from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any, help: str, **tags: Any) -> Any:
    """A dataclass field with its one-line help (``jaxgpt.core.cli`` turns it into ``--name``);
    ``cli=False`` hides it. Other ``tags`` (``shape="weights"``, ``runtime=True``...) say what kind of
    field it is, so that lists of fields are read back with :func:`tagged`, not kept by hand."""
    return dataclasses.field(default=default, metadata={"help": help, **tags})


def tagged(cls: type, tag: str, *values: Any) -> tuple[str, ...]:
    """Names of ``cls``'s fields whose option sets ``tag`` (to one of ``values``, if given), in declaration order."""
    marks = {f.name: f.metadata.get(tag) for f in dataclasses.fields(cls)}
    return tuple(name for name, mark in marks.items() if mark not in (None, False) and (not values or mark in values))
