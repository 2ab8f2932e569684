"""One row of the authors' key table (:mod:`.rules`): the :class:`Rule` record and its kinds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAPPED = "mapped"
NO_EFFECT = "no effect here"
NOT_IMPLEMENTED = "not implemented here"
KINDS = (MAPPED, NO_EFFECT, NOT_IMPLEMENTED)

ALIAS = "<alias>"  # a user-chosen node name under multinode.nodes
NODES = "multinode.nodes."


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED = _Required()
"""``Rule.default`` of a key the authors' code needs (it stops without it)."""


@dataclass(frozen=True)
class Rule:
    """One key of the authors' files: what their code does with it and what it does here.

    ``default``: the value their code uses when the key is absent (their ``getattr`` default, or
    their ``configs/default_config.yaml``); :data:`REQUIRED` when their code needs the key; None
    where the absence has no effect. ``group``: rules printed as one line (the launcher's
    ``multinode`` section). ``parse``: the reader of the value (:mod:`.values`), or None.
    """

    key: str
    kind: str
    theirs: str
    here: str
    default: Any = None
    group: str | None = None
    parse: Callable[[Any, str], Any] | None = None
