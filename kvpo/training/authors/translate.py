"""Translating an authors' file: the sections in their order, and loading with printed lines."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from kvpo.training.authors.model import (
    translate_exploration,
    translate_model,
    translate_prompts,
)
from kvpo.training.authors.optimisation import (
    translate_evaluation,
    translate_optimisation,
    translate_output,
)
from kvpo.training.authors.signals import translate_advantages, translate_policy, translate_rewards
from kvpo.training.authors.translation import Translation, Translator

SECTIONS = (
    translate_model,
    translate_prompts,
    translate_exploration,
    translate_advantages,
    translate_policy,
    translate_optimisation,
    translate_evaluation,
    translate_rewards,
    translate_output,
)
"""The sections in the order of the mapping table's rows."""


def translate(data: Mapping) -> Translation:
    """This project's config from an authors'-format mapping (see :mod:`kvpo.training.authors`)."""
    translator = Translator(data)
    for section in SECTIONS:
        section(translator)
    translator.no_effect()
    translator.pass_through()
    return translator.finish()


def _rank_zero() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def load(data: Mapping, source: str | Path | None = None, stream=None) -> dict:
    """:func:`translate` ``data`` and print its lines (rank 0 only, to ``stream``, default
    stderr); returns this project's nested config mapping."""
    translation = translate(data)
    if _rank_zero():
        stream = stream or sys.stderr
        counts = translation.counts()
        where = f" {source}" if source is not None else ""
        print(
            f"authors' config{where}: the KVPO authors' format, translated: "
            + ", ".join(f"{n} {kind}" for kind, n in counts.items())
            + " (--check prints the mapping table; docs/authors-config.md)",
            file=stream,
        )
        for line in translation.notes:
            print(f"authors' config: {line}", file=stream)
    return translation.values
