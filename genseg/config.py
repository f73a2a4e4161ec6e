"""One config mechanism: dataclasses, filled from YAML files, overridden by CLI flags.

Every training entry point takes a dataclass instance; `load_config` builds it from a file and a dict of
overrides (the CLI passes only the flags the user actually gave), and `save_config` writes the resolved
config into the run directory so later commands read sizes and preprocessing from there. The shipped configs
are package data (genseg/configs/, also reachable as configs/ in a checkout): a bare name such as `seg-demo`
finds them from any directory and from a wheel install.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

C = TypeVar("C")


SHIPPED_CONFIGS = Path(str(importlib.resources.files("genseg") / "configs"))  # package data, a folder once installed


def builtin_config(name: str) -> Path:
    """The shipped config `name` (with or without .yaml)."""
    path = SHIPPED_CONFIGS / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))
        raise ConfigError(f"no shipped config named {name!r}; shipped: {', '.join(shipped)}")
    return path


def config_path(path: str | Path) -> Path:
    """`path` as given when it exists; else, for a bare name or configs/NAME, the shipped config of that name
    (so `--config configs/seg-demo.yaml` and `--config seg-demo` work from any directory and from a wheel)."""
    given = Path(path)
    if given.exists() or given.parent not in (Path("."), Path("configs")):
        return given
    shipped = SHIPPED_CONFIGS / f"{given.name.removesuffix('.yaml')}.yaml"
    return shipped if shipped.is_file() else given


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Build `cls` from an optional YAML file, then apply `overrides` (keys whose value is None are ignored)."""
    values: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            loaded = yaml.safe_load(config_path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(loaded).__name__}")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_dict(cls, values, origin)


def config_from_dict(cls: type[C], values: dict[str, Any], origin: str = "config") -> C:
    """Check keys and value types against the dataclass fields and build it."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        close = {key: difflib.get_close_matches(key, fields, n=1) for key in unknown}
        hints = "".join(f" ({key!r}: did you mean {match[0]!r}?)" for key, match in close.items() if match)
        raise ConfigError(f"{origin}: unknown key(s) {unknown} for {cls.__name__}{hints}; known keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    checked = {name: _coerce(value, hints[name], f"{origin}: {name}") for name, value in values.items()}
    try:
        cfg = cls(**checked)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    from .io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Accept YAML's natural types for a field; convert lists to tuples; refuse anything else."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(v, item, where) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool, float):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value
