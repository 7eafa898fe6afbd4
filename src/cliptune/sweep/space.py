"""A sweep's search space: which config keys each trial changes, and to what.

A space file is a YAML mapping; each entry is one swept dimension, in one of four forms:

    lora.r: [4, 8, 16, 32]                              # a config key and the values it takes
    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}    # a numeric range (the tpe and random samplers)
    lora.alpha: {times: lora.r, values: [2]}            # a multiple of another key: alpha = 2 r
    towers:                                             # a named choice: each option sets several keys
      vision: {lora.text: frozen}
      text: {lora.vision: frozen}
      both: {}

A config key is spelled `section.key`, as in the YAML config and the `--section.key` flags; a name
without a dot is a named choice. Everything is checked when the file is read, against the base
config: an unknown key or a value its field cannot hold is a one-line error naming the file, the
entry and the value. A value of a list setting (`lora.target_modules`) is itself a list, so its
values are a list of lists. What can only fail in combination (an alpha of 2.5 from `times`, target
modules the model lacks) is left to the trial, which is then recorded as failed with the error.

Pure: no Optuna here. `suggest` asks any object with Optuna's `suggest_*` methods (a trial).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from cliptune.config import ConfigError, RunConfig, load_config, resolve_config_path
from cliptune.config_flags import check_key, config_keys, dotted_values

Kind = Literal["values", "range", "choice"]

# Keys a sweep sets itself: each trial writes to its own folder and is scored by the end-of-run evaluation.
SET_BY_THE_SWEEP = {"train.output_dir": "each trial's run folder is OUT/trials/NNNN",
                    "train.report": "a trial is scored by the end-of-run evaluation on the val split"}
RANGE_FIELDS = ("low", "high", "log")
TIMES_FIELDS = ("times", "values")


@dataclass(frozen=True)
class Dimension:
    """One swept setting. `name` is its Optuna parameter and its column in the trials table: the config
    key, the named choice, or `KEY/BASE` for a multiple of BASE (lora.alpha/lora.r: the table shows 2)."""

    name: str
    kind: Kind
    key: str | None = None                      # the config key set (values, range); None for a choice
    options: tuple[Any, ...] = ()               # what a trial picks from: scalars, a list value by its label
    settings: tuple[dict[str, Any], ...] = ()   # per option, the config overrides it makes
    low: float | None = None                    # range
    high: float | None = None
    log: bool = False
    integer: bool = False                       # the key holds an int: Optuna's suggest_int
    times: str | None = None                    # the option multiplies this key's value

    @property
    def keys(self) -> tuple[str, ...]:
        """The config keys this dimension sets."""
        if self.key is not None:
            return (self.key,)
        return tuple(dict.fromkeys(key for setting in self.settings for key in setting))

    def overrides(self, picked: Any) -> dict[str, Any]:
        """The config overrides of the option `picked` (before a `times` multiple is taken)."""
        if self.kind == "range":
            return {self.key: picked}
        return dict(self.settings[self.options.index(picked)])


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]
    raw: dict[str, Any]       # as written: a resumed sweep refuses another space
    source: str = "space"     # the file, for messages

    @property
    def names(self) -> list[str]:
        return [dim.name for dim in self.dimensions]

    @property
    def ranges(self) -> list[str]:
        return [dim.name for dim in self.dimensions if dim.kind == "range"]

    def grid(self) -> dict[str, list[Any]]:
        """Each dimension's options, for Optuna's GridSampler. A range has no grid."""
        if self.ranges:
            raise ConfigError(f"{self.source}: a grid needs lists, and {', '.join(self.ranges)} "
                              "is a {low, high} range: give a list of values, or use --sampler tpe or random")
        return {dim.name: list(dim.options) for dim in self.dimensions}

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of options, the first dimension varying slowest."""
        grid = self.grid()
        return [dict(zip(grid, combination)) for combination in itertools.product(*grid.values())]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """One option per dimension, picked by an Optuna trial (its sampler decides which)."""
        picked = {}
        for dim in self.dimensions:
            if dim.kind != "range":
                picked[dim.name] = trial.suggest_categorical(dim.name, list(dim.options))
            elif dim.integer:
                picked[dim.name] = trial.suggest_int(dim.name, int(dim.low), int(dim.high), log=dim.log)
            else:
                picked[dim.name] = trial.suggest_float(dim.name, dim.low, dim.high, log=dim.log)
        return picked

    def resolve(self, picked: Mapping[str, Any], base: RunConfig) -> dict[str, Any]:
        """The config overrides of one trial: each dimension's option, then the `times` multiples (of the
        trial's value of the base key, or the base config's). Not validated: `load_config` does that."""
        missing = [name for name in self.names if name not in picked]
        if missing:
            raise ConfigError(f"{self.source}: no value picked for {', '.join(missing)}")
        overrides: dict[str, Any] = {}
        for dim in self.dimensions:
            if dim.times is None:
                overrides.update(dim.overrides(picked[dim.name]))
        base_values = dotted_values(base)
        for dim in self.dimensions:
            if dim.times is not None:
                product = overrides.get(dim.times, base_values[dim.times]) * picked[dim.name]
                # 8 x 2.0 is alpha 16; 5 x 0.5 stays 2.5, which an integer key then refuses, naming it.
                overrides[dim.key] = int(product) if float(product).is_integer() else product
        return overrides


# -- reading a space file -----------------------------------------------------------------------------


def load_space(path: str | Path, base: RunConfig) -> SearchSpace:
    """Read and check a space file (`configs/NAME.yaml` also finds the ones shipped with cliptune)."""
    path = resolve_config_path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    return parse_space(raw, base, source=str(path))


def parse_space(raw: Any, base: RunConfig, source: str = "space") -> SearchSpace:
    """Check a space (the YAML mapping) against `base`, the config every trial starts from."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: expected a mapping of swept settings, e.g. `lora.r: [4, 8, 16]`, "
                          f"got {raw!r}")
    checker = _Checker(base, source)
    dimensions = []
    for name, spec in raw.items():
        name = str(name)
        if "." in name:
            dimensions.append(_parse_key(name, spec, checker))
        else:
            dimensions.append(_parse_choice(name, spec, checker))
    setters: dict[str, str] = {}
    for dim in dimensions:
        for key in dim.keys:
            if key in SET_BY_THE_SWEEP:
                raise ConfigError(f"{source}: {dim.name}: {key} is set by the sweep ({SET_BY_THE_SWEEP[key]})")
            if key in setters:
                raise ConfigError(f"{source}: {key} is set by both {setters[key]!r} and {dim.name!r}; "
                                  "a trial's value would depend on their order")
            setters[key] = dim.name
    for dim in dimensions:
        if dim.times is not None and any(d.times is not None and d.key == dim.times for d in dimensions):
            raise ConfigError(f"{source}: {dim.name}: {dim.times} is itself a multiple of another key")
    return SearchSpace(tuple(dimensions), raw, source)


@dataclass
class _Checker:
    """Checks overrides by loading the base config with them, as a trial would."""

    base: RunConfig
    source: str

    def __post_init__(self) -> None:
        self.base_values = dotted_values(self.base)

    def check(self, where: str, overrides: dict[str, Any]) -> None:
        try:
            load_config(None, {**self.base_values, **overrides})
        except ConfigError as err:
            raise ConfigError(f"{self.source}: {where}: {err}") from None

    def fail(self, where: str, why: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {why}")


def _field_type(key: str) -> Any:
    tp = next(k.type for k in config_keys() if k.dotted == key)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # `int | None` sweeps as int
        inner = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        tp = inner[0] if len(inner) == 1 else tp
    return tp


def _is_list_field(key: str) -> bool:
    return typing.get_origin(_field_type(key)) in (list, tuple)


def _label(value: Any) -> Any:
    """An option as Optuna stores it: scalars as they are, a list by its YAML spelling."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()


def _check_spec_fields(spec: dict, allowed: tuple[str, ...], checker: _Checker, where: str) -> None:
    for field in spec:
        if field not in allowed:
            close = difflib.get_close_matches(str(field), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise checker.fail(where, f"unknown field {field!r}{hint} (a range has {', '.join(RANGE_FIELDS)}; "
                               f"a multiple has {', '.join(TIMES_FIELDS)})")


def _parse_key(key: str, spec: Any, checker: _Checker) -> Dimension:
    try:
        check_key(key)
    except ConfigError as err:
        raise ConfigError(f"{checker.source}: {err}") from None
    forms = "a list of values, a range {low, high, log}, or a multiple {times: KEY, values: [...]}"
    if isinstance(spec, list):
        return Dimension(key, "values", key=key, **_values(key, spec, checker, key))
    if not isinstance(spec, dict):
        raise checker.fail(key, f"expected {forms}, got {spec!r} (a value every trial shares belongs in the "
                           "base config, or write it as a one-item list)")
    if "times" in spec:
        _check_spec_fields(spec, TIMES_FIELDS, checker, key)
        return _parse_times(key, spec, checker)
    _check_spec_fields(spec, RANGE_FIELDS, checker, key)
    return _parse_range(key, spec, checker)


def _values(key: str, values: list, checker: _Checker, where: str) -> dict[str, Any]:
    if not values:
        raise checker.fail(where, "the list of values is empty")
    if _is_list_field(key) and not any(isinstance(v, list) for v in values):
        raise checker.fail(where, f"{key} holds a list, so each value is a list: write a list of lists, e.g. "
                           f"[{_label(values)}] for that one value (or name the options with a named choice)")
    options, settings = [], []
    for value in values:
        checker.check(where, {key: value})
        label = _label(value)
        if label in options:
            raise checker.fail(where, f"the value {label!r} is listed twice")
        options.append(label)
        settings.append({key: value})
    return {"options": tuple(options), "settings": tuple(settings)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_range(key: str, spec: dict, checker: _Checker) -> Dimension:
    if "low" not in spec or "high" not in spec:
        raise checker.fail(key, f"a range needs low and high, got {spec!r}")
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    tp = _field_type(key)
    if tp not in (int, float):
        raise checker.fail(key, f"a range needs a numeric setting; {key} holds {getattr(tp, '__name__', tp)}: "
                           "give a list of values")
    if not (_is_number(low) and _is_number(high)):
        raise checker.fail(key, f"low and high must be numbers, got {low!r} and {high!r}")
    if not isinstance(log, bool):
        raise checker.fail(key, f"log must be true or false, got {log!r}")
    if low >= high:
        raise checker.fail(key, f"low {low!r} must be below high {high!r}")
    if log and low <= 0:
        raise checker.fail(key, f"a log range needs low > 0, got {low!r}")
    integer = tp is int
    if integer and not (float(low).is_integer() and float(high).is_integer()):
        raise checker.fail(key, f"{key} is an integer: low and high must be integers, got {low!r} and {high!r}")
    for end in (low, high):
        checker.check(key, {key: int(end) if integer else end})
    return Dimension(key, "range", key=key, low=low, high=high, log=log, integer=integer)


def _parse_times(key: str, spec: dict, checker: _Checker) -> Dimension:
    base_key = spec["times"]
    where = f"{key}: times"
    if not isinstance(base_key, str) or "." not in base_key:
        raise checker.fail(where, f"expected the config key it multiplies (e.g. lora.r), got {base_key!r}")
    try:
        check_key(base_key)
    except ConfigError as err:
        raise ConfigError(f"{checker.source}: {where}: {err}") from None
    for name in (key, base_key):
        if _field_type(name) not in (int, float):
            raise checker.fail(where, f"{name} is not a number, so it cannot be a multiple")
    factors = spec.get("values")
    if not isinstance(factors, list) or not factors or not all(_is_number(f) and f > 0 for f in factors):
        raise checker.fail(key, f"a multiple needs values: a list of positive factors, e.g. [1, 2], got {factors!r}")
    if len(set(factors)) != len(factors):
        raise checker.fail(key, f"a factor is listed twice in {factors!r}")
    # The option is the factor; the setting is made by SearchSpace.resolve once the base value is known.
    return Dimension(f"{key}/{base_key}", "values", key=key, options=tuple(factors),
                     settings=tuple({} for _ in factors), times=base_key)


def _parse_choice(name: str, spec: Any, checker: _Checker) -> Dimension:
    sections = [f.name for f in dataclasses.fields(RunConfig)]
    if name in sections:
        raise checker.fail(name, f"{name} is a config section: spell a swept key section.key, e.g. "
                           f"{next(k.dotted for k in config_keys() if k.dotted.startswith(name + '.'))}: [...]")
    if not isinstance(spec, dict) or not spec:
        raise checker.fail(name, "a name without a dot is a named choice: a mapping of option names to the keys "
                           "each sets, e.g. {vision: {lora.text: frozen}, both: {}} (a config key is spelled "
                           f"section.key), got {spec!r}")
    options, settings = [], []
    for option, setting in spec.items():
        where = f"{name}: {option}"
        setting = {} if setting is None else setting
        if not isinstance(setting, dict):
            raise checker.fail(where, f"an option maps config keys to values, e.g. {{lora.r: 8}}, got {setting!r}")
        for key in setting:
            try:
                check_key(str(key))
            except ConfigError as err:
                raise ConfigError(f"{checker.source}: {where}: {err}") from None
        checker.check(where, setting)
        options.append(str(option))
        settings.append(dict(setting))
    return Dimension(name, "choice", options=tuple(options), settings=tuple(settings))
