"""kvpo_kernels: branch-shared paged KV storage, routed attention and fused TVE kernels.

Standalone: nothing here imports ``kvpo``. Each op runs on the ``torch``, ``triton`` or ``cpp``
backend, chosen per call (see :mod:`kvpo_kernels.registry`).
"""

from kvpo_kernels._version import __version__
from kvpo_kernels.info import info
from kvpo_kernels.ops.merge_states import merge_attention_states
from kvpo_kernels.ops.pages import copy_pages
from kvpo_kernels.ops.routed_attention import routed_attention
from kvpo_kernels.ops.tve import tve_energy, tve_energy_x0
from kvpo_kernels.ops.write_pages import write_pages
from kvpo_kernels.paged import PagedKVStore
from kvpo_kernels.registry import BACKENDS, BackendUnavailable, explain

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "PagedKVStore",
    "__version__",
    "copy_pages",
    "explain",
    "info",
    "merge_attention_states",
    "routed_attention",
    "tve_energy",
    "tve_energy_x0",
    "write_pages",
]
