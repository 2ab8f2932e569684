"""Exploration study: KV routing against noise-based exploration, measured side by side.

``kvpo study`` / ``python -m kvpo.study`` (:mod:`kvpo.study.command`). Modules: ``diversity``
(branch distances and semantic attributes), ``manifold`` (toy frames against the world's
renders), ``attention`` (a hook measuring attention mass per cached frame), ``groups`` (one
group per mode and pair, measured), ``report`` (table, JSON, plots, branch grids).
"""
