"""YAML in, dotted command-line overrides on top, a validated ``Config`` out.

    load_config("launch/configs/tiny_cpu.yaml", ["--train.max_steps=10", "--zero.stage=2"])

Unknown keys are errors (with the closest known key suggested), never silently ignored.
Values given on the command line are parsed as YAML scalars/lists (``--lora.targets=[q_proj,v_proj]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from megalong.config.schema import Config, ConfigError


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_matches(value: Any, tp: Any) -> bool:
    """Loose runtime check of a YAML value against a field annotation."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_matches(v, item) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is bool:
        return isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _coerce_number(value: Any, tp: Any) -> Any:
    """YAML 1.1 reads ``2e-5`` as a string and ``3`` as an int: make them floats where a float is expected."""
    if _type_matches(value, tp):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and _type_matches(float(value), tp):
        return float(value)
    if isinstance(value, str) and _type_matches(1.0, tp):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, list):
        item = typing.get_args(tp)
        for a in item:
            if typing.get_origin(a) is list or a is list:
                inner = (typing.get_args(a) or (Any,))[0]
                return [_coerce_number(v, inner) for v in value]
        if typing.get_origin(tp) is list:
            inner = (typing.get_args(tp) or (Any,))[0]
            return [_coerce_number(v, inner) for v in value]
    return value


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{(where + '.') if where else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{dotted}'{hint} (known: {', '.join(names)})")
        tp = hints[key]
        if _is_dataclass_type(tp):
            kwargs[key] = _build(tp, value or {}, dotted)
            continue
        value = _coerce_number(value, tp)
        if not _type_matches(value, tp):
            raise ConfigError(f"config key '{dotted}' = {value!r} has the wrong type; expected {tp}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or 'config'}: {e}") from None


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from a nested dict (the YAML document)."""
    return _build(Config, data, "")


def parse_overrides(args: list[str]) -> dict:
    """``["--a.b=c", "--x.y", "3"]`` -> ``{"a": {"b": c}, "x": {"y": 3}}`` (values parsed as YAML)."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"cannot read override {arg!r}; write overrides as --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = body, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {arg!r} has no value; write --{body}=VALUE")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r} conflicts with an earlier one")
        node[parts[-1]] = value
        i += 1
    return out


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; values of ``over`` win."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, train:, ...)")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe, apply ``--a.b=c`` overrides, validate."""
    data = load_yaml(path) if path is not None else {}
    data = merge(data, parse_overrides(list(overrides or [])))
    try:
        return config_from_dict(data)
    except ConfigError as e:
        where = f" (from {path})" if path else ""
        raise ConfigError(f"{e}{where}") from None


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (round-trips through load_config)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

