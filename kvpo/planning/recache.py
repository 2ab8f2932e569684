"""The prompt-switch recache passes a training step runs, and the largest of them.

A recache (:func:`kvpo.models.prompt_switch.recache`) runs one no-grad forward per pass over all
the rows it re-encodes: ``rows x (hi - lo)`` frames, up to :func:`~kvpo.models.prompt_switch.
pass_frames` (21 at Wan's 1560 tokens per frame), and its peak is the forward's
(:meth:`~kvpo.planning.activations.ForwardModel.nograd_peak` over the pass's frames; the context
pass stops before the last layer's FFN, which changes nothing in a model of two or more layers).
Where the step runs one (``kvpo.method``):

- the rollout: the rows of a micro-batch at every switch after the fork (the fork snapshot
  alone at a switch at the fork);
- the replays (old, reference, the grad replay's no-grad pass) and try_kl's anchor replay: at a
  switch inside their blocks after the first one.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvpo.training.config import TrainConfig


def pass_lengths(cfg: TrainConfig, switches: Iterable[int]) -> list[int]:
    """Frames of every recache pass at ``switches`` (``prompt_switch.pass_ranges``)."""
    from kvpo.models.prompt_switch import pass_ranges

    policy = cfg.cache_policy()
    return [hi - lo for s in switches for lo, hi in pass_ranges(policy, s)]


def switches_after(cfg: TrainConfig, forks: list[int], frames: int | None = None) -> list[int]:
    """Switches some rollout meets after its fork: ``fork < s`` (and ``s < fork + frames`` when
    ``frames`` is given: a replay of ``frames`` frames from the fork), over every fork."""
    return sorted(
        {
            s
            for s in cfg.switch_frames
            for f in forks
            if f < s and (frames is None or s < f + frames)
        }
    )


def largest_pass(cfg: TrainConfig, forks: list[int], frames: int | None = None) -> int:
    """Frames of the largest recache pass a phase runs (0: none; arguments as
    :func:`switches_after`)."""
    return max(pass_lengths(cfg, switches_after(cfg, forks, frames)), default=0)
