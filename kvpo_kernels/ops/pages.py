"""Former home of :func:`copy_pages`, now :mod:`kvpo_kernels.ops.copy_pages`; kept only until
``kvpo_kernels/paged/store.py`` imports it from there."""

from kvpo_kernels.ops.copy_pages import copy_pages

__all__ = ["copy_pages"]
