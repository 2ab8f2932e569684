"""The keys of an authors' file: their dotted spelling, which of them only MemFlow's file, the
launcher or the trainer has, the test for the authors' format and the error for a key no one has."""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterator, Mapping
from typing import Any

from kvpo.training.authors.rule import ALIAS, NODES
from kvpo.training.authors.rules import RULE_BY_KEY
from kvpo.training.config import ConfigError

MEMFLOW_ONLY = frozenset({
    "model_kwargs.bank_size", "model_kwargs.record_interval", "model_kwargs.SMA", "log_interval",
    "adapter.dtype",
})  # fmt: skip
"""Keys of ``train_kvpo_memflow.yaml`` that ``train_kvpo_longlive.yaml`` does not have."""
MEMFLOW_MODEL = ("model_kwargs.bank_size", "model_kwargs.record_interval", "model_kwargs.SMA")
"""Keys that make a file MemFlow's (where their trainers' defaults differ)."""
LAUNCHER_SPELLINGS = frozenset(f"{NODES}{ALIAS}.{k}" for k in ("host", "hostname", "port", "user"))
"""Keys neither file has that the authors' multi-node launcher reads as well."""
TRAINER_ONLY = frozenset({"recache_full_kv_cache_after_switch"})
"""Keys neither file has that the authors' trainer reads (``getattr`` with a default)."""


def pattern(key: str) -> str:
    """``key`` with a node alias replaced by :data:`ALIAS` (the table's spelling)."""
    if key.startswith(NODES):
        rest = key[len(NODES) :].split(".", 1)
        return NODES + ALIAS + ("." + rest[1] if len(rest) > 1 else "")
    return key


def files(key: str) -> str:
    """Which of the authors' files have ``key`` (the *file* column of the docs' table)."""
    if key in MEMFLOW_ONLY:
        return "MemFlow"
    if key in TRAINER_ONLY:
        return "(trainer)"
    return "(launcher)" if key in LAUNCHER_SPELLINGS else "both"


def our_keys() -> set[str]:
    """Every dotted key of this project's config."""
    from kvpo.training.config_parse import all_keys

    return set(all_keys())


@functools.lru_cache(maxsize=1)
def _sections() -> frozenset[str]:
    """Dotted keys whose value is a mapping of further keys (theirs or ours)."""
    out = set()
    for key in list(RULE_BY_KEY) + sorted(our_keys()):
        parts = key.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return frozenset(out)


def flatten(data: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of a config mapping (lists are leaves; a section
    left empty or null yields nothing)."""
    sections = _sections()
    for key, value in data.items():
        dotted = prefix + str(key)
        if pattern(dotted) in sections and (value is None or isinstance(value, Mapping)):
            yield from flatten(value or {}, dotted + ".")
        else:
            yield dotted, value


def is_authors_format(data: Any) -> bool:
    """Whether a parsed YAML mapping is in the authors' format: it has a key that only their
    files use (a rule key that is not one of this project's keys)."""
    if not isinstance(data, Mapping):
        return False
    ours = our_keys()
    return any(pattern(key) in RULE_BY_KEY and pattern(key) not in ours for key, _ in flatten(data))


def unknown_key(key: str) -> ConfigError:
    """The error for a key of an authors' file that is neither theirs nor ours, with the
    closest key of either."""
    known = sorted(set(RULE_BY_KEY) | our_keys())
    close = difflib.get_close_matches(pattern(key), known, n=1, cutoff=0.6)
    if not close:
        lowered = {k.lower(): k for k in known}
        close = [lowered[c] for c in difflib.get_close_matches(key.lower(), lowered, 1, 0.5)]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"unknown config key {key!r} in a KVPO authors' config (neither one of the authors' keys "
        f"nor one of this project's){hint} (docs/authors-config.md lists the authors' keys, "
        "--help this project's)"
    )
