"""Reading a :class:`~kvpo.training.config.TrainConfig`: YAML files, ``key=value`` overrides and
the ``--help`` text.

Values from YAML and overrides are coerced to the field's type (``lr=1e-4`` is a float even though
YAML reads it as a string); an unknown key is an error that names the closest known key; a key
with declared choices lists them in ``--help`` (validation: :mod:`kvpo.training.validation`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from kvpo.training.config import ConfigError, RewardComponent, TrainConfig


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls=TrainConfig, prefix: str = "") -> list[str]:
    """Every settable dotted key of ``cls``."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, prefix + f.name + ".")
    return keys


def _unknown(key: str, cls, prefix: str) -> ConfigError:
    known = all_keys(cls, prefix)
    close = difflib.get_close_matches(prefix + key, known, n=1, cutoff=0.5)
    if not close:
        lowered = {k.lower(): k for k in known}
        close = difflib.get_close_matches((prefix + key).lower(), list(lowered), n=1, cutoff=0.4)
        close = [lowered[c] for c in close]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {prefix + key!r}{hint} (see --help for all keys)")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and set(args) == {int, str}:
        if isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
            return value.strip()  # a word such as 'auto' (validation checks which)
        return _coerce(value, int, key)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {hint.__name__} fields, got {value!r}")
        return from_dict(value, hint, prefix=key + ".")
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        try:
            return int(value) if not isinstance(value, str) else int(value.strip())
        except ValueError as err:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from err
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key} must be a number, got {value!r}") from err
    if hint is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {hint}")


def from_dict(data: dict, cls=TrainConfig, prefix: str = ""):
    """Build ``cls`` from a (nested) dict; unknown keys raise with the closest known key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(data)}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(str(key), cls, prefix)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set ``key=value`` strings (dotted keys for nested fields) into a nested dict copy."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override must look like key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        parts, cls, node = key.split("."), TrainConfig, data
        for i, part in enumerate(parts):
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                raise _unknown(part, cls, ".".join(parts[:i]) + ("." if i else ""))
            hint = _hints(cls)[part]
            if i == len(parts) - 1:
                try:
                    node[part] = yaml.safe_load(text) if text.strip() else ""
                except yaml.YAMLError as err:
                    raise ConfigError(f"{key}: cannot read the value {text!r} ({err})") from err
            elif dataclasses.is_dataclass(hint):
                node = node.setdefault(part, {})
                cls = hint
            else:
                raise ConfigError(f"{'.'.join(parts[: i + 1])} has no sub-keys (got {key!r})")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides.

    A file in the KVPO authors' format (their ``train_kvpo_*.yaml``) is translated into this
    project's keys first, printing a line per key that has no effect here or is not implemented
    (:mod:`kvpo.training.authors`); overrides are this project's keys."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        from kvpo.training import authors

        if authors.is_authors_format(data):  # the KVPO authors' own YAML, translated
            data = authors.load(data, source=path)
    return from_dict(apply_overrides(data, overrides or []))


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One settable key: dotted name, type name, default, help text, allowed values, section."""

    key: str
    type: str
    default: Any
    help: str
    choices: tuple | None
    group: str | None


def key_docs(cls=TrainConfig, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of ``cls`` in declaration order (the source of ``--help`` and
    ``docs/configuration.md``)."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        hint, group = hints[f.name], f.metadata.get("group")
        if dataclasses.is_dataclass(hint):
            inner = key_docs(hint, prefix + f.name + ".")
            if group and inner:
                inner[0] = dataclasses.replace(inner[0], group=group)
            out += inner
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if hint == list[RewardComponent]:
            default = ", ".join(f"{c.name}:{c.weight:g}" for c in default)
        name = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
        name = name or re.sub(r"\bkvpo\.training\.config\w*\.", "", str(hint))
        out.append(
            KeyDoc(prefix + f.name, name, default, f.metadata["help"], f.metadata["choices"], group)
        )
    return out


def help_text() -> str:
    """Every key with its type, default and meaning, grouped (the ``--help`` epilog)."""
    lines = []
    for doc in key_docs():
        if doc.group:
            lines.append(f"\n{doc.group}:")
        lines.append(f"  {doc.key} ({doc.type}, default {doc.default!r})")
        suffix = f" (choices: {', '.join(map(str, doc.choices))})" if doc.choices else ""
        lines.append(f"      {doc.help}{suffix}")
    return "\n".join(lines)


def choices(cls=None, prefix: str = "") -> dict[str, tuple]:
    """``{dotted key: allowed values}`` of every field of ``cls`` declaring choices."""
    out = {}
    for f in dataclasses.fields(cls or TrainConfig):
        if f.metadata.get("choices"):
            out[prefix + f.name] = f.metadata["choices"]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.update(choices(type(default), prefix + f.name + "."))
    return out


# ---------------------------------------------------------------------- values resolved at start
def is_wan_checkpoint(cfg: TrainConfig) -> bool:
    """Whether ``generator_ckpt`` names a Wan checkpoint (not empty, not a toy-format dir)."""
    from kvpo.training.validation import is_toy_dir

    return cfg.generator_ckpt is not None and not is_toy_dir(cfg.generator_ckpt)


def device_type(cfg: TrainConfig) -> str:
    """``"cuda"`` or ``"cpu"``: where ``cfg.device`` runs on this machine."""
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(cfg.device).type


def resolved_dtype(cfg: TrainConfig, device: str | None = None) -> str:
    """``cfg.dtype`` with ``auto`` resolved for a ``device`` (``"cuda"`` / ``"cpu"``; default:
    this machine's): bfloat16 for a Wan checkpoint on CUDA (the weights' own dtype), else
    float32 (the toy model; CPUs, where bf16 matmuls are slow)."""
    if cfg.dtype != "auto":
        return cfg.dtype
    device = device or device_type(cfg)
    return "bfloat16" if device == "cuda" and is_wan_checkpoint(cfg) else "float32"


def torch_dtype(cfg: TrainConfig):
    """The torch dtype of :func:`resolved_dtype` on this machine."""
    import torch

    return getattr(torch, resolved_dtype(cfg))


def row_micro_batch(cfg: TrainConfig) -> int:
    """``cfg.row_micro_batch`` as a number: ``auto`` is the memory planner's choice for this
    machine (:func:`kvpo.planning.choose.auto_row_micro_batch`)."""
    if cfg.row_micro_batch == "auto":
        from kvpo.planning.choose import auto_row_micro_batch

        return auto_row_micro_batch(cfg).row_micro_batch
    return int(cfg.row_micro_batch)
