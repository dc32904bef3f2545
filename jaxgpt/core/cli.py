"""The one command-line layer: typed dataclasses in, argparse flags out.

Every dataclass field becomes ``--name`` with its type, default and the one-line
help kept in the field's metadata (see :func:`jaxgpt.core.options.option`). Entry points
parse with :func:`parse` and run through :func:`run`, which turns a
:class:`~jaxgpt.errors.UserError` (a mistyped flag included) into one line on stderr
and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

from jaxgpt.core.distributed import exit_process
from jaxgpt.core.errors import UserError

T = TypeVar("T")


def parse_bool(text: str) -> bool:
    """A flag's true/false text (also 1/0, yes/no, on/off); anything else is an argparse error."""
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, defaults: Any = None) -> None:
    """Adds one flag per field of ``cls``; ``defaults`` (an instance) overrides field defaults."""
    hints = typing.get_type_hints(cls)
    summary = (cls.__doc__ or "").strip().splitlines()[0]
    group = parser.add_argument_group(cls.__name__, None if summary == parser.description else summary)
    for field in dataclasses.fields(cls):
        if not field.init or field.metadata.get("cli") is False:
            continue
        tp, optional = _unwrap_optional(hints[field.name])
        default = getattr(defaults, field.name) if defaults is not None else field.default
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": field.name}
        if tp is bool:
            kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
        elif typing.get_origin(tp) is Literal:
            kwargs.update(type=str, choices=[str(c) for c in typing.get_args(tp)])
        elif tp in (int, float, str):
            metavar = tp.__name__.upper() + ("|none" if optional else "")  # `--top_k none` shows in --help
            kwargs.update(type=_none_or(tp) if optional else tp, metavar=metavar)
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: unsupported flag type {tp}")
        help_text = field.metadata.get("help", "")
        assert help_text, f"{cls.__name__}.{field.name} needs a help text"
        kwargs["help"] = help_text if "(default:" in help_text else f"{help_text} (default: {default})"
        group.add_argument(f"--{field.name}", **kwargs)


def _none_or(tp: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return None if text.lower() in ("none", "") else tp(text)

    convert.__name__ = tp.__name__
    return convert


def build(cls: type[T], namespace: argparse.Namespace, base: T | None = None) -> T:
    """An instance of ``cls`` from ``base`` (or the defaults) with the flags given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(namespace).items() if k in names}
    if base is None:
        return cls(**given)
    return dataclasses.replace(base, **given)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes are a UserError: one line and a pointer to --help, not a usage block.

    Abbreviated flags are refused: ``--max 10`` silently meaning ``--max_steps 10`` today would mean
    something else once a ``--max_...`` flag is added.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        """A usage mistake as a UserError (one ``error:`` line), not argparse's usage text and exit."""
        raise UserError(f"{message} (see {self.prog} --help)")


def parser_for(prog: str, description: str | None, *configs: tuple[type, Any]) -> ArgumentParser:
    """A parser with one flag group per ``(dataclass, defaults)``; ``defaults`` None means the field defaults."""
    parser = ArgumentParser(prog=prog, description=description)
    for cls, defaults in configs:
        add_dataclass_arguments(parser, cls, defaults)
    return parser


def parse(cls: type[T], argv: Sequence[str] | None, prog: str) -> T:
    """The entry point's config from the command line: ``cls``'s docstring is the description."""
    return build(cls, parser_for(prog, cls.__doc__, (cls, None)).parse_args(argv))


def run(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Runs an entry point; user mistakes become one line on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        exit_process(2, str(err))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        exit_process(130, "interrupted")
