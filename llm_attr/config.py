"""Configs: dataclasses that map one-to-one onto YAML files and `--set key=value` overrides.

Every command has one config dataclass. A YAML file holds exactly that dataclass's fields (nested dataclasses are
nested mappings); a key that is not a field is an error naming the key and the file. `--set lora.rank=8` overrides
one field; the value is parsed as YAML (`8` -> int, `true` -> bool, `[q_proj, v_proj]` -> list).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is looser (int -> float)."""
    if value is None:
        return None
    tp = _unwrap_optional(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where=where)
    origin = typing.get_origin(tp)
    if tp in (int, float) and isinstance(value, str):  # YAML reads `1e-3` as a string
        try:
            value = tp(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {tp}")
    if tp is Any or origin is dict:
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a (nested) mapping; unknown keys raise `ConfigError` naming them."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(types_)}")
    for f in dataclasses.fields(cls):  # a partial nested section overrides its field's own default, not the class's
        if isinstance(data.get(f.name), dict) and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                data = {**data, f.name: _merge(to_dict(default), data[f.name])}
    kwargs = {k: _coerce(v, types_[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`["lora.rank=8", "seed=1"]` -> `{"lora": {"rank": 8}, "seed": 1}`."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def at_least(cfg: Any, **minimums: float) -> None:
    """`ValueError("NAME must be >= LOW, got VALUE")` for the first field of `cfg` below its minimum."""
    for name, low in minimums.items():
        value = getattr(cfg, name)
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


def check_choices(cfg: Any) -> None:
    """`ValueError("NAME must be one of [...], got VALUE")` for the first `Literal` field of `cfg` outside its choices
    (YAML and `--set` are checked on reading; this covers the Python API)."""
    for name, tp in _field_types(type(cfg)).items():
        tp = _unwrap_optional(tp)
        if typing.get_origin(tp) is typing.Literal and getattr(cfg, name) not in typing.get_args(tp):
            raise ValueError(f"{name} must be one of {list(typing.get_args(tp))}, got {getattr(cfg, name)!r}")


def builtin_config_dir() -> Path:
    """The folder of the YAML configs shipped inside the package (`llm_attr/configs`; `configs/` in the repo)."""
    from importlib.resources import files

    return Path(str(files("llm_attr") / "configs"))


def resolve_config_path(path: str | Path) -> Path:
    """`path` itself when it exists, else the shipped config of that name (`daunce.yaml`, `configs/tiny/x.yaml`),
    so that `--config configs/daunce.yaml` works from any folder and after a wheel install."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts and path.parts[0] == "configs" else path.parts
    shipped = builtin_config_dir().joinpath(*parts) if parts else None
    return shipped if shipped is not None and shipped.is_file() else path


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict | None = None) -> T:
    """Defaults of `cls`, then the YAML file at `path` (or the shipped config of that name), then `--set`
    overrides; validated."""
    data: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = resolve_config_path(path)
        where = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        data = loaded
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        data = _merge(data, extra)
        where = f"{where} + --set" if path else "--set"
    return from_dict(cls, data, where=where)


def save_config(cfg: Any, path: str | Path) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------- help: --help and --print-config


def field_help(cls: type, name: str) -> str:
    """The help text of field `name` of dataclass `cls`: its own metadata, else the nearest base class's."""
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass):
            for f in dataclasses.fields(klass):
                if f.name == name and f.metadata.get("help"):
                    return f.metadata["help"]
    return ""


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, str, bool]]:
    """`(key, default, help, is_section)` of every field of `cls` in declaration order, nested dataclasses as a
    section line followed by their own `a.b` keys (the `--set` keys)."""
    out: list[tuple[str, Any, str, bool]] = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        key, value = f"{prefix}{f.name}", getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            out.append((key, None, field_help(cls, f.name), True))
            out += describe_fields(type(value), prefix=f"{key}.")
        else:
            out.append((key, value, field_help(cls, f.name), False))
    return out


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("...").strip()


def config_help(cls: type) -> str:
    """The `--help` epilog of a command whose config is `cls`: every `--set` key with its default and help."""
    lines = [f"config keys of {cls.__name__} (--config FILE.yaml, --set KEY=VALUE; --print-config writes the YAML):"]
    for key, default, help_, section in describe_fields(cls):
        if section:
            lines.append(f"  {key}.*: {help_}")
        else:
            lines.append(f"  {key} = {_yaml_value(default)}: {help_}")
    return "\n".join(lines)


def config_yaml(cfg: Any, indent: str = "") -> str:
    """`cfg` as a complete YAML document, each key preceded by its help as a comment (loads back to `cfg`)."""
    lines = []
    for f in dataclasses.fields(cfg):
        help_ = field_help(type(cfg), f.name)
        if help_:
            lines.append(f"{indent}# {help_}")
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:")
            lines.append(config_yaml(value, indent + "  ").rstrip("\n"))
        else:
            lines.append(f"{indent}{f.name}: {_yaml_value(value)}")
    return "\n".join(lines) + "\n"
