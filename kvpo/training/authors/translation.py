"""The state of one translation and the operations its sections share.

:class:`Translator` reads an authors' file against the rules (every key is one of theirs, one of
this project's or an error), then each section (:mod:`~kvpo.training.authors.model`,
:mod:`~kvpo.training.authors.signals`, :mod:`~kvpo.training.authors.optimisation`) sets this
project's keys through it. Each key of the file gets one row of the mapping table; a line is
printed for a key with no effect here, a value not implemented here and a conversion that is not
exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvpo.training.authors.keys import flatten, our_keys, pattern, unknown_key
from kvpo.training.authors.rule import KINDS, NO_EFFECT, NOT_IMPLEMENTED, REQUIRED
from kvpo.training.authors.rules import RULE_BY_KEY

OURS = "this project's key"  # the row of a key of this project's config in the file
IMPLIED_KIND = "implied"  # the row of a setting their code fixes without a key
IMPLIED = (
    ("sampler_rule", "x0", "their distilled models re-noise x0_hat between steps"),
    ("dtype", "bfloat16", "their trainer runs the generator in bfloat16"),
    (
        "wan_model_path",
        "wan_models/Wan2.1-T2V-1.3B",
        "where their code loads umT5 and the VAE (here a diffusers-layout directory: "
        "text_encoder/, tokenizer/, vae/)",
    ),
    ("eval_seeds", 1, "their held-out evaluation makes one video per prompt"),
)
"""Keys their files do not state but their code fixes: ``(our key, value, why)``."""


@dataclass
class Row:
    """One line of the mapping table: a key of the file (or an implied setting), its value in
    the file, its category and what it became here."""

    key: str
    value: Any
    kind: str
    result: str
    present: bool = True


@dataclass
class Translation:
    """``values``: this project's config (nested mapping for
    :func:`~kvpo.training.config_parse.from_dict`); ``rows``: the mapping table; ``notes``: the
    lines printed when the file is loaded."""

    values: dict
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Keys of the file per category."""
        out = dict.fromkeys(KINDS, 0)
        for row in self.rows:
            if row.present and row.kind in out:
                out[row.kind] += 1
        return out


class Translator:
    """One authors' file being translated: ``leaves`` (their keys in the file), ``ours`` (this
    project's keys in the file), ``values`` (this project's config so far), ``rows`` and
    ``notes``; ``set_by`` names the key of the file that set each of this project's keys."""

    def __init__(self, data: Mapping):
        self.leaves: dict[str, Any] = {}
        self.ours: dict[str, Any] = {}
        mine = our_keys()
        for key, value in flatten(data):
            if pattern(key) in RULE_BY_KEY:
                self.leaves[key] = value
            elif key in mine:
                self.ours[key] = value
            else:
                raise unknown_key(key)
        self.values: dict = {}
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.set_by: dict[str, str] = {}
        for key, value, _why in IMPLIED:
            self.set(key, value, "(implied)")

    # ---------------------------------------------------------------- reading and writing
    def has(self, key: str) -> bool:
        return key in self.leaves

    def get(self, key: str) -> Any:
        """The file's value, else their code's default (None when it has none)."""
        if key in self.leaves:
            return self.leaves[key]
        default = RULE_BY_KEY[key].default
        return None if default is REQUIRED else default

    def value(self, key: str) -> Any:
        """:meth:`get`, read by the key's rule (``Rule.parse``)."""
        return RULE_BY_KEY[key].parse(self.get(key), key)

    def set(self, ours: str, value: Any, source: str) -> None:
        """Set this project's dotted key ``ours``, from the file's key ``source``."""
        node = self.values
        *parents, last = ours.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        self.set_by[ours] = source

    def row(self, key: str, result: str, kind: str | None = None) -> None:
        """The table row of ``key`` (one per key of the file; absent keys whose default was
        used get a row too)."""
        rule = RULE_BY_KEY[pattern(key)]
        present = key in self.leaves
        if not present and rule.default is None:
            return
        if not present:
            value = "(absent)"
            result = (
                f"{result} (their code needs this key; this project's default stays)"
                if rule.default is REQUIRED
                else f"{result} (their default {rule.default!r})"
            )
        else:
            value = self.leaves[key]
        self.rows.append(Row(key, value, kind or rule.kind, result, present))

    def note(self, key: str, text: str) -> None:
        """A line printed when the file is loaded, about ``key`` and its value."""
        value = self.leaves.get(key, RULE_BY_KEY[pattern(key)].default)
        self.notes.append(f"{key}: {value!r}: {text}")

    # ---------------------------------------------------------------- the kinds of keys
    def copy(self, *keys: str) -> list[Any]:
        """Set each key as this project's key of the same name, read by its rule; a required
        key missing from the file leaves this project's default. Returns the values set."""
        out = []
        for key in keys:
            if not self.has(key) and RULE_BY_KEY[key].default is REQUIRED:
                self.row(key, f"{key}: this project's default")
                out.append(None)
                continue
            value = self.get(key)
            if value is not None:
                value = RULE_BY_KEY[key].parse(value, key)
            self.set(key, value, key)
            self.row(key, f"{key} = {value!r}")
            out.append(value)
        return out

    def inexact(self, key: str, ours: str, why: str) -> None:
        """Print that ``key`` maps to ``ours`` only approximately, and ``why``."""
        self.note(key, f"mapped to {ours}, not exactly: {why}")

    def unsupported(self, key: str, result: str, what: str) -> None:
        """``key``'s value asks for behaviour not implemented here: its row (``result``) and a
        printed line saying ``what`` their run does."""
        self.row(key, result, NOT_IMPLEMENTED)
        self.note(key, f"not implemented here: {what}")

    def not_implemented(self, key: str, noop: bool, what: str) -> None:
        """A key of the file that this project does not implement: one row, silent when its value
        does nothing (``noop``), else printed with ``what`` their run does."""
        if not self.has(key):
            return
        if noop:
            self.row(key, "no-op value: nothing to implement", NOT_IMPLEMENTED)
        else:
            self.unsupported(
                key, f"not implemented here: {what}", f"{what}; the run proceeds without it"
            )

    def switch(self, key: str, on: str, off: str) -> None:
        """A boolean whose true is this project's behaviour (row ``on``); false is not
        implemented here and printed with ``off``, what their run does then."""
        if self.value(key):
            self.row(key, on)
        else:
            self.unsupported(key, "not implemented here (false)", off)

    def fallback(self, general: str, *keys: str) -> None:
        """``keys`` take ``general``'s value where the file lacks them (their code reads
        ``general`` only then)."""
        used = [key for key in keys if not self.has(key)]
        shared = self.value(general) if used else None
        for key in keys:
            value = shared if key in used else self.value(key)
            self.set(key, value, key)
            if key not in used:
                self.row(key, f"{key} = {value!r}")
        if used:
            self.row(general, f"{' and '.join(used)} = {shared!r}")
        else:
            verb, whose = ("is", "its") if len(keys) == 1 else ("are", "their")
            self.row(
                general,
                f"no effect: {' and '.join(keys)} {verb} set (this key is only {whose} fallback)",
            )

    # ---------------------------------------------------------------- the last steps
    def no_effect(self) -> None:
        """One row and one printed line per key of the file with no effect here (the launcher's
        ``multinode`` keys: one line together)."""
        grouped: dict[str, list[str]] = {}
        for key in self.leaves:
            rule = RULE_BY_KEY[pattern(key)]
            if rule.kind != NO_EFFECT:
                continue
            if key == "long_reward_normal_weight" and self.value(key) <= 0:
                self.unsupported(
                    key,
                    "not implemented here (<= 0)",
                    "a weight <= 0 makes their global reward 0 for every video; here the global "
                    "reward is scored (train_global=false drops it); the run proceeds",
                )
                continue
            self.row(key, rule.here)
            if rule.group is None:
                self.note(key, f"accepted, {rule.here}")
            else:
                grouped.setdefault(rule.group, []).append(key)
        for group, keys in grouped.items():
            self.notes.append(
                f"{group} ({', '.join(keys)}): accepted, no effect here: the multi-node "
                "launcher's ssh targets; start this project's trainer on every node with "
                "torchrun --nnodes N --node_rank R --master_addr HOST -m kvpo.train"
            )

    def pass_through(self) -> None:
        """This project's keys in the file, set last (they win), each printed where it
        overrides a translated value."""
        for key, value in self.ours.items():
            source = self.set_by.get(key)
            node = self.values
            for part in key.split(".")[:-1]:
                node = node.get(part, {})
            before = node.get(key.split(".")[-1]) if source else None
            self.set(key, value, "(this project's key)")
            self.rows.append(Row(key, value, OURS, f"{key} = {value!r}"))
            if source is not None and before != value:
                self.notes.append(
                    f"{key}: {value!r}: this project's key in the file overrides {before!r} "
                    f"(from {source})"
                )

    def finish(self) -> Translation:
        """The translation, with a row per implied setting nothing in the file changed."""
        missing = sorted(
            k for k in self.leaves if not any(r.key == k and r.present for r in self.rows)
        )
        if missing:  # every key of the file must have its row (a bug here, not the user's)
            raise AssertionError(f"keys without a mapping row: {missing}")
        for key, value, why in IMPLIED:
            if self.set_by.get(key) == "(implied)":
                self.rows.append(
                    Row(key, "(implied)", IMPLIED_KIND, f"{key} = {value!r}: {why}", False)
                )
        return Translation(self.values, self.rows, self.notes)
