"""Reading YAML: overrides (--set key=value), merging, and validation errors in one line each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


class ConfigError(ValueError):
    """A config that does not validate; the message is one line naming the key path."""


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))


def format_validation_error(e: ValidationError) -> str:
    errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")  # a typo explains the rest
    err = errors[0]
    where = _loc(err)
    msg = err["msg"].replace("Value error, ", "")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {msg}{more}" if where else f"{msg}{more}"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``a.b=value`` strings -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def validated(model, path: str | Path | None, overrides: list[str] | None):
    """``model`` (a pydantic schema) from the YAML at ``path`` with ``overrides`` (key=value) merged
    on top; a ConfigError naming the key otherwise."""
    data = deep_merge(load_yaml(path) if path else {}, parse_overrides(overrides or []))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
