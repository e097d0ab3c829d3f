"""Command-line flags built from the configuration dataclasses, and the flags every command shares.

A config field becomes ``--field-name`` (or the name given in ``rename``): its docstring is the
help, its type the parser (``Literal`` and ``choices`` give the valid values), its default the
default; ``bool`` gives ``--flag/--no-flag``; ``tuple[X, ...]`` a repeatable flag;
``tuple[X, X]`` a flag taking two values. ``config_from`` builds the dataclass back from the
parsed arguments, so a field exists once (in its dataclass) and the CLI cannot drift from it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

from workbench.errors import WorkbenchError


class CliError(WorkbenchError):
    """A command-line argument that is invalid on its own."""


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help (not for required flags, switches or a None
    default); examples in the epilog keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def integer(text: str) -> int:
    """Parse an integer (``1_000`` and ``1e6`` too); range checks live in the configs, which name the option."""
    try:
        return int(text.replace("_", ""))
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        return int(value)


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None


# -- flags every command shares (one definition each) ------------------------------------------
def add_db(p: argparse.ArgumentParser, *, required: bool = True, default: Path | None = None, help: str | None = None) -> None:
    p.add_argument("--db", type=Path, required=required, default=default,
                   help=help or "workspace file (a DuckDB database; its SAE weights live in DB.saes/ beside it)")


def add_device(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    """``--device`` and, for commands that load a language model, ``--model-dtype``
    (both resolved in ``workbench.cli.resolve_compute_arguments``)."""
    from workbench.devices import MODEL_DTYPES

    p.add_argument("--device", default="auto", help="where to compute: auto (CUDA when present, else the CPU), cpu, cuda or cuda:N")
    if model:
        p.add_argument("--model-dtype", default="auto", choices=MODEL_DTYPES,
                       help="precision the language model loads in; auto: bfloat16 on CUDA, float32 on the CPU")


def add_model(p: argparse.ArgumentParser, default: str | None = "smollm2-135m", help: str | None = None) -> None:
    p.add_argument("--model", default=default,
                   help=help or "model: an alias (smollm2-135m, tiny-llama), a local Hugging Face folder or a hub id")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# -- flags from a dataclass ---------------------------------------------------------------------
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right after it in the class body), one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def flag_name(field: str, rename: dict[str, str] | None = None) -> str:
    return (rename or {}).get(field) or "--" + field.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_fields(p: argparse.ArgumentParser, cls: type, *, rename: dict[str, str] | None = None, skip: Iterable[str] = (),
               choices: dict[str, Sequence[str]] | None = None, required: Iterable[str] = (),
               help: dict[str, str] | None = None) -> list[str]:
    """Add one flag per field of dataclass ``cls`` (except ``skip``); returns the fields added."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    skip, required, choices, help = set(skip), set(required), choices or {}, help or {}
    added = []
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.init:
            continue
        tp, optional = _unwrap_optional(hints[field.name])
        default = None if field.default is dataclasses.MISSING else field.default
        text = help.get(field.name) or docs.get(field.name)
        if not text:
            raise TypeError(f"{cls.__name__}.{field.name} has no docstring: it is the flag's help")
        text = text.replace("%", "%%")  # argparse %-formats help
        kwargs: dict[str, Any] = dict(dest=field.name, help=text)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        metavar = flag_name(field.name, rename).lstrip("-").upper().replace("-", "_")
        if tp is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # repeatable
            shown = f" (default: {', '.join(map(str, default))})" if default else ""
            kwargs.update(action="append", type=_parser_of(args[0]), default=None, metavar=metavar,
                          help=f"{text.rstrip('.')}; repeat for several{shown}.")
            kwargs.setdefault("choices", _choices_of(args[0]))
        elif origin is tuple:
            kwargs.update(nargs=len(args), type=_parser_of(args[0]), default=default, metavar=tuple(a.__name__.upper() for a in args))
        else:
            kwargs.update(type=_parser_of(tp), default=default, choices=_choices_of(tp), metavar=metavar)
        if field.name in choices:
            kwargs["choices"] = list(choices[field.name])
        if kwargs.get("choices") is None:
            kwargs.pop("choices", None)
        else:
            kwargs.pop("metavar", None)  # argparse shows the choices
        if field.name in required or (field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING):
            kwargs.update(required=True)
            kwargs.pop("default", None)
        p.add_argument(flag_name(field.name, rename), **kwargs)
        added.append(field.name)
    return added


def _parser_of(tp: Any) -> Callable[[str], Any]:
    if typing.get_origin(tp) is Literal:
        return str
    return {int: integer, float: number, str: str, Path: Path}.get(tp, str)


def _choices_of(tp: Any) -> list[str] | None:
    return list(typing.get_args(tp)) if typing.get_origin(tp) is Literal else None


def config_from(args: argparse.Namespace, cls: type, **extra: Any) -> Any:
    """``cls`` built from the parsed flags of its fields (a repeatable flag not given keeps the
    field's default) plus ``extra`` fields."""
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in extra or not hasattr(args, field.name):
            continue
        value = getattr(args, field.name)
        if isinstance(value, list):
            value = tuple(value)
        elif value is None and field.default is not dataclasses.MISSING and field.default is not None:
            continue  # a repeatable flag that was not given
        values[field.name] = value
    return cls(**values, **extra)
