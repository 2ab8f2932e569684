"""Prompts of a run: prompt files and the prompt source the trainer draws from.

A *prompt sequence* is a list of segment strings, one video's prompts in order. A
:class:`PromptSource` gives the training sequence of a group (``train(step, rank)``,
deterministic) and the held-out sequences (``heldout(count)``); it is built from a file
(:func:`prompt_source` with ``data_path`` / ``eval_data_path``), from Python lists
(:meth:`PromptSource.from_sequences`), or is the toy's train / held-out split.

Hold-out rule: with a separate held-out list, the first ``count`` of it; otherwise the last
``eval_prompts`` training sequences are held out and never drawn for training (the reference
code's convention).

Prompt files:

Two formats, chosen by the file's suffix:

- ``.txt``: one video per non-empty line; its segments separated by ``" | "``; lines starting
  with ``#`` are comments. ``a red circle moves left | a blue circle moves up``
- ``.jsonl``: one JSON object per line with a ``"prompts"`` list of segment strings (the
  LongLive/MemFlow KVPO data format). ``{"prompts": ["a red circle moves left", "..."]}``

Segment ``i`` conditions the frames from the ``i``-th switch frame on (``switch_frame_indices``);
a sequence may have fewer segments than the video has (the last one continues) but not more.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvpo.training.distributed import rank_seed

FORMATS = (".txt", ".jsonl")


class PromptFileError(ValueError):
    """A prompt file that does not follow one of the two formats."""


def load_prompt_file(path: str | Path, max_segments: int | None = None) -> list[list[str]]:
    """Read ``path`` -> a list of prompt sequences (lists of segment strings)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {str(path)!r} does not exist")
    if path.suffix not in FORMATS:
        raise PromptFileError(
            f"prompt file {str(path)!r} has suffix {path.suffix!r}; expected one of {FORMATS} "
            "(.txt: segments separated by ' | ', one video per line; .jsonl: "
            '{"prompts": [...]} per line)'
        )
    sequences = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or (path.suffix == ".txt" and line.startswith("#")):
            continue
        where = f"{path}:{number}"
        if path.suffix == ".jsonl":
            segments = _jsonl_segments(line, where)
        else:
            segments = [s.strip() for s in line.split("|")]
        if not segments or any(not s for s in segments):
            raise PromptFileError(f"{where}: empty prompt segment in {line!r}")
        if max_segments is not None and len(segments) > max_segments:
            raise PromptFileError(
                f"{where}: {len(segments)} segments, but the video has only {max_segments} "
                "(one more than switch_frame_indices)"
            )
        sequences.append(segments)
    if not sequences:
        raise PromptFileError(f"prompt file {str(path)!r} holds no prompts")
    return sequences


def _jsonl_segments(line: str, where: str) -> list[str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise PromptFileError(f"{where}: not a JSON object ({err.msg}): {line[:80]!r}") from err
    if not isinstance(row, dict) or "prompts" not in row:
        raise PromptFileError(
            f'{where}: expected an object with a "prompts" list, got {line[:80]!r}'
        )
    segments = row["prompts"]
    if not isinstance(segments, list) or not all(isinstance(s, str) for s in segments):
        raise PromptFileError(f'{where}: "prompts" must be a list of strings, got {segments!r}')
    return [s.strip() for s in segments]


@dataclass
class PromptSource:
    """``train(step, rank) -> list[str]``: the group's sequence; ``heldout(count) ->
    list[list[str]]``: the first ``count`` held-out sequences (0: all, or the toy's 16)."""

    train: Callable[[int, int], list[str]]
    heldout: Callable[[int], list[list[str]]]

    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[Sequence[str]],
        heldout: Sequence[Sequence[str]] | None = None,
        *,
        eval_prompts: int = 0,
        seed: int = 0,
    ) -> PromptSource:
        """Training draws ``sequences[rank_seed(seed, rank, step) % N]``; without ``heldout``
        the last ``eval_prompts`` sequences are held out (when more than that many are given)."""
        train = [list(s) for s in sequences]
        if not train:
            raise ValueError("need at least one training prompt sequence, got none")
        if heldout is None:
            held = train[len(train) - eval_prompts :] if 0 < eval_prompts < len(train) else []
            train = train[: len(train) - len(held)]
            held = held or train
        else:
            held = [list(s) for s in heldout]
        return cls(
            train=lambda step, rank: train[rank_seed(seed, rank, step) % len(train)],
            heldout=lambda count: held[: count or len(held)],
        )

    @classmethod
    def toy(cls, num_segments: int, seed: int) -> PromptSource:
        """The toy world's stories: training segments drawn from its train split, the fixed
        held-out stories (:func:`kvpo.toy.prompts.heldout_prompts`)."""
        from kvpo.toy.prompts import heldout_prompts, parse_prompt, sample_sequence, segment_text

        def train(step: int, rank: int) -> list[str]:
            rng = np.random.default_rng(rank_seed(seed, rank, step))
            return [segment_text(s) for s in sample_sequence(rng, num_segments, "train")]

        def heldout(count: int) -> list[list[str]]:
            stories = heldout_prompts(count or 16, num_segments=num_segments)
            return [[segment_text(s) for s in parse_prompt(story)] for story in stories]

        return cls(train=train, heldout=heldout)


def prompt_source(
    data_path: str | None,
    eval_data_path: str | None,
    *,
    num_segments: int,
    eval_prompts: int,
    seed: int,
) -> PromptSource:
    """The prompt source of a config: files when ``data_path`` is set, else the toy's."""
    if data_path is None:
        return PromptSource.toy(num_segments, seed)
    held = None if eval_data_path is None else load_prompt_file(eval_data_path, num_segments)
    return PromptSource.from_sequences(
        load_prompt_file(data_path, num_segments), held, eval_prompts=eval_prompts, seed=seed
    )
