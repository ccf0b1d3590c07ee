"""Build argparse options from a pydantic config, so defaults and help live only in the config class."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ValidationError


def add_config_args(parser: argparse.ArgumentParser, config_cls: type[BaseModel], positional: tuple[str, ...] = ()) -> None:
    """A flag per field (`--field-name`, or `--alias`), with the field's description and default; `positional`
    fields are arguments instead (optional ones when the field has a default). A required field is a
    required flag."""
    for name, field in config_cls.model_fields.items():
        kind, args = _kind(field.annotation)
        help_text = field.description or ""
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        if default is not None and kind is not bool:
            help_text += f" (default: {default})"
        if name in positional:
            optional: dict[str, Any] = {} if field.is_required() else {"nargs": "?", "default": argparse.SUPPRESS}
            parser.add_argument(name, help=help_text, **optional)
            continue
        flag = "--" + (field.alias or name).replace("_", "-")
        options: dict[str, Any] = {"dest": name, "help": help_text}
        if field.is_required():
            options["required"] = True
        else:
            options["default"] = argparse.SUPPRESS
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        elif kind is list:
            parser.add_argument(flag, nargs="+" if field.is_required() else "*", **options)
        elif kind is Literal:
            parser.add_argument(flag, choices=args, **options)
        else:
            parser.add_argument(flag, type=kind, **options)


def config_from_args(config_cls: type[BaseModel], ns: argparse.Namespace, **extra: Any):
    values = {k: v for k, v in vars(ns).items() if k in config_cls.model_fields}
    values.update(extra)
    try:
        return config_cls(**values)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise SystemExit(f"error: {msgs}") from None


def _kind(annotation: Any) -> tuple[Any, tuple]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        words = [w for a in inner if typing.get_origin(a) is Literal for w in typing.get_args(a)]
        if words and inner[0] in (int, float):  # `int | Literal["auto"]`: a number or one of the words
            return _number_or(inner[0], tuple(words)), ()
        return _kind(inner[0])
    if origin is list:
        return list, ()
    if origin is Literal:
        return Literal, typing.get_args(annotation)
    return annotation, ()


def _number_or(number: type, words: tuple[str, ...]):
    def convert(text: str):
        if text in words:
            return text
        try:
            return number(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or one of {', '.join(words)}, got {text!r}") from None

    convert.__name__ = f"{number.__name__} or {'/'.join(words)}"
    return convert
