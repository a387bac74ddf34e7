"""Reading a config: a YAML file, then `--set key.path=value` overrides, each checked against the
dataclasses' annotations in common/config.py, then `validate`.

A value given with `--set` means what it says: for a text key (`run_dir`, `data.path`, `data.name`)
the text after `=` is taken as it is (`run_dir=runs/exp #3` is that folder, not YAML with a comment);
other keys are read as YAML (`vae.lr=3e-4`, `ldm.cross_attention=[true, false]`) and type-checked.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from common.config import Config, ConfigError
from common.config_checks import validate


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a config with a section written twice is an error instead."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key '{key}' appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                                  f"keep one and merge the settings into it")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of settings, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if any(value == option and type(value) is type(option) for option in typing.get_args(tp)):
            return value
        raise ConfigError(f"config key '{key}' must be one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-3" as a string (YAML 1.1 wants "1.0e-3")
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, values: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; every key must be a field of the right type."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; known keys here: {', '.join(sorted(known))}"
            )
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def field_type(dotted: str) -> Any:
    """The annotation of a dotted config key (`data.augment.hflip` -> bool), or None if there is no such key."""
    tp: Any = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _is_text(tp: Any) -> bool:
    if tp is str:
        return True
    return typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp))


def _merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` laid over it, section by section."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    """Set one dotted key. A mapping given for a section (`vae={max_steps: 3}`) changes the keys it names and keeps
    the section's others, as the same keys set one by one would (replacing the section would silently drop them)."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is a value, not a section")
        node = child
    old = node.get(keys[-1])
    node[keys[-1]] = _merged(old, value) if isinstance(value, dict) and isinstance(old, dict) else value


def parse_override(text: str) -> tuple[str, Any]:
    """`vae.lr=3e-4` -> ("vae.lr", 0.0003); `run_dir=runs/exp #3` -> ("run_dir", "runs/exp #3")."""
    if "=" not in text:
        raise ConfigError(f"--set expects key.path=value, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if _is_text(field_type(key)):
        return key, raw
    try:
        return key, yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {key}: '{raw}' is not a valid value ({str(error).splitlines()[0]})") from None


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; the shipped ones are in configs/")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except ConfigError as error:
        raise ConfigError(f"config file '{path}': {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file '{path}' is not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of settings")
    return tree


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply `--set` overrides, validate."""
    tree: dict = read_yaml(Path(path)) if path is not None else {}
    given: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        if key in given and given[key] != value:  # as a key written twice in a config file: which one was meant?
            raise ConfigError(f"--set {key} is given twice, as {given[key]!r} and {value!r}; keep the one you mean")
        given[key] = value
        _set_path(tree, key, value)
    config = from_dict(Config, tree)
    if not config.run_dir:
        config.run_dir = str(Path("checkpoints") / (Path(path).stem if path is not None else "default"))
    config.run_dir = str(Path(config.run_dir).expanduser())
    if config.data.path:
        config.data.path = str(Path(config.data.path).expanduser())
    validate(config)
    return config
