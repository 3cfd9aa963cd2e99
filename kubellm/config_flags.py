"""Command-line flags generated from config dataclasses: each field declares its flag with `option(...)`, and
`add_flags` turns the fields into argparse arguments whose help shows the real default. One source of truth:
a new config field is a new flag, with no hand copy of its default to drift.

Also the YAML side: `config_defaults` reads a `--config` file's keys (dashes or underscores, as users write
vLLM configs) into the parser's defaults, so flags on the command line still win.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

FLAG = "kubellm_flag"


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    help: str
    parse: Callable[[str], Any] | None = None  # from the field's type when None
    choices: Sequence[Any] | None = None
    names: tuple[str, ...] = ()  # extra spellings, e.g. "-tp"
    flag: str | None = None  # the flag, when not --field-name (e.g. --model for a list field `models`)
    env: str | None = None  # environment variable that supplies the default
    metavar: str | None = None
    repeat: bool = False  # list fields: the flag may be given several times (else it takes several values)


class ConfigFileError(ValueError):
    """A bad --config file or environment variable; the message names the file and key, or the variable."""


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    parse: Callable[[str], Any] | None = None,
    choices: Sequence[Any] | None = None,
    names: tuple[str, ...] = (),
    flag: str | None = None,
    env: str | None = None,
    metavar: str | None = None,
    repeat: bool = False,
) -> Any:
    """A dataclass field that is also a command-line flag (--field-name unless `flag` says otherwise). A bool
    field is --x/--no-x unless it has `parse` (then the flag takes a value, e.g. on|off)."""
    spec = FlagSpec(help, parse, choices, names, flag, env, metavar, repeat)
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={FLAG: spec})
    return dataclasses.field(default=default, metadata={FLAG: spec})


def env_default(name: str, parse: Callable[[str], Any], fallback: Any) -> Callable[[], Any]:
    """A default_factory: the environment variable's value when it is set, else `fallback`."""

    def factory() -> Any:
        raw = os.environ.get(name)
        if raw is None or raw == "":
            return fallback
        try:
            return parse(raw)
        except ValueError as e:
            raise ConfigFileError(f"environment variable {name}={raw!r}: {e}") from e

    factory.fallback = fallback  # type: ignore[attr-defined]  # what --help shows besides the variable
    return factory


def env_option(env: str, read: Callable[[str], Any], fallback: Any, *, help: str, **flag: Any) -> Any:
    """An `option` whose default is environment variable `env` (converted by `read`) when set, else `fallback`:
    the variable is named once, and --help shows it besides the fallback. `flag` goes to `option` (e.g. the
    flag's own `parse`, which may differ from how the variable is read)."""
    return option(default_factory=env_default(env, read, fallback), env=env, help=help, **flag)


def env_bool(value: str) -> bool:
    """0/1 as the KUBELLM_* switches take them (also true/false, on/off, yes/no)."""
    low = value.strip().lower()
    if low in ("1", "true", "on", "yes"):
        return True
    if low in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"expected 0 or 1, got {value!r}")


def flag_name(field: dataclasses.Field) -> str:
    spec: FlagSpec | None = field.metadata.get(FLAG)
    return spec.flag if spec is not None and spec.flag else "--" + field.name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "none"
    return str(getattr(value, "value", value))


def add_flags(parser: argparse.ArgumentParser | Any, cls: type, skip: Iterable[str] = ()) -> list[str]:
    """Add one flag per `option` field of `cls` (dest = the field name); returns the field names added."""
    skipped = set(skip)
    hints = typing.get_type_hints(cls)
    added = []
    for field in dataclasses.fields(cls):
        spec: FlagSpec | None = field.metadata.get(FLAG)
        if spec is None or field.name in skipped:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        if spec.env:  # never the variable's value: it may be a secret
            shown = f"${spec.env}, else {_show(getattr(field.default_factory, 'fallback', None))}"
        else:
            shown = _show(default)
        kwargs: dict[str, Any] = {"dest": field.name, "default": default, "help": f"{spec.help} (default: {shown})"}
        tp, _ = _base_type(hints[field.name])
        if tp is bool and spec.parse is None:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            kwargs["type"] = spec.parse or item
            kwargs["default"] = list(default)
            if spec.repeat:
                kwargs["action"] = "append"
                kwargs["default"] = None  # argparse appends to a given default; the field's is applied later
            else:
                kwargs["nargs"] = "+"
        else:
            kwargs["type"] = spec.parse or tp
        if spec.choices is not None:
            kwargs["choices"] = list(spec.choices)
        if spec.metavar is not None:
            kwargs["metavar"] = spec.metavar
        parser.add_argument(flag_name(field), *spec.names, **kwargs)
        added.append(field.name)
    return added


def values(ns: argparse.Namespace, cls: type, names: Iterable[str]) -> dict[str, Any]:
    """The parsed values of `cls`'s fields `names` (a repeatable list flag not given: the field's default)."""
    out: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        value = getattr(ns, name)
        if value is None and fields[name].metadata[FLAG].repeat:
            value = fields[name].default_factory()  # type: ignore[misc]
        out[name] = value
    return out


def config_defaults(path: str, parser: argparse.ArgumentParser, what: str) -> dict[str, Any]:
    """A YAML file's keys as the parser's defaults (dest -> value). Keys may use dashes or underscores; values
    go through the flag's own type and choices; an unknown key is an error naming it (`what`: the command)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigFileError(f"cannot read config file {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigFileError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path} must be a mapping of option names to values")
    actions = _actions_by_key(parser)
    defaults: dict[str, Any] = {}
    unknown: list[str] = []
    for raw_key, value in data.items():
        key = str(raw_key).strip().replace("_", "-")
        if key == "config":
            raise ConfigFileError(f"config file {path}: key 'config' cannot nest another config file")
        action = actions.get(key)
        if action is None:
            unknown.append(str(raw_key))
            continue
        defaults[action.dest] = _convert(str(raw_key), action, value)
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise ConfigFileError(f"config file {path}: unknown key(s) {names}; see `{what} --help`")
    return defaults


def _actions_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                out[opt[2:]] = action
        if not action.option_strings and action.dest != "help":  # a positional: its dest is its key
            out[action.dest.replace("_", "-")] = action
    return out


def _convert(key: str, action: argparse.Action, value: Any) -> Any:
    """A YAML value into what the flag would have produced; errors name the key."""
    if action.dest.startswith(("vllm_ignored_", "vllm_refused_")):
        return value
    if isinstance(action, argparse.BooleanOptionalAction | argparse._StoreTrueAction) and action.type is None:
        if not isinstance(value, bool):
            raise ConfigFileError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_convert_one(key, action, v) for v in items]
    if isinstance(value, list | dict) and action.type is not None:
        raise ConfigFileError(f"config key {key!r}: expected a single value, got {value!r}")
    return _convert_one(key, action, value)


def _convert_one(key: str, action: argparse.Action, value: Any) -> Any:
    if value is None:
        return None
    convert = action.type
    try:
        converted = convert(value if not isinstance(value, bool) else str(value)) if callable(convert) else value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigFileError(f"config key {key!r}: invalid value {value!r} ({e})") from e
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigFileError(f"config key {key!r}: invalid choice {value!r} (choose from {choices})")
    return converted
