"""Memory planning of a KVPO training step: predicted peak bytes per phase, and the largest
``row_micro_batch`` that fits a device (``kvpo plan``; ``docs/memory.md``)."""

from kvpo.planning.choose import Choice, choose_row_micro_batch, start_config, usable_bytes
from kvpo.planning.externals import Setup, setup_for
from kvpo.planning.phases import Line, MemoryPlan, Phase, plan_memory
from kvpo.planning.sizes import SizeError, parse_size

__all__ = [
    "Choice",
    "Line",
    "MemoryPlan",
    "Phase",
    "Setup",
    "SizeError",
    "choose_row_micro_batch",
    "parse_size",
    "plan_memory",
    "setup_for",
    "start_config",
    "usable_bytes",
]
