"""Host-side state of one paged sequence (plain Python)."""

from __future__ import annotations

from dataclasses import dataclass


class UnknownSequence(LookupError):
    """A sequence handle that this store never made, or one that was freed."""


@dataclass
class SequenceState:
    """Pages of one sequence by logical position (token ``t`` at position ``t // page_size``)."""

    pages: list[int | None]  # page id per logical position; None = evicted
    length: int = 0  # tokens appended over the sequence's life (= position of the next token)
    evicted: int = 0  # number of evicted positions (always full pages: the tail is never evicted)
    pending: int = 0  # open reservations naming this sequence

    def resident(self) -> list[int]:
        """Page ids held, in position order."""
        return [p for p in self.pages if p is not None]

    def positions(self) -> list[int]:
        """Logical positions held, in order."""
        return [i for i, p in enumerate(self.pages) if p is not None]

    def tokens_in(self, positions: list[int], page_size: int) -> int:
        """Tokens stored in the pages at ``positions`` (only the tail page can be partial)."""
        tail = len(self.pages) - 1
        missing = page_size * len(self.pages) - self.length  # empty slots of the tail page
        return len(positions) * page_size - (missing if tail in positions else 0)

    def check_select(self, row: int, seq: int, positions: list[int], page_size: int) -> None:
        """``positions`` (row ``row`` of a page-table ``select``) must be held, distinct, and
        end with the tail page if they name it while it is partial."""
        tail = len(self.pages) - 1
        for j, p in enumerate(positions):
            if not 0 <= p <= tail:
                raise IndexError(
                    f"select[{row}][{j}] = {p}: sequence {seq} has page positions 0..{tail}"
                )
            if self.pages[p] is None:
                raise IndexError(
                    f"select[{row}][{j}] = {p}: that page of sequence {seq} was evicted"
                )
        if len(set(positions)) != len(positions):
            raise ValueError(f"select[{row}] names a position more than once: {positions}")
        if self.length % page_size and tail in positions[:-1]:
            raise ValueError(
                f"select[{row}] puts the partial tail page (position {tail}, "
                f"{self.length % page_size} of {page_size} tokens) at index "
                f"{positions.index(tail)} of {len(positions)}; a partial page must come last"
            )
