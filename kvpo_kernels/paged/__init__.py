"""Branch-shared paged K/V storage: a page allocator with refcounts, the store built on it, its
reservation handles and the page-table builder shared with model-side caches."""

from kvpo_kernels.paged.allocator import OutOfPages, PageAllocator
from kvpo_kernels.paged.page_table import PageTableBuilder
from kvpo_kernels.paged.reservation import Reservation
from kvpo_kernels.paged.sequence import UnknownSequence
from kvpo_kernels.paged.store import PagedKVStore

__all__ = [
    "OutOfPages",
    "PageAllocator",
    "PageTableBuilder",
    "PagedKVStore",
    "Reservation",
    "UnknownSequence",
]
