"""The KVPO authors' training YAML files (``configs/train_kvpo_longlive.yaml`` and
``configs/train_kvpo_memflow.yaml`` of the public KVPO repository), read as they are.

:func:`load_config <kvpo.training.config_parse.load_config>` calls :func:`is_authors_format` on
every YAML file it reads; a file in the authors' format (it has a key only they use, such as
``gradient_accumulation_steps``, ``per_step_protect_mode`` or ``adapter.verbose``) goes through
:func:`translate`, which returns this project's keys with every value converted from the
authors' units, a row per key for the mapping table (``python -m kvpo.train --config FILE
--check`` prints it: :func:`mapping_table`) and the lines printed when the file is loaded
(:func:`load`):

- a key that sets one of this project's keys (``mapped``) is silent unless the conversion is not
  exact here, and then its line says what differs;
- a key with no effect here (launcher, hardware placement, logging, debug output; ``no effect
  here``) prints one line saying why;
- a key whose behaviour this project does not implement (``not implemented here``) prints one
  line saying what the authors' run does with it, unless its value is the one that does nothing;
  the run proceeds without it.

A key in neither the authors' table (:data:`RULES`) nor this project's config is an error that
names the closest key. Keys of this project's config may sit in the same file; they are applied
after the translation and win. ``key=value`` overrides on the command line are this project's
keys. ``docs/authors-config.md`` is :func:`markdown` (``python -m kvpo.training.authors
--markdown``).

Units: the authors' trainer counts a *training step* as ``gradient_accumulation_steps``
rollouts (at its end the old policy is re-synced and the LR schedule advances once, while AdamW
steps ``ppo_epochs`` times after every rollout), and so does this project's, with
``sync_every`` rollouts (:class:`kvpo.training.learner.Counters`): ``max_train_steps``,
``lr_warmup_steps`` and the ``*_interval_steps`` carry over unchanged.

Modules: :mod:`.rules` (the table), :mod:`.values` (reading values), :mod:`.keys` (the file's
keys), :mod:`.translation` (the translator's state and shared operations), :mod:`.model`,
:mod:`.signals` and :mod:`.optimisation` (the sections), :mod:`.translate` (their order, loading)
and :mod:`.report` (mapping table and docs page).
"""

from kvpo.training.authors.keys import (
    LAUNCHER_SPELLINGS,
    MEMFLOW_ONLY,
    TRAINER_ONLY,
    flatten,
    is_authors_format,
    pattern,
)
from kvpo.training.authors.report import check_table, mapping_table, markdown, rule_counts
from kvpo.training.authors.rule import MAPPED, NO_EFFECT, NOT_IMPLEMENTED, Rule
from kvpo.training.authors.rules import RULE_BY_KEY, RULES
from kvpo.training.authors.signals import SCORERS
from kvpo.training.authors.translate import load, translate
from kvpo.training.authors.translation import Row, Translation

__all__ = [
    "LAUNCHER_SPELLINGS",
    "MAPPED",
    "MEMFLOW_ONLY",
    "NOT_IMPLEMENTED",
    "NO_EFFECT",
    "RULES",
    "RULE_BY_KEY",
    "TRAINER_ONLY",
    "Row",
    "Rule",
    "SCORERS",
    "Translation",
    "check_table",
    "flatten",
    "is_authors_format",
    "load",
    "mapping_table",
    "markdown",
    "pattern",
    "rule_counts",
    "translate",
]
