"""Prompt files: one multi-segment prompt sequence per video.

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
from pathlib import Path

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
