"""Reading the values of the KVPO authors' keys as their code reads them.

Every reader takes the value and the key it came from and raises a
:class:`~kvpo.training.config.ConfigError` naming the key when the value cannot be read. A rule's
``parse`` (:mod:`kvpo.training.authors.rules`) names the reader of its key. Numbers and booleans
are read as this project's config reads them; an integer may also be a whole float (``4.0``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvpo.training.config import ConfigError
from kvpo.training.config_parse import _coerce


def integer(value: Any, key: str) -> int:
    """An integer, also when written as a whole float (``4.0``) or a string (``"4"``)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    try:
        as_float = float(value)
    except ValueError as err:
        raise ConfigError(f"{key} must be an integer, got {value!r}") from err
    if not as_float.is_integer():
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return int(as_float)


def number(value: Any, key: str) -> float:
    """A float (booleans are not numbers), read as this project's config reads one."""
    return _coerce(value, float, key)


def boolean(value: Any, key: str) -> bool:
    """A boolean, also written true/false, yes/no, 1/0 or on/off (as in this project's config)."""
    return _coerce(value, bool, key)


def integers(value: Any, key: str) -> list[int]:
    """A list of integers, written as a list or as one comma-separated string."""
    items = value if isinstance(value, list) else str(value).split(",")
    return [integer(str(v).strip(), key) for v in items if str(v).strip()]


def text(value: Any, key: str) -> str:
    """A string without surrounding blanks."""
    return str(value).strip()


def lowered(value: Any, key: str) -> str:
    """A word, compared in lower case."""
    return text(value, key).lower()


def snake(value: Any, key: str) -> str:
    """A word in lower case with ``-`` read as ``_`` (``per-step`` is ``per_step``)."""
    return lowered(value, key).replace("-", "_")


def path(value: Any, key: str) -> str | None:
    """A file path; empty is no path."""
    return None if value == "" else str(value)


def choice(
    word: str, key: str, spellings: Mapping[str, tuple[str, ...]], accepts: str | None = None
) -> str:
    """The name in ``spellings`` whose spellings hold ``word``; any other word is an error that
    says what the authors' code ``accepts`` (default: the names)."""
    for name, words in spellings.items():
        if word in words:
            return name
    accepts = accepts or " or ".join(spellings)
    raise ConfigError(f"{key} {word!r}: the authors' code accepts {accepts}")


def components(value: Any, key: str) -> list[dict] | None:
    """A list of weighted scorers (``{name, weight}``; a bare name weighs 1); None when absent."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key} must be a non-empty list of scorers, got {value!r}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, Mapping) or not item.get("name"):
            raise ConfigError(f"{key}[{i}] must be a scorer name or a mapping with 'name'")
        extra = sorted(set(item) - {"name", "weight"})
        if extra:
            raise ConfigError(
                f"{key}[{i}] sets {extra}: only 'name' and 'weight' are read here "
                "(their 'alias' and 'kwargs' are not implemented)"
            )
        weight = number(item.get("weight", 1.0), f"{key}[{i}].weight")
        out.append({"name": str(item["name"]), "weight": weight})
    return out
