"""kvpo: KVPO training of streaming autoregressive video generators (routing, rollout, TVE policy, trainer)."""
