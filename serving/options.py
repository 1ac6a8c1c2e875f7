"""User-facing options, declared once on the dataclass field that holds them.

``option(default, help, ...)`` is ``dataclasses.field`` with an ``Option`` in the field's
metadata. ``serving.cli`` builds the ``serve`` command line, the ``--config`` YAML keys and
``--help`` from the fields of ``EngineArgs`` and ``ServerArgs``, so a field declared with
``option()`` is an option everywhere, and nothing else repeats its name, type, default or help::

    max_num_seqs: int = option(32, "Most sequences in one batch.")

How a field becomes an option (``serving.cli.build_parser``):

- name: ``--`` + the field name with ``_`` as ``-`` (``Option.name`` overrides it where vLLM's
  name differs, e.g. ``--api-key`` for ``api_keys``); ``_`` and ``-`` are interchangeable on the
  command line and in YAML keys; ``Option.aliases`` adds other spellings (``-tp``);
- type, from the annotation: ``int``, ``float``, ``str`` and ``X | None`` take one value
  (``Option.parse`` replaces the conversion: units, aliases, range checks); ``list[str]`` takes
  one or more values, or one JSON list; ``bool`` is a flag: ``--x`` when the default is False,
  ``--x`` / ``--no-x`` when it is True. Any other annotation needs ``Option.parse``;
- default: the field's (a list default is copied for each instance);
- help: ``Option.help``, shown with the default in ``serve --help`` under ``Option.group``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

OPTION_KEY = "xlaserve.option"  # the key of the ``Option`` in a field's metadata


@dataclass(frozen=True)
class Option:
    """How one dataclass field appears on the command line (see the module docstring).

    ``parse`` turns the text of one value into the field's value, raising ``ValueError`` with a
    message for the user (shown as ``argument --name: message``); it must return a string
    default unchanged (argparse passes string defaults through it). ``positional`` makes the
    option also the command's optional positional argument (``serve MODEL``)."""

    help: str
    name: str | None = None
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    group: str | None = None
    positional: bool = False


def option(default: Any, help: str, *, name: str | None = None, aliases: tuple[str, ...] = (),
           choices: tuple[str, ...] | None = None, parse: Callable[[str], Any] | None = None,
           metavar: str | None = None, group: str | None = None,
           positional: bool = False) -> Any:
    """A dataclass field with ``default`` that is also a ``serve`` option (``Option``)."""
    spec = Option(help=help, name=name, aliases=aliases, choices=choices, parse=parse,
                  metavar=metavar, group=group, positional=positional)
    metadata = {OPTION_KEY: spec}
    if isinstance(default, list):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata=metadata)
    return field(default=default, metadata=metadata)


def int_with_suffix(value: str) -> int:
    """``2048``, ``2k``, ``32K``, ``25.6k`` (vLLM's --max-model-len forms; k = 1000, K = 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", value)
    if not m:
        raise ValueError(f"invalid length {value!r} (examples: 2048, 4k, 32K)")
    number, suffix = float(m.group(1)), m.group(2)
    scale = {"": 1, "k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}[suffix]
    result = number * scale
    if result != int(result):
        raise ValueError(f"{value!r} is not a whole number of tokens")
    return int(result)


def byte_size(value: str) -> int:
    """``4194304``, ``4MiB``, ``4M``, ``512k``: a size in bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(i?[bB]?)\s*", value)
    if not m:
        raise ValueError(f"invalid size {value!r} (examples: 4MiB, 512k, 1048576)")
    number, unit = float(m.group(1)), m.group(2).lower()
    return int(number * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit])


def int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """A parser for integers in ``[low, high]`` (no upper bound when ``high`` is None)."""
    bounds = f"in [{low}, {high}]" if high is not None else f"at least {low}"

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"invalid int value: {value!r}") from None
        if number < low or (high is not None and number > high):
            raise ValueError(f"must be {bounds}, got {number}")
        return number

    return parse
