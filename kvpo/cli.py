"""The ``kvpo`` command: one entry point for the library's jobs.

    kvpo train    [--config X.yaml] [--resume RUN] [--check] [key=value ...]   KVPO training
    kvpo evaluate [--config X.yaml] [--json F] [key=value ...]                held-out rewards
    kvpo sample   [key=value ...]                                             toy videos + rewards
    kvpo pretrain [key=value ...]                                             the toy model
    kvpo study    [--config X.yaml] [--prompts N] [key=value ...]             exploration study
    kvpo reward-server scorer=NAME path=CKPT port=P                           a reward server
    kvpo plan     [--config X.yaml] --gpu-memory 80GiB [key=value ...]        memory per phase

One override convention for every job: ``key=value`` words. For ``train``, ``evaluate`` and
``study`` the keys are the trainer's config keys (``kvpo train --help`` lists them; dotted for
nested keys, ``adapter.rank=8``); for ``sample``, ``pretrain`` and ``reward-server`` they are the
job's options
(``kvpo sample prompt="a red circle moves left" samples=4`` is ``--prompt ... --samples 4``; a
repeatable option is repeated: ``prompt=... prompt=...``). Options in ``--flag value`` form work
too. ``kvpo JOB --help`` explains each job; ``python -m kvpo.train`` and the other modules keep
working as before.
"""

from __future__ import annotations

import importlib
import sys

JOBS = {
    "train": ("kvpo.train", "KVPO training of a LoRA adapter (the main job)", False),
    "evaluate": (
        "kvpo.evaluate",
        "held-out rewards of a model, as the trainer scores them",
        False,
    ),
    "sample": ("kvpo.sample", "sample toy videos (GIF + MP4) and print their rewards", True),
    "pretrain": ("kvpo.toy.pretrain", "pretrain the toy model (the shipped weights' recipe)", True),
    "reward-server": (
        "kvpo.rewards.server",
        "serve a reward model over HTTP on 127.0.0.1 (a scorer in its own environment)",
        True,
    ),
    "study": (
        "kvpo.study.command",
        "KV routing against noise-based exploration, measured side by side",
        False,
    ),
    "plan": (
        "kvpo.plan",
        "predicted peak GPU memory per phase, and the row_micro_batch that fits",
        False,
    ),
}


def as_flags(words: list[str]) -> list[str]:
    """``key=value`` words -> ``--key value`` (``_`` in keys becomes ``-``); other words pass."""
    out = []
    for word in words:
        key, eq, value = word.partition("=")
        if eq and not word.startswith("-") and key.replace("_", "").replace("-", "").isalnum():
            out += [f"--{key.replace('_', '-')}", value]
        else:
            out.append(word)
    return out


def usage() -> str:
    width = max(map(len, JOBS))
    jobs = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text, _) in JOBS.items())
    return (
        f"usage: kvpo JOB [options] [key=value ...]\n\njobs:\n{jobs}\n\n"
        + __doc__.split("\n\n", 2)[2].split("\n\n")[0]
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    job, rest = argv[0], argv[1:]
    if job not in JOBS:
        print(f"kvpo: unknown job {job!r}; expected one of {', '.join(JOBS)}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    module, _, flags = JOBS[job]
    entry = importlib.import_module(module).main
    code = entry(as_flags(rest) if flags else rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
