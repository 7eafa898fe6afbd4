"""The run config as command-line flags: every leaf key of `RunConfig` as `--section.key VALUE`.

`config_keys` lists the keys with their types, defaults and field docstrings (what `--help` shows);
`parse_flag_value` and `parse_overrides` read flag values the way a YAML config would hold them;
`check_key` refuses a key that names no field, with the nearest one that does. The values are then
checked by `cliptune.config.load_config`, like a YAML file's.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from cliptune.config import ConfigError, RunConfig


def parse_value(text: str) -> Any:
    """A command-line value read as a YAML scalar or list (`5e-5`, `true`, `null`, `[a, b]`); else the text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None and text.strip() not in ("null", "~", "none", "None", ""):
        return text
    return value


def parse_flag_value(dotted: str, text: str) -> Any:
    """A `--section.key` value from the command line: as typed for a string field (a folder named
    `yes` or `1e5` stays that), else read as YAML like `parse_value`."""
    tp = next((key.type for key in config_keys() if key.dotted == dotted), None)
    if tp is str:
        return text
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == {str, type(None)}:
        return None if text.strip() in ("null", "~", "none", "None") else text
    return parse_value(text)


def check_key(dotted: str) -> None:
    """Refuse a dotted key that names no config field, suggesting the nearest one that does."""
    keys = [key.dotted for key in config_keys()]
    if dotted in keys:
        return
    close = difflib.get_close_matches(dotted, keys, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    section = dotted.split(".", 1)[0]
    same = [k for k in keys if k.startswith(section + ".")]
    valid = f" (valid: {', '.join(same)})" if same else f" (sections: {', '.join(f.name for f in dataclasses.fields(RunConfig))})"
    raise ConfigError(f"unknown config key {dotted!r}{hint}{valid}")


@dataclass(frozen=True)
class ConfigKey:
    dotted: str          # "train.lr"
    type: Any            # the field's type hint
    default: Any
    doc: str             # the field's docstring, on one line


def config_keys(cls: type | None = None, prefix: str = "") -> Iterator[ConfigKey]:
    """Every leaf key of the config (sections recursed), with its default and docstring, in field order."""
    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from config_keys(hints[f.name], dotted + ".")
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        yield ConfigKey(dotted, hints[f.name], default, docs.get(f.name, ""))


def dotted_values(config: RunConfig) -> dict[str, Any]:
    """Every leaf value of `config` by its dotted key: `load_config(None, dotted_values(c)) == c`, so a
    config can be changed key by key (a sweep's trials) and validated again like a YAML file."""
    values = {}
    for key in config_keys():
        node: Any = config
        for part in key.dotted.split("."):
            node = getattr(node, part)
        values[key.dotted] = node
    return values


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal right after it in the class body (the attribute-docstring
    convention that Sphinx, litgpt and jsonargparse read), whitespace collapsed to one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def describe_type(tp: Any) -> str:
    """A short metavar for a field type: INT, FLOAT, BOOL, STR, LIST, {a,b}; `?` marks null allowed."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        label = describe_type(inner[0]) if len(inner) == 1 else "VALUE"
        return label + "?" if type(None) in args else label
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin in (list, tuple):
        return "LIST"
    return {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR"}.get(tp, "VALUE")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--train.lr 5e-5 --lora.vision=frozen` -> {"train.lr": 5e-05, "lora.vision": "frozen"}.

    Values are read as YAML scalars/lists, so numbers, booleans, null and [a, b] work.
    """
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key value")
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value")
            i += 1
            text = args[i]
        overrides[key] = parse_value(text)
        i += 1
    return overrides
