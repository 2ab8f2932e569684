"""Reports of the translation: the mapping table ``--check`` prints and ``docs/authors-config.md``
(:func:`markdown`; ``python -m kvpo.training.authors --markdown > docs/authors-config.md``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kvpo.training.authors.keys import files, is_authors_format
from kvpo.training.authors.rule import ALIAS, KINDS, MAPPED, NO_EFFECT, NOT_IMPLEMENTED
from kvpo.training.authors.rules import RULES
from kvpo.training.authors.translate import translate
from kvpo.training.authors.translation import IMPLIED, Translation


def _short(value: Any, width: int = 34) -> str:
    text = value if value in ("(absent)", "(implied)") else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def mapping_table(translation: Translation, source: str | Path | None = None) -> str:
    """The table ``--check`` prints: every key of the file, its value, its category and what
    it became here, then the implied settings and the count per category."""
    lines = [f"KVPO authors' config{' ' + str(source) if source else ''} -> this project's keys:"]
    width = max([len(r.key) for r in translation.rows] + [10])
    lines.append(f"  {'key':<{width}}  {'their value':<34}  {'category':<20}  here")
    for row in translation.rows:
        lines.append(f"  {row.key:<{width}}  {_short(row.value):<34}  {row.kind:<20}  {row.result}")
    counts = translation.counts()
    lines.append(
        f"{sum(counts.values())} keys in the file: "
        + ", ".join(f"{n} {kind}" for kind, n in counts.items())
    )
    return "\n".join(lines)


def check_table(path: str | Path | None) -> str | None:
    """The mapping table of the YAML file at ``path`` when it is in the authors' format."""
    if path is None:
        return None
    data = yaml.safe_load(Path(path).read_text())
    if not is_authors_format(data):
        return None
    return mapping_table(translate(data), path)


def rule_counts() -> dict[str, int]:
    """Rules per category (the table of docs/authors-config.md)."""
    out = dict.fromkeys(KINDS, 0)
    for rule in RULES:
        out[rule.kind] += 1
    return out


def markdown() -> str:
    """``docs/authors-config.md``: every key of the authors' files, by section."""
    counts = rule_counts()
    lines = [
        "# The KVPO authors' config files",
        "",
        "`python -m kvpo.train --config train_kvpo_longlive.yaml` (or `train_kvpo_memflow.yaml`)",
        "reads the KVPO authors' training configs (public KVPO repository, `configs/`) as they",
        "are. A file with a key only their files use (`gradient_accumulation_steps`,",
        "`per_step_protect_mode`, `adapter.verbose`, ...) is translated into this project's keys",
        "([configuration.md](configuration.md)) by `kvpo/training/authors/`; every value",
        "is converted from their units. Loading prints one line per key with no effect here, one",
        "per key whose behaviour is not implemented here (unless its value does nothing), and one",
        "per conversion that is not exact; the run proceeds. A key in neither their files nor this",
        "project's config is an error naming the closest key. `--check` prints the mapping table",
        "of the file (every key, its value, its category, what it became) and the resolved config",
        "without running, then lists every problem, paths of the file that do not exist on this",
        "machine included (a run stops on those), and exits with status 2 if there is any.",
        "",
        "```bash",
        "python -m kvpo.train --config train_kvpo_longlive.yaml --check",
        "python -m kvpo.train --config train_kvpo_longlive.yaml generator_ckpt=/ckpt/base.pt \\",
        "    wan_model_path=/models/Wan2.1-T2V-1.3B-Diffusers \\",
        "    reward_path=/models/hpsv3 reward_base_model=/models/Qwen2-VL-7B-Instruct",
        "```",
        "",
        "Overrides after the file are this project's keys (`sync_every=4`, not",
        "`gradient_accumulation_steps=4`); keys of this project's config written into the file",
        "are applied after the translation and win.",
        "",
        "## Units and conversions",
        "",
        "Their trainer counts a *training step* as `gradient_accumulation_steps` (A) rollouts:",
        "at its end the old policy is re-synced, the step counter advances and the LR schedule",
        "steps once, while AdamW steps `ppo_epochs` (N) times after every rollout (their comment:",
        "not gradient accumulation). This project's training step is the same, with `sync_every`",
        "rollouts (`docs/reference-differences.md`), so the step counts carry",
        "over unchanged: `max_train_steps: 1500` is 3000 rollouts and 3000 AdamW steps in both.",
        "",
        "| theirs | here | both files |",
        "| --- | --- | --- |",
        "| `gradient_accumulation_steps` A | `sync_every` = A | 2 |",
        "| `max_train_steps`, `lr_warmup_steps`, `save_interval_steps`, `eval_interval_steps` | "
        "the same (training steps) | 1500, 5, 2, 2 |",
        "| `*_interval_samples` N (when `*_interval_steps` is 0) | `*_interval_steps` = N / "
        "(`num_gpus` x A), rounded up | 0 (unused) |",
        "| `eval_prompts: world_size` | `eval_prompts` = `num_gpus`, `eval_seeds` = 1 | 8 |",
        "| `switch_frame_indices` with `align_switch_to_chunk` | moved to chunk starts | "
        "39, 75, 111 (already chunk starts) |",
        "| `policy_window_frames`, `policy_window_multiple` | no effect: the energy sums the fork "
        "chunk's blocks from the fork on (`energy_blocks: chunk`) | 0, 1.0 |",
        "| `log_prob_sigma_floor` f | `tve_step_weight` sigma2, `tau` = 2 f^2 (f >= every "
        "step's sigma; uniform below, floored between) | 1.0 -> sigma2, tau 2 |",
        "| `per_step_protect_mode` | `protect_mode`, `gated_scale` | mechanism_2 -> gate, 0.5 |",
        "| `branch_backward_chunk_size` | `row_micro_batch` (0 -> auto) | LongLive 0 -> auto, "
        "MemFlow 4 |",
        "| `adapter.alpha` | `adapter.alpha`, `lora_ckpt_alpha` | 256 |",
        "",
        "The LR warmup is one training step ahead of theirs: their first step runs at LR 0",
        "(diffusers' factor k / W from k = 0), this project's step s at (s + 1) / W; loading says",
        "so. `per_step_protect_mode: mechanism_2` is this project's reward gate exactly: their",
        "anchor slot has logit 0 beside the branches' log-softmax, so pi_anchor = 1 / (1 + 1) and",
        "the loss of a group where no branch beats the anchor on either signal is scaled by 1/2",
        "(`gated_scale` 0.5); with `min_update_entropy_ratio: 0` their entropy skip never fires.",
        "`mechanism_1` is `protect_mode: skip` (zero loss, the update skipped when no rank has a",
        "branch beating the anchor).",
        "",
        "Settings their code fixes without a key, set by the translation (a key of this",
        "project's config in the file or on the command line changes them):",
        "",
        "| key here | value | why |",
        "| --- | --- | --- |",
    ]
    lines += [f"| `{k}` | `{v!r}` | {why} |" for k, v, why in IMPLIED]
    lines += [
        "",
        "`reward_model` is the scorer registered here that returns the `reward_components`",
        "(`video_hpsv3` for both files); its weights are this project's `reward_path` and",
        "`reward_base_model` ([rewards.md](rewards.md)).",
        "",
        "## Every key",
        "",
        f"{len(RULES)} keys: {counts[MAPPED]} {MAPPED}, {counts[NO_EFFECT]} {NO_EFFECT}, "
        f"{counts[NOT_IMPLEMENTED]} {NOT_IMPLEMENTED}. `{ALIAS}` stands for a node name of",
        "their multi-node launcher (`node0`, `node1` in their files; `host`, `hostname`, `port`",
        "and `user` are that launcher's spellings of the ssh keys, in neither file). *File*: the",
        "files that have the key (MemFlow: only `train_kvpo_memflow.yaml`; (trainer): neither,",
        "their trainer reads it with a default). *Default* is the",
        "value their code uses when the key is absent, which the translation uses too",
        "(*required*: their code stops without it; this project's default stays).",
        "",
        "| key | file | their code | here | category | default |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for rule in RULES:
        default = "" if rule.default is None else f"`{rule.default!r}`"
        cells = (f"`{rule.key}`", files(rule.key), rule.theirs, rule.here, rule.kind, default)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += [
        "",
        "## Not covered yet",
        "",
        "- Their first training step at LR 0 (the warmup here runs one step ahead) and, with",
        "  mechanism_1, the skipped optimizer step.",
        "- `eval_reward_components` that the training scorer does not return, scoring both the",
        "  online and the EMA weights in one evaluation.",
        "- Keys of their `configs/default_config.yaml` (merged under their files) that the two",
        "  training files do not set are unknown keys here.",
    ]
    return "\n".join(lines) + "\n"
