"""kvpo_kernels: branch-shared paged KV storage, routed attention and fused TVE kernels.

Standalone: nothing here imports ``kvpo``, and ``import kvpo_kernels`` needs torch only (Triton is
imported when the triton backend is first used). Each op runs on the ``torch``, ``triton`` or
``cpp`` backend, chosen per call (see :mod:`kvpo_kernels.registry` and ``docs/kernels.md``).
"""

from kvpo_kernels import paged
from kvpo_kernels._version import __version__
from kvpo_kernels.info import info
from kvpo_kernels.ops.copy_pages import copy_pages
from kvpo_kernels.ops.merge_states import merge_attention_states
from kvpo_kernels.ops.routed_attention import routed_attention
from kvpo_kernels.ops.tve import tve_energy, tve_energy_x0
from kvpo_kernels.ops.write_pages import write_pages
from kvpo_kernels.paged import *  # noqa: F403  (every name of kvpo_kernels.paged.__all__)
from kvpo_kernels.registry import BACKENDS, BackendUnavailable, explain

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
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
__all__ += [name for name in paged.__all__ if name not in __all__]
