"""Command-line options generated from a typed config dataclass, so each default is declared once.

``add_dataclass_arguments(parser, cls)`` adds one option per field of ``cls``: the flag is the
field's name with dashes (``--train-iters``), its type, default and whether it is required come
from the field, and the rest from the field's ``metadata`` (or ``overrides[name]``, for a config
whose module should not know about its command line):

- ``help``, ``metavar``, ``choices``: passed to argparse;
- ``flag``: another spelling of the option (``--target-tensor-parallel-size`` for ``target_tp``);
- ``group``: the title of the argument group it is listed in;
- ``cli_default``: what the command line defaults to when the config's own default would be
  wrong for it (e.g. ``None`` meaning "work it out from the other options");
- ``cli``: ``False`` to leave the field out.

Booleans become switches: ``--name`` (store_true) for a field that defaults to False,
``--no-name`` (store_false) for one that defaults to True. Tuples take several values
(``nargs="+"``, or ``"*"`` when empty is allowed).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Mapping


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the option's value type, whether it takes several values) of a field's annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, UnionType):
        args = [a for a in typing.get_args(tp) if a is not NoneType]
        return _base_type(args[0]) if len(args) == 1 else (str, False)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return (args[0] if args else str), True
    return tp, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def field_argument(f: dataclasses.Field, tp: Any, meta: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """(flags, argparse keyword arguments) of one field."""
    default = meta["cli_default"] if "cli_default" in meta else _default(f)
    required = default is dataclasses.MISSING
    kind, several = _base_type(tp)
    flag = meta.get("flag") or "--" + f.name.replace("_", "-")
    kw: dict[str, Any] = {"dest": f.name}
    kw.update({k: meta[k] for k in ("help", "metavar") if k in meta})
    if kind is bool and not several:
        if default is True:
            return [meta.get("flag") or "--no-" + f.name.replace("_", "-")], {**kw, "action": "store_false"}
        return [flag], {**kw, "action": "store_true"}
    if "choices" in meta:
        kw["choices"] = list(meta["choices"])
    if kind in (int, float, Path):
        kw["type"] = kind
    if several:
        kw["nargs"] = "+" if required or default else "*"
        default = dataclasses.MISSING if required else list(default)
    if required:
        kw["required"] = True
    else:
        kw["default"] = default
    return [flag], kw


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *,
                            overrides: Mapping[str, Mapping[str, Any]] | None = None,
                            skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """Add an option for each field of the dataclass ``cls`` (see the module docstring)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = {**f.metadata, **((overrides or {}).get(f.name) or {})}
        if f.name in skip or meta.get("cli") is False:
            continue
        title = meta.get("group")
        target = parser if title is None else groups.setdefault(title, parser.add_argument_group(title))
        flags, kw = field_argument(f, hints[f.name], meta)
        target.add_argument(*flags, **kw)
    return parser


def dataclass_kwargs(args: argparse.Namespace, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The parsed values of ``cls``'s fields (the ones the parser has)."""
    values = vars(args)
    return {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values and f.name not in skip}
