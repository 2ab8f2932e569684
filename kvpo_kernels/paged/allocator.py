"""Page allocator: a free list and a reference count per page (vLLM's block-manager model).

Plain Python on the host; it never touches a tensor, so it never synchronises a device.
"""

from __future__ import annotations

from collections.abc import Iterable


class OutOfPages(RuntimeError):
    """More pages were asked for than the pool has free."""


class PageAllocator:
    """Hands out page ids ``0 .. num_pages - 1`` and counts who holds each page.

    A page is free exactly when its count is 0. ``allocate`` gives pages with count 1,
    ``share`` adds holders to each listed page, ``release`` drops one and returns the pages whose
    count reached 0 to the free list, which hands out the most recently freed pages first
    (initially the lowest ids first). ``peak_in_use`` is the most pages held at once since
    construction or the last :meth:`reset_peak`.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._counts = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pop() gives the lowest id
        self.peak_in_use = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def reset_peak(self) -> None:
        """Start a new peak from the pages held now."""
        self.peak_in_use = self.num_pages - len(self._free)

    def refcount(self, page: int) -> int:
        self._check_id(page)
        return self._counts[page]

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh pages, each held once. Raises :class:`OutOfPages` when fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} of {self.num_pages} are free")
        pages = [self._free.pop() for _ in range(n)]
        for page in pages:
            self._counts[page] = 1
        self.peak_in_use = max(self.peak_in_use, self.num_pages - len(self._free))
        return pages

    def share(self, pages: Iterable[int], holders: int = 1) -> None:
        """``holders`` more holders for each listed (allocated) page."""
        for page in pages:
            if self._counts[page] < 1:
                raise AssertionError(f"page {page} is free; only held pages can be shared")
            self._counts[page] += holders

    def release(self, pages: Iterable[int]) -> list[int]:
        """One holder fewer for each listed page; returns the pages that became free."""
        freed = []
        for page in pages:
            if self._counts[page] < 1:
                raise AssertionError(f"page {page} released more often than it was held")
            self._counts[page] -= 1
            if self._counts[page] == 0:
                freed.append(page)
        self._free.extend(sorted(freed, reverse=True))
        return freed

    def _check_id(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise IndexError(
                f"page id {page} is outside the pool of {self.num_pages} pages "
                f"(valid ids 0..{self.num_pages - 1})"
            )
