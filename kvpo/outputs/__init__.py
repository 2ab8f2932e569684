"""What a training run writes, one job per module (import the module you need; nothing heavy is
imported here):

- :mod:`kvpo.outputs.media`: frames, ``<stem>.gif`` + ``<stem>.mp4``, contact sheets and the
  branch-grid PNG of a group's fork window;
- :mod:`kvpo.outputs.plots`: ``reward_curve.png`` and ``training_curves.png`` from metric
  records (matplotlib);
- :mod:`kvpo.outputs.loggers`: ``metrics.jsonl`` plus optional TensorBoard and Weights & Biases;
- :mod:`kvpo.outputs.progress`: a tqdm bar on a terminal, plain periodic lines elsewhere.
"""
