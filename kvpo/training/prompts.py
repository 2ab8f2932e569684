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

Formats, chosen by the file's suffix and, for ``.txt``, by each line:

- ``.txt``: one video per non-empty line; its segments separated by ``" | "``; lines starting
  with ``#`` are comments. ``a red circle moves left | a blue circle moves up``
- ``.txt``, bracket lines (the KVPO authors' formatted prompt files): an optional count and a
  comma, then one ``[...]`` field per segment: ``2,[a red circle moves left],[it moves up]``
  (brackets may nest inside a field; a line ``0,`` is skipped). Text outside the brackets other
  than commas, or an unbalanced bracket, is an error naming the line.
- ``.jsonl``: one JSON object per line with a ``"prompts"`` list of segment strings (the
  LongLive/MemFlow KVPO data format). ``{"prompts": ["a red circle moves left", "..."]}``

Segment filters (the authors' ``prompt_min_segments`` / ``prompt_max_segments``): sequences
are cut to ``keep_segments`` segments, then those with fewer than ``min_segments`` dropped.

Segment ``i`` conditions the frames from the ``i``-th switch frame on (``switch_frame_indices``);
a sequence may have fewer segments than the video has (the last one continues) but not more.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvpo.training.distributed import rank_seed

FORMATS = (".txt", ".jsonl")
ORDERS = ("random", "sweep")
_COUNT = re.compile(r"^\s*(\d+)\s*,(.*)$")


class PromptFileError(ValueError):
    """A prompt file that does not follow one of the two formats."""


def load_prompt_file(
    path: str | Path,
    max_segments: int | None = None,
    *,
    min_segments: int | None = None,
    keep_segments: int | None = None,
) -> list[list[str]]:
    """Read ``path`` -> a list of prompt sequences (lists of segment strings).

    ``max_segments``: the most segments a video has (more is an error); ``keep_segments`` /
    ``min_segments``: the segment filters of the module docstring (None: off).
    """
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
        elif _is_bracket_line(line):
            segments = _bracket_segments(line, where)
            if segments is None:  # a "0," line: no prompt
                continue
        else:
            segments = [s.strip() for s in line.split("|")]
        if not segments or any(not s for s in segments):
            raise PromptFileError(f"{where}: empty prompt segment in {line!r}")
        segments = segments[:keep_segments] if keep_segments is not None else segments
        if min_segments is not None and len(segments) < min_segments:
            continue
        if max_segments is not None and len(segments) > max_segments:
            raise PromptFileError(
                f"{where}: {len(segments)} segments, but the video has only {max_segments} "
                "(one more than switch_frame_indices)"
            )
        sequences.append(segments)
    if not sequences:
        kept = "" if min_segments is None else f" with at least {min_segments} segments"
        raise PromptFileError(f"prompt file {str(path)!r} holds no prompts{kept}")
    return sequences


def _is_bracket_line(line: str) -> bool:
    match = _COUNT.match(line)
    body = match.group(2) if match else line
    return body.lstrip().startswith("[") or (match is not None and not body.strip())


def _bracket_segments(line: str, where: str) -> list[str] | None:
    """Fields of ``[...]`` groups (outermost brackets removed) of an authors' formatted line."""
    match = _COUNT.match(line)
    body = match.group(2) if match else line
    if match and not body.strip():
        if int(match.group(1)) == 0:
            return None
        raise PromptFileError(f"{where}: count {match.group(1)} but no [...] segments: {line!r}")
    fields, depth, start = [], 0, 0
    offset = len(line) - len(body)  # columns are counted in the whole line
    for i, ch in enumerate(body):
        if ch == "[":
            depth += 1
            if depth == 1:
                start = i + 1
        elif ch == "]":
            if depth == 0:
                raise PromptFileError(
                    f"{where}: ']' at column {offset + i + 1} closes nothing: {line!r}"
                )
            depth -= 1
            if depth == 0:
                fields.append(body[start:i].strip())
        elif depth == 0 and not (ch == "," or ch.isspace()):
            raise PromptFileError(
                f"{where}: text outside [...] at column {offset + i + 1} "
                f"({body[i : i + 20]!r}); expected n,[segment 1],[segment 2],...: {line!r}"
            )
    if depth:
        raise PromptFileError(f"{where}: unclosed '[' in {line!r}")
    return fields


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
        order: str = "random",
        world_size: int = 1,
    ) -> PromptSource:
        """Training draws ``sequences[rank_seed(seed, rank, step) % N]`` (``order="random"``) or
        sweeps them in order, ``sequences[(step * world_size + rank) % N]`` (``"sweep"``, the
        KVPO authors' order: their rollout ``r = step + 1``); without ``heldout`` the last
        ``eval_prompts`` sequences are held out (when more than that many are given)."""
        if order not in ORDERS:
            raise ValueError(f"prompt order must be one of {ORDERS}, got {order!r}")
        train = [list(s) for s in sequences]
        if not train:
            raise ValueError("need at least one training prompt sequence, got none")
        if heldout is None:
            held = train[len(train) - eval_prompts :] if 0 < eval_prompts < len(train) else []
            train = train[: len(train) - len(held)]
            held = held or train
        else:
            held = [list(s) for s in heldout]

        def draw(step: int, rank: int) -> list[str]:
            if order == "sweep":
                return train[(step * world_size + rank) % len(train)]
            return train[rank_seed(seed, rank, step) % len(train)]

        return cls(train=draw, heldout=lambda count: held[: count or len(held)])

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
    min_segments: int = 0,
    keep_segments: int = 0,
    order: str = "random",
    world_size: int = 1,
) -> PromptSource:
    """The prompt source of a config: files when ``data_path`` is set, else the toy's.
    ``min_segments`` / ``keep_segments``: the segment filters (0: off); ``order``, ``world_size``:
    how training draws (:meth:`PromptSource.from_sequences`)."""
    if data_path is None:
        return PromptSource.toy(num_segments, seed)
    filters = {"min_segments": min_segments or None, "keep_segments": keep_segments or None}
    held = None
    if eval_data_path is not None:
        held = load_prompt_file(eval_data_path, num_segments, **filters)
    return PromptSource.from_sequences(
        load_prompt_file(data_path, num_segments, **filters), held, eval_prompts=eval_prompts,
        seed=seed, order=order, world_size=world_size,
    )  # fmt: skip


def config_prompt_source(cfg, world_size: int = 1) -> PromptSource:
    """The prompt source of a :class:`~kvpo.training.config.TrainConfig` (its prompt keys)."""
    return prompt_source(
        cfg.data_path, cfg.eval_data_path, num_segments=len(cfg.switch_frames) + 1,
        eval_prompts=cfg.eval_prompts, seed=cfg.seed, min_segments=cfg.prompt_min_segments,
        keep_segments=cfg.prompt_max_segments, order=cfg.prompt_order, world_size=world_size,
    )  # fmt: skip
